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


def test_a_discovered_group_is_dormant_until_its_first_request() -> None:
    """A stranger's finding: discovery makes a group for every Service port of the namespace,
    and a Service of thousands of endpoints nobody called stalled the sidecar (its policy's
    state grows with its endpoints squared). A discovered group keeps its endpoints only;
    its policy gets them at the group's first ``get`` (a request), then ticks as any."""
    clock = [5.0]
    t = UpstreamTable("equilibrium", get_profile("balanced"), clock=lambda: clock[0])
    big = [f"http://10.1.{j // 250}.{j % 250 + 1}:8080" for j in range(3000)]
    t.apply({"big.default.80": big, "users.default.80": ["http://10.0.0.1:80"]}, 0.0,
            source="discovery")
    t.apply({"static": ["http://127.0.0.1:1"]}, 0.0)
    groups = {g.name: g for g in t}
    assert [n for n, g in groups.items() if g.dormant] == ["big.default.80", "users.default.80"]
    assert groups["static"].snapshot is not None  # a configured one is live at once
    big_group = groups["big.default.80"]
    assert big_group.endpoints == tuple(big) and not big_group.policy.endpoints
    assert big_group.snapshot is None
    t.apply({"big.default.80": big[1:], "users.default.80": ["http://10.0.0.2:80"]}, 1.0,
            source="discovery")  # changes of a dormant set: kept, nothing else
    assert not big_group.policy.endpoints and big_group.endpoints == tuple(big[1:])
    users = t.get("users.default.80")  # the first request
    assert users is not None and not users.dormant
    assert tuple(users.policy.endpoints) == ("http://10.0.0.2:80",)
    assert users.snapshot is not None
    assert users.snapshot.weights == {"http://10.0.0.2:80": 1.0}
    assert big_group.dormant  # the other one still is
