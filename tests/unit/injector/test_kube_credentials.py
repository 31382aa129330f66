"""injector.kube.Credentials: where the API server is, from flags or the pod's account."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from injector.kube import Credentials


def test_in_cluster_uses_the_service_account(tmp_path: Path) -> None:
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"}
    creds = Credentials.from_flags(None, None, env, tmp_path)
    assert creds == Credentials("https://[fd00::1]:6443", tmp_path / "token",
                                tmp_path / "ca.crt")
    assert Credentials.from_flags(None, "/t", env, tmp_path).token_file == Path("/t")


def test_explicit_url_and_token(tmp_path: Path) -> None:
    creds = Credentials.from_flags("http://127.0.0.1:8080", "/t", {}, tmp_path)
    assert creds == Credentials("http://127.0.0.1:8080", Path("/t"), None)


@pytest.mark.parametrize(("url", "env", "message"), [
    ("ftp://x", {}, "expected an http(s):// URL"),
    (None, {}, "KUBERNETES_SERVICE_HOST is unset"),
])
def test_errors_name_the_fix(url: str | None, env: dict[str, str], message: str,
                             tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Credentials.from_flags(url, None, env, tmp_path)
