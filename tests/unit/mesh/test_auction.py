"""mesh.auction: budgets, the second-price clearing of the wait queue, and its snapshot."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.auction import Admission, AuctionParams, BidBudget, Queued, Rejected, SecondPriceAuction


def _auction(**kw: float) -> SecondPriceAuction:
    params = {"budget_rate": 0.0, "budget_cap": 100.0, "max_queue": 100}
    params.update(kw)
    return SecondPriceAuction(AuctionParams(**params))  # type: ignore[arg-type]


# --- budgets --------------------------------------------------------------------------------


def test_budget_starts_full_refills_at_its_rate_and_stops_at_the_cap() -> None:
    budget = BidBudget(rate=2.0, cap=10.0, now=0.0)
    assert budget.balance(0.0) == 10.0
    assert budget.reserve(4.0, 0.0) == 4.0
    budget.settle(4.0, 4.0, 0.0)
    assert budget.balance(0.0) == 6.0
    assert budget.balance(1.0) == 8.0
    assert budget.balance(100.0) == 10.0


def test_bids_above_the_remaining_budget_are_capped() -> None:
    auction = _auction(budget_cap=4.0)
    queued = auction.offer("r1", "a", 9.0, now=0.0, slot_available=False)
    assert isinstance(queued, Queued) and queued.bid == 4.0
    # the first bid reserved the whole budget: a second one from the same caller bids 0
    second = auction.offer("r2", "a", 9.0, now=0.0, slot_available=False)
    assert isinstance(second, Queued) and second.bid == 0.0


# --- clearing -------------------------------------------------------------------------------


def test_uncongested_requests_are_admitted_at_once_for_free() -> None:
    auction = _auction()
    result = auction.offer("r1", "a", 7.0, now=0.0, slot_available=True)
    assert result == Admission("r1", "a", 7.0, 0.0, 0.0)
    assert auction.budget("a", 0.0).balance(0.0) == 100.0


def test_second_price_winner_of_5_3_1_pays_3() -> None:
    auction = _auction()
    for request_id, caller, bid in (("r1", "a", 1.0), ("r2", "b", 5.0), ("r3", "c", 3.0)):
        assert isinstance(auction.offer(request_id, caller, bid, 0.0, False), Queued)
    (won,) = auction.release(now=0.5, slots=1)
    assert (won.request_id, won.bid, won.price, won.waited) == ("r2", 5.0, 3.0, 0.5)
    assert auction.budget("b", 0.5).balance(0.5) == 97.0
    assert auction.budget("c", 0.5).reserved == 3.0  # losers keep waiting, still reserved
    # the next slot: 3 wins against 1 and pays 1; then 1 wins alone and pays 0
    assert [(a.request_id, a.price) for a in auction.release(1.0)] == [("r3", 1.0)]
    assert [(a.request_id, a.price) for a in auction.release(1.0)] == [("r1", 0.0)]
    assert auction.release(1.0) == []


def test_k_slots_go_to_the_k_highest_bids_at_the_highest_losing_bid() -> None:
    auction = _auction()
    for i, bid in enumerate((5.0, 3.0, 1.0, 4.0)):
        auction.offer(f"r{i}", f"c{i}", bid, 0.0, False)
    admitted = auction.release(0.0, slots=2)
    assert [(a.request_id, a.price) for a in admitted] == [("r0", 3.0), ("r3", 3.0)]


def test_ties_go_to_the_earliest_arrival_and_pay_their_own_bid() -> None:
    auction = _auction()
    auction.offer("late-ish", "a", 2.0, 0.0, False)
    auction.offer("first", "b", 6.0, 1.0, False)
    auction.offer("second", "c", 6.0, 2.0, False)
    (won,) = auction.release(3.0)
    assert (won.request_id, won.price) == ("first", 6.0)


def test_expired_waiters_leave_in_arrival_order_and_release_their_reservation() -> None:
    auction = _auction()
    auction.offer("old", "a", 10.0, 0.0, False)
    auction.offer("new", "b", 1.0, 5.0, False)
    assert auction.expire(now=6.0, max_wait=5.5) == ["old"]
    assert auction.budget("a", 6.0).reserved == 0.0
    assert auction.budget("a", 6.0).balance(6.0) == 100.0
    (won,) = auction.release(6.0)
    assert (won.request_id, won.price) == ("new", 0.0)


def test_a_full_queue_evicts_its_lowest_bid_for_a_higher_one_and_rejects_lower_ones() -> None:
    auction = _auction(max_queue=2)
    auction.offer("r1", "a", 2.0, 0.0, False)
    auction.offer("r2", "b", 1.0, 0.0, False)
    low = auction.offer("r3", "c", 1.0, 0.0, False)
    assert isinstance(low, Rejected)
    high = auction.offer("r4", "d", 3.0, 0.0, False)
    assert isinstance(high, Queued) and high.evicted == "r2" and high.queue_length == 2
    assert auction.budget("b", 0.0).reserved == 0.0
    assert [a.request_id for a in auction.release(0.0, slots=5)] == ["r4", "r1"]


def test_a_free_slot_cannot_jump_the_queue() -> None:
    auction = _auction()
    auction.offer("r1", "a", 3.0, 0.0, False)
    with pytest.raises(ValueError, match="release"):
        auction.offer("r2", "b", 9.0, 0.0, slot_available=True)


def test_cancel_removes_a_waiter() -> None:
    auction = _auction()
    auction.offer("r1", "a", 3.0, 0.0, False)
    assert auction.cancel("r1", 0.0) and not auction.cancel("r1", 0.0)
    assert len(auction) == 0 and auction.budget("a", 0.0).reserved == 0.0


def test_budget_book_is_bounded() -> None:
    auction = _auction(max_callers=3)
    for i in range(10):
        auction.offer(f"r{i}", f"caller{i}", 1.0, float(i), True)
    assert auction.tracked_callers == 3


# --- properties -----------------------------------------------------------------------------

_step = st.one_of(
    st.tuples(st.just("offer"), st.sampled_from("abc"), st.floats(0, 1e6), st.booleans()),
    st.tuples(st.just("release"), st.integers(0, 3)),
    st.tuples(st.just("expire"), st.floats(0, 3)),
    st.tuples(st.just("wait"), st.floats(0, 5)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_step, max_size=60))
def test_nobody_pays_more_than_their_bid_and_budgets_stay_non_negative(steps) -> None:
    auction = _auction(budget_rate=1.0, budget_cap=20.0, max_queue=4)
    now, n = 0.0, 0
    spent: dict[str, float] = {}
    for step in steps:
        if step[0] == "offer":
            n += 1
            result = auction.offer(f"r{n}", step[1], step[2], now, step[3] and not auction)
            admitted = [result] if isinstance(result, Admission) else []
            if isinstance(result, Queued):
                assert result.bid <= step[2]
        elif step[0] == "release":
            admitted = auction.release(now, step[1])
        elif step[0] == "expire":
            auction.expire(now, step[1])
            admitted = []
        else:
            now += step[1]
            admitted = []
        for admission in admitted:
            assert 0.0 <= admission.price <= admission.bid
            assert not math.isnan(admission.price)
            spent[admission.caller] = spent.get(admission.caller, 0.0) + admission.price
        for caller in "abc":
            budget = auction.budget(caller, now)
            assert budget.balance(now) >= 0.0
            assert budget.reserved <= budget.balance(now) + 1e-9
    # everyone's spending is bounded by what they could have earned
    for total in spent.values():
        assert total <= 20.0 + 1.0 * now + 1e-9


# --- the auction in front of a saturated app --------------------------------------------------


def test_under_overload_high_bids_wait_less_and_pay_the_second_price() -> None:
    """A discrete-event run of the inbound path: limiter + auction in front of an app with 4
    workers of 10 ms (400/s), offered 500/s for 4 s, alternating bids of 5 ("hi") and 1
    ("lo"); waiters expire after 1 s. This is the call sequence the sidecar performs."""
    import heapq

    from mesh.concurrency import AdaptiveConcurrencyLimit

    limiter = AdaptiveConcurrencyLimit()
    auction = _auction(budget_rate=1000.0, budget_cap=1000.0, max_queue=1000)
    workers_free = [0.0] * 4
    events: list[tuple[float, int, str, str]] = []  # (time, seq, kind, request id)
    for i in range(2000):
        heapq.heappush(events, (i / 500.0, i, "arrive", f"r{i}"))
    arrived: dict[str, float] = {}
    waits: dict[str, list[float]] = {"hi": [], "lo": []}
    expired = {"hi": 0, "lo": 0}
    started: dict[str, float] = {}
    seq = 2000

    def start(request_id: str, now: float) -> None:
        nonlocal seq
        free_at = heapq.heappop(workers_free)
        done = max(now, free_at) + 0.01
        heapq.heappush(workers_free, done)
        started[request_id] = now
        seq += 1
        heapq.heappush(events, (done, seq, "finish", request_id))

    def admit(admission: Admission, now: float) -> None:
        assert 0.0 <= admission.price <= admission.bid
        if admission.price > 0:
            assert admission.price in (1.0, 5.0)  # always someone else's bid
        waits[admission.caller].append(now - arrived[admission.request_id])
        start(admission.request_id, now)

    while events:
        now, _, kind, request_id = heapq.heappop(events)
        for gone in auction.expire(now, max_wait=1.0):
            expired["hi" if int(gone[1:]) % 2 == 0 else "lo"] += 1
        if kind == "arrive":
            caller = "hi" if int(request_id[1:]) % 2 == 0 else "lo"
            arrived[request_id] = now
            free = auction.queue_length == 0 and limiter.on_start(now)
            outcome = auction.offer(request_id, caller, 5.0 if caller == "hi" else 1.0, now, free)
            if isinstance(outcome, Admission):
                admit(outcome, now)
        else:
            limiter.on_finish(now - started.pop(request_id), now)
            for admission in auction.release(now, slots=limiter.available()):
                assert limiter.on_start(now)
                admit(admission, now)

    def p99(values: list[float]) -> float:
        return sorted(values)[int(0.99 * (len(values) - 1))]

    assert expired["hi"] == 0 and expired["lo"] > 100  # the overload falls on the low bids
    assert p99(waits["hi"]) < 0.1
    assert p99(waits["lo"]) > 5 * p99(waits["hi"])
    assert len(waits["hi"]) == 1000


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


# --- fair queueing among equal bids (issue 14: the soak's shared queue) ---------------------


def test_a_newcomer_waits_behind_at_most_one_request_of_a_flooding_callers_backlog() -> None:
    auction = _auction()
    for i in range(50):
        auction.offer(f"flood{i}", "rogue", 0.0, 0.0, False)
    auction.offer("coop", "coop", 0.0, 1.0, False)
    served = [a.request_id for a in auction.release(1.0, slots=2)]
    assert served == ["flood0", "coop"]


def test_backlogged_callers_with_equal_bids_are_served_in_turn() -> None:
    auction = _auction()
    for i in range(3):
        auction.offer(f"a{i}", "a", 0.0, 0.0, False)
    for i in range(3):
        auction.offer(f"b{i}", "b", 0.0, 0.0, False)
    auction.offer("c0", "c", 0.0, 0.0, False)
    served = [a.request_id for a in auction.release(0.0, slots=7)]
    assert served == ["a0", "b0", "c0", "a1", "b1", "a2", "b2"]


def test_a_caller_returning_after_its_queue_drained_starts_at_the_virtual_time() -> None:
    """Tags do not bank credit: a caller idle while others were served starts at V, level with
    the backlog being served now, not ahead of it all."""
    auction = _auction()
    for i in range(6):
        auction.offer(f"a{i}", "a", 0.0, 0.0, False)
    auction.offer("b0", "b", 0.0, 0.0, False)
    assert [x.request_id for x in auction.release(0.0, slots=4)] == ["a0", "b0", "a1", "a2"]
    # V is 2 (a2's tag): b1 starts at 2, level with what is served now (a3 has tag 3), and b2
    # at 3, level with a3 but arrived later; nothing of b's idle time is banked
    auction.offer("b1", "b", 0.0, 1.0, False)
    auction.offer("b2", "b", 0.0, 1.0, False)
    served = [x.request_id for x in auction.release(1.0, slots=5)]
    assert served == ["b1", "a3", "b2", "a4", "a5"]


def test_a_higher_bid_still_goes_first_whatever_the_tags() -> None:
    auction = _auction()
    for i in range(5):
        auction.offer(f"rich{i}", "rich", 2.0, 0.0, False)
    auction.offer("poor", "poor", 0.0, 0.0, False)
    served = [a.request_id for a in auction.release(0.0, slots=6)]
    assert served == [f"rich{i}" for i in range(5)] + ["poor"]


def test_a_full_queue_sheds_from_the_longest_backlog_not_the_newcomer() -> None:
    auction = _auction(max_queue=5)
    for i in range(5):
        auction.offer(f"flood{i}", "rogue", 0.0, 0.0, False)
    coop = auction.offer("coop", "coop", 0.0, 0.1, False)
    assert isinstance(coop, Queued) and coop.evicted == "flood4"
    # the flood's next request would be served after its own tail: refused, nothing evicted
    again = auction.offer("flood5", "rogue", 0.0, 0.2, False)
    assert isinstance(again, Rejected)
    served = [a.request_id for a in auction.release(0.2, slots=5)]
    assert served == ["flood0", "coop", "flood1", "flood2", "flood3"]


def test_an_unserved_tail_gives_its_tag_back_to_its_caller() -> None:
    auction = _auction()
    auction.offer("a0", "a", 0.0, 0.0, False)
    auction.offer("a1", "a", 0.0, 0.0, False)
    auction.offer("b0", "b", 0.0, 0.0, False)
    auction.offer("b1", "b", 0.0, 0.0, False)
    assert auction.cancel("a1", 0.0)
    auction.offer("a2", "a", 0.0, 0.0, False)  # takes a1's tag 1: level with b1, arrived later
    served = [x.request_id for x in auction.release(0.0, slots=4)]
    assert served == ["a0", "b0", "b1", "a2"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(1, 4)), min_size=1, max_size=12))
def test_with_equal_bids_no_backlogged_caller_is_served_twice_before_another_once(bursts) -> None:
    """Any arrival pattern at one instant, served one slot at a time: while two callers both
    have requests waiting, their served counts never differ by more than one (round robin)."""
    auction = _auction(max_queue=1000)
    n = 0
    for caller, count in bursts:
        for _ in range(count):
            n += 1
            auction.offer(f"r{n}", caller, 0.0, 0.0, False)
    waiting = {c: sum(k for x, k in bursts if x == c) for c in "abc"}
    served = dict.fromkeys("abc", 0)
    while auction.queue_length:
        (won,) = auction.release(0.0)
        served[won.caller] += 1
        waiting[won.caller] -= 1
        busy = [c for c in "abc" if waiting[c] > 0]
        for x in busy:
            for y in busy:
                assert served[x] - served[y] <= 1, (served, waiting)


# --- eviction keeps reservations in the one budget (issue 14, finding 10) --------------------

_churn = st.one_of(
    st.tuples(st.just("offer"), st.sampled_from("abcde"), st.sampled_from([0.0, 30.0, 60.0, 100.0,
                                                                           250.0])),
    st.tuples(st.just("release"), st.integers(0, 2)),
    st.tuples(st.just("expire"), st.floats(0, 2)),
    st.tuples(st.just("cancel"), st.integers(0, 200)),
    st.tuples(st.just("wait"), st.floats(0, 1)),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_churn, max_size=80))
def test_a_callers_waiting_bids_never_exceed_the_cap_whatever_the_churn(steps) -> None:
    """Offers into a full queue (evicting), clearings, expiries and cancellations, with fewer
    budget slots than callers: the bids a caller has waiting never add up past ``budget_cap``,
    and its budget's reservation is exactly their sum."""
    cap = 100.0
    auction = _auction(budget_rate=0.0, budget_cap=cap, max_queue=3, max_callers=2)
    now, n = 0.0, 0
    waiting: dict[str, tuple[str, float]] = {}  # request id -> (caller, effective bid)
    for step in steps:
        if step[0] == "offer":
            n += 1
            result = auction.offer(f"r{n}", step[1], step[2], now, slot_available=False)
            if isinstance(result, Queued):
                if result.evicted is not None:
                    del waiting[result.evicted]
                waiting[result.request_id] = (step[1], result.bid)
        elif step[0] == "release":
            for admission in auction.release(now, step[1]):
                del waiting[admission.request_id]
        elif step[0] == "expire":
            for request_id in auction.expire(now, step[1]):
                del waiting[request_id]
        elif step[0] == "cancel":
            request_id = f"r{step[1]}"
            if auction.cancel(request_id, now):
                del waiting[request_id]
        else:
            now += step[1]
        held: dict[str, float] = {}
        for caller, bid in waiting.values():
            held[caller] = held.get(caller, 0.0) + bid
        views = auction.snapshot(now, held).budgets
        for caller, total in held.items():
            assert total <= cap + 1e-9, f"{caller} holds {total} in bids against a cap of {cap}"
            assert caller in views, f"{caller} has bids waiting but no budget"
            assert math.isclose(views[caller].reserved, total, abs_tol=1e-9)


def test_evicting_a_zero_bid_does_not_refill_a_budget_nor_orphan_the_bidders() -> None:
    """The replayed attack: caller ``a`` spends its whole cap on one bid, then waits with a bid
    of 0 that evicts nothing; the budget book is full, so the bidder's budget was dropped when
    the evicted caller's was re-created, and ``a`` could reserve its cap twice."""
    auction = _auction(budget_rate=0.0, budget_cap=100.0, max_queue=2, max_callers=1)
    assert isinstance(auction.offer("r1", "a", 100.0, 0.0, False), Queued)
    assert isinstance(auction.offer("r2", "z", 0.0, 0.0, False), Queued)
    evicting = auction.offer("r3", "a", 100.0, 0.0, False)
    # a's budget is all reserved by r1: its new bid is capped at 0 and cannot evict z's 0
    assert isinstance(evicting, Rejected)
    other = auction.offer("r4", "b", 50.0, 0.0, False)
    assert isinstance(other, Queued) and other.evicted == "r2"
    again = auction.offer("r5", "a", 100.0, 0.0, False)
    assert isinstance(again, Rejected | Queued)
    if isinstance(again, Queued):
        assert again.bid == 0.0
    views = auction.snapshot(0.0, "ab").budgets
    assert views["a"].reserved == 100.0 and views["b"].reserved == 50.0
