"""What the install controller writes: the generated secrets and per-namespace objects.

Owns the names, keys and shapes of the Kubernetes objects that ``equilibrium injector
controller`` (:mod:`injector.controller`) creates, and the decisions that need no I/O: which
namespaces opt in, which keys an existing Secret lacks, whether a namespace's copy is stale.
It generates the random values through a token function passed in (``secrets.token_hex`` in
production), so tests can tell values apart. It must not talk to the API server and never
logs or formats a secret value into a message.

The three Secrets of the control-plane namespace (docs/kubernetes.md, "Install"):

* ``equilibrium-redis-auth``: ``password`` (the ``default`` admin user), ``signaler-password``,
  ``sidecar-password`` (the users of :mod:`wire.acl`), read by the Redis StatefulSet.
* ``equilibrium-mesh``: ``mesh-hmac-key`` and ``redis-url`` as ``eq-signaler``, read by the
  signaler.
* ``equilibrium-injector-tls``: the webhook's serving certificate and CA
  (:mod:`injector.certs`).

In each meshed namespace: ``equilibrium-mesh`` with the same ``mesh-hmac-key`` and the
``redis-url`` of ``eq-sidecar`` only, and the RoleBinding ``equilibrium-sidecar`` letting the
namespace's service accounts read Services and EndpointSlices.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from typing import Any, Final

from injector.config import InjectorConfig
from wire.acl import SIDECAR_USER, SIGNALER_USER

INJECTION_LABEL: Final = "equilibrium.io/injection"  # the label the namespace webhook selects
INJECTION_ENABLED: Final = "enabled"
MESH_LABEL: Final = "equilibrium.io/mesh"  # "enabled": secrets only (per-pod annotation opt-in)
REDIS_AUTH_SECRET: Final = "equilibrium-redis-auth"
MESH_SECRET: Final = InjectorConfig().mesh_secret_name
SIDECAR_ROLE: Final = "equilibrium-sidecar"  # ClusterRole (k8s/base/sidecar-rbac.yaml)
MANAGED_BY: Final = {"app.kubernetes.io/managed-by": "equilibrium-controller",
                     "app.kubernetes.io/part-of": "equilibrium"}
DEFAULT_REDIS_HOST: Final = "equilibrium-redis-0.equilibrium-redis.equilibrium-system.svc:6379"

# key -> bytes of randomness (hex-encoded: twice as many characters, all valid in wire.acl)
REDIS_AUTH_KEYS: Final = {"password": 32, "signaler-password": 32, "sidecar-password": 32}
MESH_KEY_BYTES: Final = 32

Token = Callable[[int], str]  # nbytes -> hex string (secrets.token_hex)


def wants_mesh(namespace: Mapping[str, Any]) -> bool:
    """A namespace opts in by the injection label (``enabled``) or by
    ``equilibrium.io/mesh=enabled`` (secrets and RBAC only, for per-pod annotation opt-in)."""
    labels = (namespace.get("metadata") or {}).get("labels") or {}
    if not isinstance(labels, Mapping):
        return False
    return (labels.get(INJECTION_LABEL) == INJECTION_ENABLED
            or labels.get(MESH_LABEL) == INJECTION_ENABLED)


def decode_data(secret: Mapping[str, Any]) -> dict[str, str]:
    """A Secret's ``data`` decoded (values that are not base64 UTF-8 are left out)."""
    out: dict[str, str] = {}
    data = secret.get("data") or {}
    if not isinstance(data, Mapping):
        return out
    for key, value in data.items():
        try:
            out[str(key)] = base64.b64decode(str(value), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            continue
    return out


def encode_data(values: Mapping[str, str]) -> dict[str, str]:
    return {k: base64.b64encode(v.encode()).decode("ascii") for k, v in values.items()}


def missing_redis_auth(existing: Mapping[str, str], token: Token) -> dict[str, str]:
    """The Redis passwords ``existing`` lacks, freshly generated (never the ones it has)."""
    return {key: token(n) for key, n in REDIS_AUTH_KEYS.items() if not existing.get(key)}


def new_mesh_key(token: Token) -> str:
    return token(MESH_KEY_BYTES)


def redis_url(user: str, password: str, host: str = DEFAULT_REDIS_HOST) -> str:
    return f"redis://{user}:{password}@{host}/0"


def signaler_url(auth: Mapping[str, str], host: str = DEFAULT_REDIS_HOST) -> str:
    return redis_url(SIGNALER_USER, auth["signaler-password"], host)


def sidecar_url(auth: Mapping[str, str], host: str = DEFAULT_REDIS_HOST) -> str:
    return redis_url(SIDECAR_USER, auth["sidecar-password"], host)


def secret(name: str, namespace: str, values: Mapping[str, str],
           secret_type: str = "Opaque") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(MANAGED_BY)},
            "type": secret_type, "data": encode_data(values)}


def namespace_mesh_values(mesh_key: str, auth: Mapping[str, str],
                          host: str = DEFAULT_REDIS_HOST) -> dict[str, str]:
    """What a meshed namespace's ``equilibrium-mesh`` holds: the key and eq-sidecar's URL."""
    return {"mesh-hmac-key": mesh_key, "redis-url": sidecar_url(auth, host)}


def sidecar_role_binding(namespace: str) -> dict[str, Any]:
    """Every service account of ``namespace`` may read Services and EndpointSlices there
    (the injected sidecar runs under its pod's own service account)."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": SIDECAR_ROLE, "namespace": namespace, "labels": dict(MANAGED_BY)},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": SIDECAR_ROLE},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group",
                      "name": f"system:serviceaccounts:{namespace}"}],
    }


def binding_differs(existing: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    return (existing.get("roleRef") != desired["roleRef"]
            or existing.get("subjects") != desired["subjects"])
