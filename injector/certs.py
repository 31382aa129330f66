"""TLS for the webhook: a self-signed CA, a serving certificate, and where the CA goes.

Owns the offline certificate bootstrap behind ``equilibrium injector bootstrap-certs``: the
API server calls the webhook over HTTPS and trusts it through ``caBundle`` on the
MutatingWebhookConfiguration. This module makes the pair with ``cryptography`` and renders the
Kubernetes objects (the TLS Secret, the caBundle set in a manifest, or a JSON patch for
``kubectl patch``). The clock is passed in. cert-manager is the managed alternative
(docs/kubernetes.md).
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

WEBHOOK_CONFIGURATION = "equilibrium-injector"
TLS_SECRET = "equilibrium-injector-tls"


@dataclass(frozen=True, slots=True)
class CertBundle:
    """PEM-encoded CA certificate, serving certificate and serving key."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @property
    def ca_bundle(self) -> str:
        """The ``caBundle`` field value: base64 of the CA certificate PEM."""
        return base64.b64encode(self.ca_pem).decode("ascii")


def service_dns_names(service: str, namespace: str) -> list[str]:
    """The names the API server may use for an in-cluster Service."""
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc",
            f"{service}.{namespace}.svc.cluster.local"]


def bootstrap(service: str, namespace: str, now: dt.datetime, *, days: int = 825,
              extra_names: tuple[str, ...] = ()) -> CertBundle:
    """A new CA and a serving certificate for ``<service>.<namespace>.svc`` (+ extra names).

    ``extra_names`` may hold DNS names or IP addresses (tests use ``127.0.0.1``). Keys are
    ECDSA P-256; the CA can sign nothing but this chain's leaf (path length 0).
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    not_before = now - dt.timedelta(minutes=5)
    not_after = now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{service} webhook CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [*service_dns_names(service, namespace), *extra_names]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                    f"{service}.{namespace}.svc")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return CertBundle(
        ca_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()),
    )


def tls_secret(bundle: CertBundle, namespace: str, name: str = TLS_SECRET) -> dict[str, Any]:
    """The ``kubernetes.io/tls`` Secret the injector Deployment mounts."""
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/name": "equilibrium-injector",
                                "app.kubernetes.io/part-of": "equilibrium"}},
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": b64(bundle.cert_pem), "tls.key": b64(bundle.key_pem),
                 "ca.crt": b64(bundle.ca_pem)},
    }


def set_ca_bundle(documents: list[Any], ca_bundle: str,
                  name: str = WEBHOOK_CONFIGURATION) -> int:
    """Set ``caBundle`` on every webhook of the named MutatingWebhookConfiguration, in place.

    Returns how many webhooks were set; raises ``LookupError`` if the configuration is absent.
    """
    count = 0
    for doc in documents:
        if (isinstance(doc, dict) and doc.get("kind") == "MutatingWebhookConfiguration"
                and (doc.get("metadata") or {}).get("name") == name):
            for webhook in doc.get("webhooks") or []:
                webhook.setdefault("clientConfig", {})["caBundle"] = ca_bundle
                count += 1
    if count == 0:
        raise LookupError(f"no MutatingWebhookConfiguration {name!r} with webhooks in the input")
    return count


def ca_bundle_json_patch(ca_bundle: str, webhooks: int) -> list[dict[str, Any]]:
    """For ``kubectl patch mutatingwebhookconfiguration NAME --type=json -p '<this>'``."""
    return [{"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": ca_bundle}
            for i in range(webhooks)]


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)
