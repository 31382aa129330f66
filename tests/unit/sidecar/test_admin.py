"""The inbound side's state as data: the pure snapshots of mesh.reputation, mesh.auction and
mesh.concurrency, and their rendering in the admin ``/debug/state`` (sidecar.admin).

Expected values are computed by hand from the rules: recent counts are exponentially decayed
with time constant ``recent_window`` (10 s here), so an event at ``t`` counts
``exp(-(now - t) / 10)`` at ``now``.
"""

from __future__ import annotations

import json
import math

import pytest

from mesh.auction import AuctionParams, BidBudget, Queued, SecondPriceAuction
from mesh.concurrency import AdaptiveConcurrencyLimit, ConcurrencyParams
from mesh.reputation import ANONYMOUS, BookSnapshot, Phase, PolicingParams, ReputationBook, Standing
from sidecar.admin import inbound_json
from sidecar.inbound import InboundSnapshot

WINDOW = 10.0


def book() -> ReputationBook:
    return ReputationBook(PolicingParams(recent_window=WINDOW))


def decayed(times: list[float], now: float) -> float:
    return math.fsum(math.exp(-(now - t) / WINDOW) for t in times)


def test_busiest_callers_first_then_the_anonymous_bucket() -> None:
    b = book()
    for caller, count in (("a", 5), ("b", 3), ("c", 1), (ANONYMOUS, 1)):
        for i in range(count):
            b.observe(caller, 0.1 * i)
    snap = b.snapshot(1.0, top=2)
    assert [s.caller for s in snap.callers] == ["a", "b", ANONYMOUS]
    assert snap.tracked == 4 and snap.punished == 0 and snap.active_callers == 4
    assert snap.callers[0].admitted == pytest.approx(decayed([0.0, 0.1, 0.2, 0.3, 0.4], 1.0))
    assert [s.caller for s in b.snapshot(1.0, top=0).callers] == [ANONYMOUS]
    # equally busy callers are listed by name; anonymous is not repeated when it is busy
    assert [s.caller for s in b.snapshot(1.0, top=4).callers] == ["a", "b", ANONYMOUS, "c"]
    with pytest.raises(ValueError):
        b.snapshot(1.0, top=-1)


def test_a_punished_caller_shows_its_throttled_requests_and_when_its_punishment_ends() -> None:
    b = book()
    admitted, throttled = [], []
    for i in range(400):  # every request a retry: over the retry budget from the start
        t = 0.01 * i
        decision = b.admit("rogue", t, is_retry=True)
        (admitted if decision.admitted else throttled).append(t)
        if i % 2:
            b.admit("coop", t)
    now = 4.0
    snap = b.snapshot(now, top=5)
    rogue, coop = snap.callers
    assert (rogue.caller, coop.caller) == ("rogue", "coop")  # more requests recently
    assert rogue.phase is Phase.PUNISHED and rogue.level >= 1 and throttled
    assert rogue.throttled == pytest.approx(decayed(throttled, now))
    assert rogue.admitted == pytest.approx(decayed(admitted, now))
    assert rogue.punished_until is not None
    assert rogue.punished_until - now == pytest.approx(rogue.punished_for)
    assert rogue.punished_for > 0 and snap.punished == 1
    assert coop.phase is Phase.GOOD and coop.punished_until is None and coop.throttled == 0
    assert coop.admitted == pytest.approx(decayed([0.01 * i for i in range(1, 400, 2)], now))


def test_a_snapshot_reads_only() -> None:
    """Two books fed the same requests decide alike whether or not one is looked at."""
    looked, unlooked = book(), book()
    for i in range(300):
        t = 0.02 * i
        if i % 7 == 0:
            first = looked.snapshot(t, top=3)
            assert looked.snapshot(t, top=3) == first
        for caller, retry in (("rogue", True), ("coop", False), (ANONYMOUS, False)):
            assert looked.admit(caller, t, retry) == unlooked.admit(caller, t, retry)


def test_auction_snapshot_shows_the_queue_price_and_budgets_without_creating_any() -> None:
    auction = SecondPriceAuction(AuctionParams(budget_rate=1.0, budget_cap=10.0))
    assert isinstance(auction.offer("r1", "x", 5.0, 0.0, False), Queued)
    assert isinstance(auction.offer("r2", "y", 3.0, 0.0, False), Queued)
    snap = auction.snapshot(1.0, ["x", "y", "never-bid"])
    assert snap.queue_length == 2 and snap.highest_waiting_bid == 5.0 and snap.last_price == 0
    assert set(snap.budgets) == {"x", "y"} and snap.tracked_callers == 2
    assert auction.tracked_callers == 2  # no budget was created for "never-bid"
    x = snap.budgets["x"]
    assert (x.balance, x.reserved, x.available, x.cap) == (10.0, 5.0, 5.0, 10.0)

    (winner,) = auction.release(2.0, 1)  # x wins and pays y's bid
    snap = auction.snapshot(4.0, ["x"])
    assert winner.price == 3.0 and snap.last_price == 3.0 and snap.queue_length == 1
    assert snap.budgets["x"].balance == pytest.approx(7.0 + 2.0)  # refilled 1/s since 2.0
    assert snap.budgets["x"].reserved == 0.0


def test_budget_balance_at_reads_without_refilling() -> None:
    budget = BidBudget(rate=1.0, cap=10.0, now=0.0)
    budget.settle(budget.reserve(6.0, 0.0), 6.0, 0.0)
    assert budget.balance_at(3.0) == 7.0
    assert budget.balance(1.0) == 5.0  # the earlier look did not move the budget forward
    assert budget.balance_at(100.0) == 10.0


def test_concurrency_snapshot_during_the_first_probe() -> None:
    limiter = AdaptiveConcurrencyLimit(ConcurrencyParams(probe_limit=3, probe_samples=2))
    assert limiter.on_start(0.0)
    snap = limiter.snapshot()
    assert snap.probing and snap.limit == 3 and snap.estimated_limit == 20.0
    assert snap.in_flight == 1 and snap.congestion == pytest.approx(1 / 3)
    assert snap.min_rtt is None and snap.capacity_estimate is None
    assert limiter.on_start(0.0)
    limiter.on_finish(0.05, 0.05)
    limiter.on_finish(0.1, 0.1)
    snap = limiter.snapshot()
    assert not snap.probing and snap.min_rtt == 0.05 and snap.limit == 20
    assert snap.capacity_estimate == pytest.approx(20 / 0.05)


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


def test_a_punishment_that_ran_out_shows_until_the_callers_next_request() -> None:
    """As docs/operations.md says: the ladder moves only when the caller sends."""
    b = book()
    for i in range(400):
        b.admit("rogue", 0.01 * i, is_retry=True)
    until = b.snapshot(4.0, top=1).callers[0].punished_until
    assert until is not None
    later = b.snapshot(until + 100.0, top=1)
    (quiet,) = later.callers
    assert quiet.phase is Phase.PUNISHED and quiet.punished_for == 0 and later.punished == 1
    assert quiet.punished_until == until  # in the past now
    # Its next request (a calm one after 100 s) restores its reputation: forgiven, and the
    # probation periods that have passed since bring it back to good standing.
    assert b.admit("rogue", until + 100.0).admitted
    (forgiven,) = b.snapshot(until + 100.0, top=1).callers
    assert forgiven.phase is Phase.GOOD and forgiven.punished_until is None
    assert b.snapshot(until + 100.0, top=1).punished == 0
