"""mesh.admission: the inbound admission gate, step by step on hand-made cases.

Every case drives the gate with a clock of plain numbers; a concurrency limit pinned to a
fixed number of slots (``min = max = initial = probe_limit``) keeps the slot count exact.
"""

from __future__ import annotations

import pytest

from mesh.admission import (
    AdmissionGate,
    Admit,
    Pass,
    Queue,
    Reject,
    RejectReason,
)
from mesh.auction import AuctionParams, SecondPriceAuction
from mesh.concurrency import AdaptiveConcurrencyLimit, ConcurrencyParams
from mesh.reputation import LadderRules, Phase, PolicingParams, ReputationBook


def make_gate(
    limit: int = 1,
    *,
    max_queue: int = 1000,
    max_wait: float = 2.0,
    capacity: float | None = None,
    policing: PolicingParams | None = None,
    limiter: AdaptiveConcurrencyLimit | None = None,
) -> AdmissionGate:
    pinned = ConcurrencyParams(initial_limit=limit, min_limit=limit, max_limit=limit,
                               probe_limit=limit, probe_samples=1)
    return AdmissionGate(
        book=ReputationBook(policing),
        limiter=limiter or AdaptiveConcurrencyLimit(pinned),
        auction=SecondPriceAuction(AuctionParams(max_queue=max_queue)),
        max_wait=max_wait, capacity=capacity,
    )


def arrive(gate: AdmissionGate, caller: str, now: float, bid: float = 0.0
           ) -> Admit | Queue | Reject:
    """One request through both steps (police, then offer)."""
    policed = gate.police(caller, bid, now)
    assert isinstance(policed, Pass), policed
    return gate.offer(policed, now)


def queued(outcome: Admit | Queue | Reject) -> Queue:
    assert isinstance(outcome, Queue), outcome
    return outcome


# --- slots ----------------------------------------------------------------------------------


def test_a_free_slot_is_taken_at_price_0_and_returned_on_finish() -> None:
    gate = make_gate(limit=1)
    first = arrive(gate, "a", 0.0, bid=5)
    assert isinstance(first, Admit) and first.price == 0 and first.waited == 0
    assert first.woken == () and gate.limiter.in_flight == 1
    second = queued(arrive(gate, "b", 0.1, bid=2))
    assert second.queue_length == 1 and second.deadline == pytest.approx(2.1)
    assert gate.congestion() == 1.0 and gate.book.congested  # someone waits: level 1
    # the slot comes back and goes straight to the waiter (alone: it pays 0)
    (handed,) = gate.finish(0.5, rtt=0.5)
    assert handed == Admit(second.request_id, "b", 2.0, 0.0, pytest.approx(0.4))
    assert gate.limiter.in_flight == 1 and gate.queue_length == 0
    assert gate.finish(0.6) == () and gate.limiter.in_flight == 0  # ended without an RTT
    assert gate.congestion() == 0.0


def test_a_slot_that_frees_while_others_wait_goes_through_the_queue() -> None:
    gate = make_gate(limit=2)
    arrive(gate, "a", 0.0)
    arrive(gate, "b", 0.0)
    waiter = queued(arrive(gate, "c", 0.0, bid=1))
    gate.limiter.on_abandon(0.1)  # a slot frees behind the gate's back: nobody was told yet
    # a newcomer finds the free slot but may not jump the queue: the better bid gets it
    late = arrive(gate, "d", 0.2, bid=0)
    assert isinstance(late, Queue)
    assert late.woken == (Admit(waiter.request_id, "c", 1.0, 0.0, pytest.approx(0.2)),)
    assert gate.waiting() == (late.request_id,) and gate.limiter.in_flight == 2


def test_a_higher_bid_arriving_at_a_free_slot_wins_it_at_the_second_price() -> None:
    gate = make_gate(limit=2)
    arrive(gate, "a", 0.0)
    arrive(gate, "b", 0.0)
    waiter = queued(arrive(gate, "c", 0.0, bid=1))
    gate.limiter.on_abandon(0.1)
    rich = arrive(gate, "d", 0.2, bid=5)  # queued, then the release right after picks it
    assert isinstance(rich, Admit) and rich.price == 1.0 and rich.woken == ()
    assert gate.waiting() == (waiter.request_id,)


def test_a_grown_limit_releases_several_waiters_at_once() -> None:
    # the first minRTT probe pins the limit to 1; when it ends the limit is 3 (min_limit 1:
    # a probe never pins the limit below min_limit)
    limiter = AdaptiveConcurrencyLimit(ConcurrencyParams(
        initial_limit=3, min_limit=1, max_limit=3, probe_limit=1, probe_samples=1))
    gate = make_gate(limiter=limiter)
    assert isinstance(arrive(gate, "a", 0.0), Admit)
    b, c = queued(arrive(gate, "b", 0.0, bid=2)), queued(arrive(gate, "c", 0.0, bid=4))
    released = gate.finish(0.1, rtt=0.1)
    assert [(x.request_id, x.price) for x in released] == [(c.request_id, 0.0),
                                                           (b.request_id, 0.0)]
    assert gate.limiter.limit == 3 and gate.limiter.in_flight == 2


# --- the queue: order, prices, bounds --------------------------------------------------------


def test_slots_go_to_the_highest_bid_at_the_highest_losing_bid_ties_by_arrival() -> None:
    gate = make_gate(limit=1)
    arrive(gate, "a", 0.0)
    low = queued(arrive(gate, "b", 0.0, bid=1))
    high = queued(arrive(gate, "c", 0.0, bid=5))
    mid = queued(arrive(gate, "d", 0.0, bid=3))
    mid_too = queued(arrive(gate, "e", 0.0, bid=3))
    order = [gate.finish(t, rtt=0.1)[0] for t in (1.0, 2.0, 3.0, 4.0)]
    assert [(x.request_id, x.price) for x in order] == [
        (high.request_id, 3.0), (mid.request_id, 3.0), (mid_too.request_id, 1.0),
        (low.request_id, 0.0)]
    assert gate.auction.last_price == 0.0


def test_a_flood_waits_behind_itself_not_in_front_of_other_callers() -> None:
    """The soak's failure: one caller's 200 waiters in a shared FIFO made every other caller's
    request wait out ``max_wait`` behind them. With fair queueing among equal bids, each other
    caller's request is admitted within one release per caller backlogged."""
    gate = make_gate(limit=1, max_queue=1000)
    arrive(gate, "rogue", 0.0)
    for i in range(200):
        queued(arrive(gate, "rogue", 0.001 * i))
    coop = [queued(arrive(gate, f"coop-{k}", 0.5)) for k in range(3)]
    admitted = [gate.finish(0.6 + 0.01 * i, rtt=0.01)[0] for i in range(4)]
    assert {a.request_id for a in admitted} >= {q.request_id for q in coop}
    assert all(a.waited < 0.2 for a in admitted if a.caller != "rogue")


def test_a_full_queue_sheds_the_floods_tail_for_another_callers_request() -> None:
    gate = make_gate(limit=1, max_queue=3)
    arrive(gate, "rogue", 0.0)
    flood = [queued(arrive(gate, "rogue", 0.0)) for _ in range(3)]
    coop = queued(arrive(gate, "coop", 0.1))
    assert coop.woken == (Reject(flood[-1].request_id, "rogue", RejectReason.QUEUE_FULL, 1,
                                 queued=True),)
    refused = arrive(gate, "rogue", 0.2)
    assert isinstance(refused, Reject) and refused.reason is RejectReason.QUEUE_FULL
    assert not refused.queued


def test_a_full_queue_refuses_a_bid_no_higher_and_evicts_for_a_higher_one() -> None:
    gate = make_gate(limit=1, max_queue=2)
    arrive(gate, "a", 0.0)
    low = queued(arrive(gate, "b", 0.0, bid=1))
    queued(arrive(gate, "c", 0.0, bid=3))
    refused = arrive(gate, "d", 0.1, bid=1)
    assert isinstance(refused, Reject) and refused.reason is RejectReason.QUEUE_FULL
    assert not refused.queued and refused.retry_after == 1 and refused.woken == ()
    high = queued(arrive(gate, "e", 0.2, bid=8))
    assert high.woken == (Reject(low.request_id, "b", RejectReason.QUEUE_FULL, 1, queued=True),)
    assert gate.queue_length == 2 and low.request_id not in gate.waiting()


# --- standing: bids beyond the norm, the punished flush ------------------------


def test_a_request_beyond_the_norm_of_a_congested_app_bids_0() -> None:
    # capacity 4 shared by 2 callers: share 2, norm max(rate_floor 2, 1.5 * 2) = 3 requests/s
    # (coop asks for its whole share, 2/s, so the water level is the equal share too)
    gate = make_gate(limit=2, capacity=4.0)
    arrive(gate, "coop", 0.0)
    assert isinstance(gate.police("coop", 1.0, 0.0), Pass)  # a second request: rate 2
    arrive(gate, "flood", 0.0)  # both slots in use: congestion 1
    assert gate.book.congested
    second, third = (gate.police("flood", 5.0, 0.0) for _ in range(2))  # rates 2 and 3
    assert isinstance(second, Pass) and not second.beyond_norm and second.bid == 5.0
    assert isinstance(third, Pass) and not third.beyond_norm
    fourth = gate.police("flood", 5.0, 0.0)  # rate 4 > 3
    assert isinstance(fourth, Pass) and fourth.beyond_norm and fourth.voided
    assert fourth.bid == 0.0 and fourth.decision.fair_share == 2.0
    assert fourth.decision.norm_share == 2.0
    zero = gate.police("flood", 0.0, 0.0)
    assert isinstance(zero, Pass) and zero.beyond_norm and not zero.voided  # nothing to void
    # the voided request ranks behind a cooperative caller's bid of 1
    flood = queued(gate.offer(fourth, 0.0))
    coop = queued(arrive(gate, "coop", 0.0, bid=1))
    assert (gate.finish(1.0, rtt=1.0)[0].request_id,
            gate.finish(1.0, rtt=1.0)[0].request_id) == (coop.request_id, flood.request_id)


def test_a_request_beyond_the_norm_takes_a_free_slot_at_price_0() -> None:
    # 10 slots, capacity 2 for 3 callers: share 2/3, norm max(rate_floor 2, 1) = 2 requests/s
    gate = make_gate(limit=10, capacity=2.0)
    arrive(gate, "coop", 0.0)
    for _ in range(7):
        arrive(gate, "other", 0.0)  # 8 of 10 in use: congested (0.8), over half the limit
    assert gate.book.congested and gate.limiter.in_flight == 8
    for _ in range(2):
        assert not gate.police("flood", 5.0, 0.0).beyond_norm  # type: ignore[union-attr]
    policed = gate.police("flood", 5.0, 0.0)  # rate 3 > 2
    assert isinstance(policed, Pass) and policed.beyond_norm
    # a slot is free and nobody waits: it is admitted at once, its bid voided (price 0)
    admitted = gate.offer(policed, 0.0)
    assert isinstance(admitted, Admit) and admitted.price == 0 and admitted.waited == 0
    assert gate.limiter.in_flight == 9 and gate.queue_length == 0


def test_a_newly_punished_caller_is_flushed_from_the_queue() -> None:
    # share 1 of capacity 2, norm 2 requests/s; reputation reacts in 0.1 s; 10 s punishments
    policing = PolicingParams(reputation_tau=0.1, deterrence_margin=0.0,
                              ladder=LadderRules(base_punishment=10.0))
    gate = make_gate(limit=1, capacity=2.0, policing=policing)
    arrive(gate, "coop", 0.0)  # holds the slot: congested
    flood = [queued(arrive(gate, "flood", 0.0, bid=2)) for _ in range(3)]
    coop = queued(arrive(gate, "coop", 0.5, bid=1))
    # a second later the flood is still over the norm: its reputation falls, it is punished;
    # its throttle starts with one token, so this request passes and the queued flood leaves
    punished = gate.police("flood", 2.0, 1.0)
    assert isinstance(punished, Pass) and punished.decision.phase is Phase.PUNISHED
    assert punished.woken == tuple(
        Reject(q.request_id, "flood", RejectReason.PUNISHED, 10, queued=True) for q in flood)
    assert gate.waiting() == (coop.request_id,)
    late = queued(gate.offer(punished, 1.0))  # queued while punished: not flushed later
    refused = gate.police("flood", 2.0, 1.0)  # the throttle is empty now
    assert isinstance(refused, Reject) and refused.reason is RejectReason.PUNISHED
    assert not refused.queued and refused.retry_after == 10 and refused.woken == ()
    assert refused.decision is not None and refused.decision.level == 1
    assert gate.waiting() == (coop.request_id, late.request_id)
    # the flushed requests' budget reservations were released with them
    assert gate.auction.snapshot(1.0, ["flood"]).budgets["flood"].reserved == 0.0


def test_a_defection_lowers_the_reputation_over_the_gap_without_counting_a_request() -> None:
    # reputation_tau 2: a defection 2 s after the last request leaves r = exp(-1) = 0.368,
    # under the trigger (0.5): punished for the base 10 s (no deterrent: margin 0)
    policing = PolicingParams(reputation_tau=2.0, deterrence_margin=0.0,
                              ladder=LadderRules(base_punishment=10.0))
    gate = make_gate(limit=1, policing=policing)
    arrive(gate, "slow", 0.0)
    rate_before = gate.book.standing("slow", 2.0)
    assert rate_before is not None
    assert gate.defect("slow", 2.0) == ()
    after = gate.book.standing("slow", 2.0)
    assert after is not None
    assert after.reputation == pytest.approx(0.36788, abs=1e-5)
    assert after.phase is Phase.PUNISHED and after.level == 1
    assert after.punished_for == pytest.approx(10.0)
    assert after.rate == pytest.approx(rate_before.rate)  # no request was added


def test_a_defection_half_a_time_constant_later_is_not_yet_a_punishment() -> None:
    # r = exp(-0.5) = 0.607 >= 0.5: recorded, not punished; a second one 1 s later (another
    # half time constant) gives 0.607 * 0.607 = 0.368: punished
    policing = PolicingParams(reputation_tau=2.0, deterrence_margin=0.0)
    gate = make_gate(limit=1, policing=policing)
    arrive(gate, "slow", 0.0)
    gate.defect("slow", 1.0)
    first = gate.book.standing("slow", 1.0)
    assert first is not None and first.reputation == pytest.approx(0.60653, abs=1e-5)
    assert first.phase is Phase.GOOD
    gate.defect("slow", 2.0)
    second = gate.book.standing("slow", 2.0)
    assert second is not None and second.reputation == pytest.approx(0.36788, abs=1e-5)
    assert second.phase is Phase.PUNISHED


def test_a_defection_that_punishes_flushes_the_callers_waiters() -> None:
    policing = PolicingParams(reputation_tau=2.0, deterrence_margin=0.0,
                              ladder=LadderRules(base_punishment=10.0))
    gate = make_gate(limit=1, policing=policing)
    arrive(gate, "other", 0.0)  # holds the slot
    waiter = queued(arrive(gate, "slow", 0.0))
    assert gate.defect("slow", 2.0) == (
        Reject(waiter.request_id, "slow", RejectReason.PUNISHED, 10, queued=True),)
    assert gate.waiting() == ()


# --- leaving: timeouts, clients that go, shutdown ---------------------------------------------


def test_timeouts_follow_the_passed_clock() -> None:
    gate = make_gate(limit=1, max_wait=1.0)
    arrive(gate, "a", 0.0)
    early = queued(arrive(gate, "b", 0.0, bid=3))
    later = queued(arrive(gate, "c", 0.5, bid=1))
    assert early.deadline == 1.0 and later.deadline == 1.5
    assert gate.expire(1.0) == ()  # exactly max_wait is still within it
    assert gate.expire(1.2) == (Reject(early.request_id, "b", RejectReason.QUEUE_TIMEOUT, 1,
                                       queued=True),)
    # a waiter's own timer: the same refusal, for that waiter only
    assert gate.time_out(later, 1.5) == Reject(later.request_id, "c",
                                               RejectReason.QUEUE_TIMEOUT, 1, queued=True)
    assert gate.queue_length == 0 and gate.limiter.in_flight == 1
    assert gate.auction.snapshot(1.5, ["b", "c"]).budgets["b"].reserved == 0.0
    assert gate.congestion() == 1.0  # the slot is still taken


def test_a_waiter_that_leaves_gives_up_its_place_and_nothing_else() -> None:
    gate = make_gate(limit=1)
    arrive(gate, "a", 0.0)
    gone = queued(arrive(gate, "b", 0.0, bid=4))
    stays = queued(arrive(gate, "c", 0.0, bid=1))
    assert gate.withdraw(gone.request_id, 0.1)
    assert not gate.withdraw(gone.request_id, 0.1)  # not waiting any more
    assert gate.waiting() == (stays.request_id,) and gate.limiter.in_flight == 1
    (handed,) = gate.finish(0.2, rtt=0.2)
    assert handed.request_id == stays.request_id and handed.price == 0.0


def test_closing_sends_every_waiter_away() -> None:
    gate = make_gate(limit=1)
    arrive(gate, "a", 0.0)
    waiters = [queued(arrive(gate, c, 0.0, bid=1)) for c in ("b", "c")]
    assert gate.close(0.1) == tuple(
        Reject(q.request_id, q.caller, RejectReason.SHUTTING_DOWN, 1, queued=True)
        for q in waiters)
    assert gate.queue_length == 0 and gate.waiting() == ()


# --- inputs ---------------------------------------------------------------------------------


def test_capacity_is_configured_or_learned() -> None:
    assert make_gate(capacity=7.0).capacity() == 7.0
    gate = make_gate(limit=2)
    assert gate.capacity() == gate.book.params.capacity  # nothing learned yet
    arrive(gate, "a", 0.0)
    gate.finish(0.05, rtt=0.05)  # the probe's one sample: minRTT 50 ms
    assert gate.capacity() == pytest.approx(2 / 0.05)


@pytest.mark.parametrize("kwargs", [{"max_wait": -1.0}, {"max_wait": float("nan")},
                                    {"capacity": 0.0}, {"capacity": float("inf")}])
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AdmissionGate(**kwargs)  # type: ignore[arg-type]


# --- a streaming call's slot time ---------------------------------------------------------------


def test_a_short_hold_is_one_request_and_costs_nothing_more() -> None:
    gate = make_gate(limit=2, capacity=10.0)  # a slot serves 5 requests/s
    arrive(gate, "chat", 0.0)
    before = gate.book.standing("chat", 0.1)
    assert gate.charge_hold("chat", 0.1, 0.1) == ()  # 0.5 request-equivalents: none extra
    after = gate.book.standing("chat", 0.1)
    assert before is not None and after is not None and after.rate == before.rate


def test_a_long_hold_under_congestion_counts_as_the_requests_it_displaced() -> None:
    """30 s of a slot at 5 requests/s per slot is 149 requests more: under congestion that
    caller is far over its fair share, so it is punished as a heavy caller would be, and its
    queued request is sent away."""
    policing = PolicingParams(deterrence_margin=0.0, ladder=LadderRules(base_punishment=10.0))
    gate = make_gate(limit=1, capacity=5.0, max_wait=60.0, policing=policing)
    arrive(gate, "chat", 0.0)  # its stream holds the only slot
    waiter = queued(arrive(gate, "chat", 0.0))  # congested: someone waits
    rate_before = gate.book.standing("chat", 30.0)
    assert isinstance(gate.police("other", 0.0, 29.0), Pass)  # someone it crowds out
    woken = gate.charge_hold("chat", 30.0, 30.0)
    after = gate.book.standing("chat", 30.0)
    assert rate_before is not None and after is not None
    assert after.rate > rate_before.rate + 1.0
    assert after.phase is Phase.PUNISHED
    assert [w.request_id for w in woken] == [waiter.request_id]


def test_a_long_hold_without_congestion_is_not_punished() -> None:
    gate = make_gate(limit=4, capacity=20.0)
    arrive(gate, "chat", 0.0)
    gate.charge_hold("chat", 30.0, 30.0)
    after = gate.book.standing("chat", 30.0)
    assert after is not None and after.phase is Phase.GOOD
