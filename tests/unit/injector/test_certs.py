"""Webhook TLS bootstrap (injector/certs.py and `equilibrium injector bootstrap-certs`)."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from equilibrium.cli import main
from injector import certs
from tests.injector_support import assert_valid
from tests.integration.procs import REPO_ROOT

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def bundle() -> certs.CertBundle:
    return certs.bootstrap("equilibrium-injector", "equilibrium-system", NOW, days=30,
                           extra_names=("127.0.0.1",))


def test_serving_cert_is_signed_by_the_ca_for_the_service_names(
        bundle: certs.CertBundle) -> None:
    ca = x509.load_pem_x509_certificate(bundle.ca_pem)
    cert = x509.load_pem_x509_certificate(bundle.cert_pem)
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "equilibrium-injector.equilibrium-system.svc" in sans.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.not_valid_before_utc < NOW < cert.not_valid_after_utc
    assert cert.not_valid_after_utc == NOW + dt.timedelta(days=30)


def test_key_matches_the_certificate(bundle: certs.CertBundle) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(bundle.key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert = x509.load_pem_x509_certificate(bundle.cert_pem)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_naive_clock_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        certs.bootstrap("svc", "ns", dt.datetime(2026, 1, 1))


def test_tls_secret_is_valid_and_carries_the_pair(bundle: certs.CertBundle) -> None:
    secret = certs.tls_secret(bundle, "equilibrium-system")
    assert_valid(secret)
    assert base64.b64decode(secret["data"]["tls.crt"]) == bundle.cert_pem
    assert base64.b64decode(secret["data"]["tls.key"]) == bundle.key_pem


def test_ca_bundle_is_set_on_every_webhook_of_install_yaml(bundle: certs.CertBundle) -> None:
    docs = list(yaml.safe_load_all((REPO_ROOT / "k8s/install.yaml").read_text()))
    assert certs.set_ca_bundle(docs, bundle.ca_bundle) == 2
    (mwc,) = [d for d in docs if d["kind"] == "MutatingWebhookConfiguration"]
    for webhook in mwc["webhooks"]:
        assert base64.b64decode(webhook["clientConfig"]["caBundle"]) == bundle.ca_pem
    assert_valid(mwc)
    with pytest.raises(LookupError):
        certs.set_ca_bundle(docs, bundle.ca_bundle, name="someone-else")


def test_json_patch_targets_each_webhook() -> None:
    patch = certs.ca_bundle_json_patch("Q0E=", 2)
    assert [op["path"] for op in patch] == ["/webhooks/0/clientConfig/caBundle",
                                            "/webhooks/1/clientConfig/caBundle"]


def test_cli_prints_install_yaml_with_ca_and_secret(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["injector", "bootstrap-certs", "--manifest", str(REPO_ROOT / "k8s/install.yaml"),
                 "--out-dir", str(tmp_path)]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    secret = docs[-1]
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "equilibrium-injector-tls"
    (mwc,) = [d for d in docs if d["kind"] == "MutatingWebhookConfiguration"]
    ca_pem = (tmp_path / "ca.crt").read_bytes()
    assert {base64.b64decode(w["clientConfig"]["caBundle"]) for w in mwc["webhooks"]} == {ca_pem}
    assert (tmp_path / "tls.key").stat().st_mode & 0o777 == 0o600
    assert_valid(secret)
    assert_valid(mwc)
    installed = [d for d in yaml.safe_load_all((REPO_ROOT / "k8s/install.yaml").read_text()) if d]
    assert len(docs) == len(installed) + 1  # everything kept, the Secret added

    assert main(["injector", "bootstrap-certs", "--json-patch", "2"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


def test_cli_reports_a_manifest_without_the_webhook(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other.yaml"
    other.write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n")
    assert main(["injector", "bootstrap-certs", "--manifest", str(other)]) == 1
    assert "no MutatingWebhookConfiguration 'equilibrium-injector'" in capsys.readouterr().err
