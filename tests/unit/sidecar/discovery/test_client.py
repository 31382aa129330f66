"""sidecar.discovery.client: the API server's credentials, in the cluster or from flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.discovery import KubeCredentials, credentials_from_flags


def test_in_cluster_credentials_come_from_the_service_account(tmp_path: Path) -> None:
    (tmp_path / "namespace").write_text("shop\n")
    creds = KubeCredentials.in_cluster(
        {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"}, tmp_path
    )
    assert creds.api_url == "https://[fd00::1]:6443"
    assert creds.token_file == tmp_path / "token" and creds.ca_file == tmp_path / "ca.crt"
    assert creds.namespace == "shop"
    with pytest.raises(ValueError, match="KUBERNETES_SERVICE_HOST"):
        KubeCredentials.in_cluster({}, tmp_path)


def test_explicit_api_url_must_be_http(tmp_path: Path) -> None:
    creds = credentials_from_flags("http://127.0.0.1:1", None, {"POD_NAMESPACE": "ns1"})
    assert creds.api_url == "http://127.0.0.1:1" and creds.namespace == "ns1"
    with pytest.raises(ValueError, match="http"):
        credentials_from_flags("127.0.0.1:1", None, {})
