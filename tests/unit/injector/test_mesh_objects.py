"""The install controller's pure parts: opt-in, generated values, the namespace copy."""

from __future__ import annotations

import itertools

import pytest

from injector import mesh_objects as objs
from wire.acl import acl_rules


def counter_token() -> objs.Token:
    numbers = itertools.count()
    return lambda n: f"{next(numbers):0{2 * n}x}"


@pytest.mark.parametrize(("labels", "wanted"), [
    ({"equilibrium.io/injection": "enabled"}, True),
    ({"equilibrium.io/mesh": "enabled"}, True),
    ({"equilibrium.io/injection": "disabled"}, False),
    ({"equilibrium.io/injection": "disabled", "equilibrium.io/mesh": "enabled"}, True),
    ({"equilibrium.io/mesh": "true"}, False),
    ({}, False),
    (None, False),
    ("not-a-map", False),
])
def test_which_namespaces_opt_in(labels: object, wanted: bool) -> None:
    assert objs.wants_mesh({"metadata": {"name": "x", "labels": labels}}) is wanted


def test_only_missing_passwords_are_generated_and_they_are_valid_acl_passwords() -> None:
    token = counter_token()
    fresh = objs.missing_redis_auth({}, token)
    assert set(fresh) == {"password", "signaler-password", "sidecar-password"}
    assert len(set(fresh.values())) == 3 and all(len(v) == 64 for v in fresh.values())
    for role in ("sidecar", "signaler"):
        acl_rules(role, fresh[f"{role}-password"])  # raises if Redis could not take it
    assert objs.missing_redis_auth(fresh, token) == {}
    partial = objs.missing_redis_auth({"password": "kept", "sidecar-password": ""}, token)
    assert set(partial) == {"signaler-password", "sidecar-password"}


def test_a_namespace_gets_the_key_and_the_sidecar_url_only() -> None:
    auth = {"password": "A" * 20, "signaler-password": "S" * 20, "sidecar-password": "c" * 20}
    values = objs.namespace_mesh_values("k" * 64, auth, "redis:6379")
    assert values == {"mesh-hmac-key": "k" * 64,
                      "redis-url": f"redis://eq-sidecar:{'c' * 20}@redis:6379/0"}
    assert objs.signaler_url(auth, "redis:6379") == f"redis://eq-signaler:{'S' * 20}@redis:6379/0"


def test_secret_data_round_trips_and_bad_base64_is_left_out() -> None:
    secret = objs.secret("s", "ns", {"a": "x y", "b": "é"})
    assert secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == \
        "equilibrium-controller"
    assert objs.decode_data(secret) == {"a": "x y", "b": "é"}
    assert objs.decode_data({"data": {"a": "!!!", "b": "/w=="}}) == {}
    assert objs.decode_data({"data": None}) == {}


def test_role_binding_for_every_service_account_of_the_namespace() -> None:
    binding = objs.sidecar_role_binding("shop")
    assert binding["subjects"] == [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group",
                                    "name": "system:serviceaccounts:shop"}]
    assert not objs.binding_differs(binding, binding)
    assert objs.binding_differs({**binding, "subjects": []}, binding)
