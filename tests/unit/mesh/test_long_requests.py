"""Long requests at the admission gate (mesh.admission, *Long requests*; mesh.concurrency's
``long_after``, ``park`` and ``on_parked_end``): hand-computed cases on the pure core."""

from __future__ import annotations

import math

import pytest

from mesh.admission import AdmissionGate, Admit, Pass, Queue
from mesh.concurrency import AdaptiveConcurrencyLimit, ConcurrencyParams

LIMIT = 3


def gate(limit: int = LIMIT, **kwargs: object) -> AdmissionGate:
    params = ConcurrencyParams(initial_limit=limit, min_limit=1, max_limit=limit,
                               probe_limit=limit, probe_samples=1, long_after=1.0,
                               long_factor=10.0)
    g = AdmissionGate(limiter=AdaptiveConcurrencyLimit(params), **kwargs)  # type: ignore[arg-type]
    first = admit(g, "warm-up", 0.0)  # the first probe: minRTT 10 ms
    g.finish(0.01, 0.01, first.slot)
    assert not g.limiter.probing and g.limiter.min_rtt == 0.01
    return g


def offer(g: AdmissionGate, caller: str, now: float) -> Admit | Queue:
    passed = g.police(caller, 0.0, now)
    assert isinstance(passed, Pass)
    out = g.offer(passed, now)
    assert isinstance(out, Admit | Queue)
    return out


def admit(g: AdmissionGate, caller: str, now: float) -> Admit:
    out = offer(g, caller, now)
    assert isinstance(out, Admit), out
    return out


def test_an_old_overtaken_request_is_parked_and_its_slot_serves_others() -> None:
    g = gate()
    polls = [admit(g, "watcher", 1.0) for _ in range(2)]
    quick = admit(g, "client", 1.1)
    g.finish(1.11, 0.01, quick.slot)  # admitted after the polls, answered: they are overtaken
    assert g.limiter.in_flight == 2 and g.long_running == 0
    # 0.5 s on: not long yet (long_after 1 s; 10 x the standing RTT is 0.1 s)
    third = offer(g, "client", 1.5)
    assert isinstance(third, Admit) and g.limiter.in_flight == 3
    assert isinstance(offer(g, "client", 1.6), Queue)  # three slots: full
    # at 2.0 the polls are 1 s old: parked, and their slots go to the waiter and a newcomer
    more = g.finish(2.01, None, third.slot)
    assert g.long_running == 2 and g.parked_total == 2
    assert len(more) == 1 and g.limiter.in_flight == 1
    assert isinstance(offer(g, "client", 2.01), Admit)
    assert isinstance(offer(g, "client", 2.01), Admit)
    assert g.limiter.congestion_level() == 1.0  # the polls are not in the level
    # a parked request's end frees no slot it does not hold and teaches nothing
    window = list(g.limiter._window)
    g.finish(9.0, 8.0, polls[0].slot)
    assert g.long_running == 1 and g.limiter.in_flight == 3
    assert g.limiter._window == window
    g.finish(9.5, 8.5, polls[1].slot)
    assert g.long_running == 0 and g.limiter.long_running == 0


def test_requests_nobody_overtook_stay_counted_but_for_one_scout() -> None:
    """An app that serves in order (or hangs) overtakes nobody: its slow requests keep their
    slots; when the slots are full of them, one is parked as a scout, and no second before a
    later request is answered."""
    g = gate()
    stuck = [admit(g, "c", 1.0 + 0.01 * i) for i in range(LIMIT)]
    assert isinstance(offer(g, "c", 1.5), Queue)
    assert g.long_running == 0  # not old yet
    woken = g.release(2.05)  # 1 s old, the slots full, nobody overtaken: the scout
    assert g.long_running == 1 and len(woken) == 1
    scout_taker = woken[0]
    assert isinstance(offer(g, "c", 2.1), Queue)
    assert g.release(5.0) == () and g.long_running == 1  # no second scout: nothing answered
    assert isinstance(offer(g, "c", 5.0), Queue)
    # the request let in is answered: the stuck ones were overtaken after all
    woken = g.finish(5.1, 3.0, scout_taker.slot)
    assert g.long_running == LIMIT and len(woken) == 2
    for request in stuck:
        g.finish(6.0, 5.0, request.slot)
    assert g.long_running == 0


def test_the_scout_ends_and_another_may_go() -> None:
    g = gate()
    stuck = [admit(g, "c", 1.0) for _ in range(LIMIT)]
    assert isinstance(offer(g, "c", 1.0), Queue)
    (taker,) = g.release(2.1)
    g.finish(2.2, None, stuck[0].slot)  # the scout itself ends (its client left)
    g.finish(2.2, None, taker.slot)  # and so does the one let in, unanswered
    assert g.long_running == 0 and g.limiter.in_flight == 2
    assert isinstance(offer(g, "c", 2.3), Admit)  # the third slot
    assert isinstance(offer(g, "c", 2.3), Admit)  # the slots are full: a new scout
    assert g.long_running == 1
    assert isinstance(offer(g, "c", 2.3), Queue)  # and only one


def test_a_caller_parks_at_most_its_cap() -> None:
    g = gate(limit=4, max_long_per_caller=2)
    polls = [admit(g, "watcher", 1.0) for _ in range(3)]
    quick = admit(g, "client", 1.1)
    g.finish(1.11, 0.01, quick.slot)
    admit(g, "client", 2.5)  # 1.5 s on: two of the watcher's polls are parked, not three
    assert g.long_running == 2 and g.limiter.in_flight == 2
    g.finish(9.0, 8.0, polls[0].slot)  # one ends: the third may take its place
    admit(g, "client", 9.0)
    assert g.long_running == 2 and g.limiter.in_flight == 2


def test_long_after_follows_the_standing_rtt_and_the_probe() -> None:
    params = ConcurrencyParams(initial_limit=5, probe_limit=2, probe_samples=2,
                               long_after=1.0, long_factor=10.0)
    limiter = AdaptiveConcurrencyLimit(params)
    assert limiter.long_after() == 1.0  # nothing known: the floor
    assert limiter.on_start(0.0) and limiter.probing
    limiter.on_finish(0.05, 0.05)
    assert limiter.long_after() == pytest.approx(0.5)  # in a probe: 10 x the least known
    limiter._probe_rtts = [0.05, 0.02]
    assert limiter.long_after() == pytest.approx(0.2)
    assert limiter.on_start(0.05)
    limiter.on_finish(0.03, 0.08)
    assert not limiter.probing and limiter.min_rtt == 0.02
    assert limiter.long_after() == 1.0  # out of the probe: the floor first
    limiter._sample_rtt = 0.5
    assert limiter.long_after() == pytest.approx(5.0)


def test_park_and_its_end_keep_the_counts() -> None:
    limiter = AdaptiveConcurrencyLimit()
    limiter.park()  # nothing in flight: nothing to park
    assert limiter.long_running == 0 and limiter.in_flight == 0
    assert limiter.on_start(0.0)
    limiter.park()
    assert limiter.in_flight == 0 and limiter.long_running == 1
    assert limiter.snapshot().long_running == 1
    limiter.on_parked_end()
    limiter.on_parked_end()
    assert limiter.long_running == 0


def test_an_unknown_slot_ends_the_oldest_counted() -> None:
    g = gate()
    first = admit(g, "c", 1.0)
    second = admit(g, "c", 1.2)
    g.finish(1.3, 0.05)  # no slot given (an older caller of finish): the oldest counted
    assert g.limiter.in_flight == 1
    g.finish(1.4, None, second.slot)
    assert g.limiter.in_flight == 0
    g.finish(1.5, None, first.slot)  # already ended as the unknown one: nothing more
    assert g.limiter.in_flight == 0


@pytest.mark.parametrize("bad", [{"long_after": 0.0}, {"long_after": math.nan},
                                 {"long_factor": 0.0}, {"long_factor": math.nan}])
def test_long_params_are_validated(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="long_after"):
        ConcurrencyParams(**bad)


def test_long_after_inf_is_never_also_in_a_probe() -> None:
    limiter = AdaptiveConcurrencyLimit(ConcurrencyParams(long_after=math.inf))
    assert limiter.on_start(0.0) and limiter.probing
    limiter.on_finish(0.01, 0.01)
    assert limiter.long_after() == math.inf


def test_an_admit_handed_to_its_own_offer_keeps_its_slot() -> None:
    """The review's finding: a newcomer admitted by the release its own offer ran (someone
    waited, and parking freed a slot) came back with slot 0, and its end finished another
    request's slot."""
    g = gate()
    polls = [admit(g, "watcher", 1.0) for _ in range(2)]
    quick = admit(g, "client", 1.1)
    g.finish(1.11, 0.01, quick.slot)
    admit(g, "client", 1.2)
    waiter = offer(g, "client", 1.3)  # bids 0
    assert isinstance(waiter, Queue)
    passed = g.police("late", 5.0, 2.5)
    assert isinstance(passed, Pass)
    # the polls are parked: two slots free in this offer's release, and the higher bid
    # takes one of them, after the waiter's
    own = g.offer(passed, 2.5)
    assert isinstance(own, Admit) and own.slot != 0, own
    assert [w.request_id for w in own.woken] == [waiter.request_id]
    in_flight = g.limiter.in_flight
    g.finish(2.6, 0.1, own.slot)
    assert g.limiter.in_flight == in_flight - 1
    g.finish(2.7, 0.1, own.slot)  # finished twice: nothing more
    assert g.limiter.in_flight == in_flight - 1
    for poll in polls:
        g.finish(9.0, 8.0, poll.slot)
    assert g.long_running == 0


def test_long_max_caps_what_is_parked() -> None:
    params = ConcurrencyParams(initial_limit=4, min_limit=1, max_limit=4, probe_limit=4,
                               probe_samples=1, long_max=2)
    g = AdmissionGate(limiter=AdaptiveConcurrencyLimit(params))
    first = admit(g, "w", 0.0)
    g.finish(0.01, 0.01, first.slot)
    polls = [admit(g, f"w{i}", 1.0) for i in range(3)]
    quick = admit(g, "c", 1.1)
    g.finish(1.11, 0.01, quick.slot)
    admit(g, "c", 2.5)
    assert g.long_running == 2 and g.limiter.in_flight == 2
    g.finish(3.0, 2.0, polls[0].slot)
    admit(g, "c", 3.0)  # room again: the third poll is parked
    assert g.long_running == 2


def test_nothing_is_parked_while_the_app_queues() -> None:
    """A many-worker app overtakes its slow requests all the time; while its standing RTT
    says it queues, they are work waiting, not long polls (the review's finding)."""
    g = gate()
    slow = [admit(g, "c", 1.0) for _ in range(2)]
    quick = admit(g, "c", 1.1)
    g.limiter._sample_rtt = 0.5  # minRTT 10 ms: far past the tolerance
    g.finish(1.2, 0.1, quick.slot)
    admit(g, "c", 2.5)
    assert g.long_running == 0 and g.limiter.in_flight == 3
    g.limiter._sample_rtt = 0.011  # no queueing: they may be parked
    admit(g, "c", 2.6)
    assert g.long_running == 2
    for request in slow:
        g.finish(3.0, 2.0, request.slot)


def test_an_error_answer_overtakes_nobody() -> None:
    """An app that sheds load with quick 503s has served nothing around its slow requests."""
    g = gate()
    slow = [admit(g, "c", 1.0) for _ in range(2)]
    failed = admit(g, "c", 1.1)
    g.finish(1.11, 0.01, failed.slot, overtakes=False)
    admit(g, "c", 2.5)
    assert g.long_running == 0
    for request in slow:
        g.finish(3.0, 2.0, request.slot)


def test_a_declared_long_request_is_admitted_outside_the_limit_within_the_caps() -> None:
    """A reconnect storm (a stranger's finding): more watches at once than the limit took
    every slot before any could be overtaken, and quick requests were refused until the
    first watch ended. Declared long (its path, an event stream), a watch takes no slot."""
    g = gate(limit=2, max_long_per_caller=3)
    for _ in range(2):
        admit(g, "client", 1.0)  # the limit is full
    passed = g.police("watcher", 0.0, 1.0)
    assert isinstance(passed, Pass)
    watches = [g.offer(passed, 1.0, long=True) for _ in range(3)]
    assert all(isinstance(w, Admit) and w.slot for w in watches)
    assert g.long_running == 3 and g.limiter.long_running == 3 and g.limiter.in_flight == 2
    assert isinstance(g.offer(passed, 1.0, long=True), Queue)  # past its cap: a slot, or wait
    first = watches[0]
    assert isinstance(first, Admit)
    g.finish(1.5, 0.5, first.slot)
    assert g.long_running == 2 and g.limiter.long_running == 2
