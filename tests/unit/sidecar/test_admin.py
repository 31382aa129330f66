"""sidecar.admin: the inbound side's state rendered in the admin ``/debug/state`` (wall-clock
times, recent counts, budgets), and kept finite."""

from __future__ import annotations

import json
import math

from mesh.auction import SecondPriceAuction
from mesh.concurrency import AdaptiveConcurrencyLimit
from mesh.reputation import BookSnapshot, Phase, Standing
from sidecar.admin import inbound_json
from sidecar.inbound import InboundSnapshot


def inbound_snapshot(standing: Standing) -> InboundSnapshot:
    lim = AdaptiveConcurrencyLimit()
    book_snap = BookSnapshot(callers=(standing,), tracked=3, punished=1, congested=True,
                             congestion=0.9, capacity=30.0, active_callers=3)
    return InboundSnapshot(
        mode="equilibrium", app="http://127.0.0.1:8080", mesh_key=True, now=100.0,
        wall_time=1_800_000_000.0, in_flight=4, congestion=1.0, capacity=30.0,
        book=book_snap, concurrency=lim.snapshot(),
        auction=SecondPriceAuction().snapshot(100.0, ["rogue"]),
    )


def test_admin_renders_the_inbound_state_as_json() -> None:
    rogue = Standing("rogue", 0.2, 2, Phase.PUNISHED, 30.0, 41.5, 20.25, 2,
                     punished_until=130.0, admitted=12.0, throttled=300.0)
    body = inbound_json(inbound_snapshot(rogue))
    assert body is not None
    (caller,) = body["callers"]
    assert caller["punished_until"] == "2027-01-15T08:00:30.000+00:00"  # wall_time + 30 s
    assert (caller["phase"], caller["level"], caller["punished_for"]) == ("punished", 2, 30.0)
    assert caller["recent"] == {"admitted": 12.0, "throttled": 300.0}
    assert caller["budget"] is None  # never reached the auction
    assert body["fair_share"] == 10.0 and body["congested"] is True
    assert body["punished_callers"] == 1 and body["callers_tracked"] == 3
    assert body["concurrency"]["min_rtt"] is None and body["auction"]["last_price"] == 0.0
    assert inbound_json(None) is None


def test_admin_json_stays_finite() -> None:
    odd = Standing("x", math.nan, 0, Phase.GOOD, 0.0, math.inf, 0.0, 0)
    body = inbound_json(inbound_snapshot(odd))
    json.dumps(body, allow_nan=False)  # raises on NaN or infinity
    assert body is not None and body["callers"][0]["reputation"] == 0.0
