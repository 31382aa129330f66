"""sidecar.dashboard: a sidecar's frame from its own /debug/state (a real routed group)."""

from __future__ import annotations

from typing import Any

from sidecar.admin import debug_state
from sidecar.dashboard import SidecarDashboard, policing
from tests.signaling_samples import EPS, routed_group


def test_the_share_is_the_requests_since_the_last_frame_else_the_weight() -> None:
    table, _ = routed_group()
    state: dict[str, Any] = debug_state(sidecar_id="sc-1", strategy="balanced",
                                        policy="equilibrium", draining=False, table=table)
    board = SidecarDashboard(lambda: state)
    [up] = board()["upstreams"]
    weights = {e["endpoint"]: e["weight"] for e in state["upstreams"]["orders"]["endpoints"]}
    assert {r["endpoint"]: r["share"] for r in up["endpoints"]} == weights  # nothing sent yet
    assert up["ce_gap"] == state["upstreams"]["orders"]["ce_gap"] == 0.0
    assert up["sidecars"] == [{"id": "sc-1", "following": False, "demand": None,
                               "distance": None}]
    counts = {EPS[0]: 30, EPS[1]: 10, EPS[2]: 0}
    for e in state["upstreams"]["orders"]["endpoints"]:
        e["requests"] = counts[e["endpoint"]]
    [up] = board()["upstreams"]
    assert {r["endpoint"]: r["share"] for r in up["endpoints"]} == {
        EPS[0]: 0.75, EPS[1]: 0.25, EPS[2]: 0.0}
    assert {r["endpoint"]: r["requests"] for r in up["endpoints"]} == counts


def test_policing_comes_from_the_inbound_section() -> None:
    inbound = {
        "congestion": 0.5, "capacity": 80.0, "auction": {"last_price": 0.25, "queue_length": 2},
        "callers": [
            {"caller": "spiffe://a", "phase": "punished", "level": 2, "reputation": 0.1,
             "rate": 40.0, "recent": {"admitted": 10.0, "throttled": 30.0}},
            {"caller": "spiffe://b", "phase": "good", "level": 0, "reputation": 1.0,
             "rate": 5.0, "recent": {"admitted": 5.0, "throttled": 0.0}},
        ],
    }
    shown = policing("sc-1", inbound)
    assert shown["price"] == 0.25 and shown["queue"] == 2
    assert shown["admitted"] == 15.0 and shown["throttled"] == 30.0
    assert [c["caller"] for c in shown["callers"]] == ["spiffe://a", "spiffe://b"]
    assert shown["callers"][0]["level"] == 2
    frame = SidecarDashboard(lambda: {"id": "sc-1", "upstreams": {}, "inbound": inbound})()
    assert frame["policing"] == [shown]
    assert SidecarDashboard(lambda: {"id": "sc-1", "upstreams": {}})()["policing"] == []
