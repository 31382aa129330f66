"""sidecar.upstreams: one table fed by two sources (the config and discovery): who wins a shared
name, and what an endpoint update keeps."""

from __future__ import annotations

import logging

import pytest

from mesh.profiles import get_profile
from sidecar.upstreams import UpstreamTable


def table() -> UpstreamTable:
    return UpstreamTable("equilibrium", get_profile("balanced"))


def test_discovery_and_config_groups_coexist_and_config_wins_a_shared_name() -> None:
    t = table()
    t.apply({"static": ["http://127.0.0.1:1"]}, 0.0)
    t.apply({"users.default.80": ["http://10.0.0.1:80"], "static": ["http://10.0.0.9:80"]},
            0.0, source="discovery")
    t.set_aliases({"users": "users.default.80"})
    assert t.names() == ["static", "users.default.80"]
    static = t.get("static")
    assert static is not None and static.endpoints == ("http://127.0.0.1:1",)
    users = t.get("users")
    assert users is not None and users.name == "users.default.80"

    # A config reload keeps discovery's groups; a discovery update keeps config's.
    t.apply({"static": ["http://127.0.0.1:2"]}, 1.0)
    assert t.get("users") is users
    added, removed = t.apply({}, 2.0, source="discovery")
    assert added == set() and removed == {"users.default.80"} and t.get("users") is None
    assert t.names() == ["static"]


def test_endpoint_updates_keep_the_group_and_learned_state_of_staying_endpoints() -> None:
    t = table()
    t.apply({"users.default.80": ["http://10.0.0.1:80", "http://10.0.0.2:80"]}, 0.0,
            source="discovery")
    group = t.get("users.default.80")
    assert group is not None
    policy = group.policy
    t.apply({"users.default.80": ["http://10.0.0.2:80", "http://10.0.0.3:80"]}, 1.0,
            source="discovery")
    same = t.get("users.default.80")
    assert same is group and same.policy is policy  # a request holding it keeps working
    assert same.endpoints == ("http://10.0.0.2:80", "http://10.0.0.3:80")


def test_a_configured_upstream_without_endpoints_is_warned_of(
        caplog: pytest.LogCaptureFixture) -> None:
    # A stranger's finding: `--upstream orders=` started with an INFO line "endpoints:
    # (none)" (it is how an upstream answered 503 no-endpoint is configured, so it stays
    # valid): said as a warning; discovery's empty Service (scaled to 0) stays INFO.
    caplog.set_level(logging.INFO, logger="sidecar.upstreams")
    t = table()
    t.apply({"orders": []}, 0.0)
    t.apply({"users.default.80": []}, 0.0, source="discovery")
    said = {(r.levelno, r.getMessage().split()[1]) for r in caplog.records}
    assert said == {(logging.WARNING, "orders"), (logging.INFO, "users.default.80")}
