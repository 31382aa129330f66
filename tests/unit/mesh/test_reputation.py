"""mesh.reputation: the cooperative norm, the punishment ladder, and forgiveness.

The scenarios drive a :class:`ReputationBook` with periodic request flows against a simulated
app that serves at most 30 requests in any one second (the rest fail) and reports as its
congestion level the served count of the last second over that capacity. Two cooperative
callers send 10/s each (their fair share with three active callers); the rogue sends 100/s
(ten times its share), every second request a retry.

Hand-computed timings with the defaults (rate_tau 1 s, reputation_tau 2 s, trigger 0.5):
the rogue's rate passes 1.5 x share within 0.2 s and its reputation falls from 1 to 0.5 after
a further 2 ln 2 = 1.39 s, so it is punished at about t = 1.6 s for 10 s (level 1).

The snapshots (what the admin ``/debug/state`` shows) are checked against values computed by
hand: recent counts are exponentially decayed with time constant ``recent_window`` (10 s
here), so an event at ``t`` counts ``exp(-(now - t) / 10)`` at ``now``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.reputation import (
    ANONYMOUS,
    Decision,
    LadderRules,
    Phase,
    PolicingParams,
    PunishmentLadder,
    ReputationBook,
)

CAPACITY = 30.0


@dataclass(frozen=True)
class Flow:
    caller: str
    rate: float
    start: float
    end: float
    retry_every: int = 0  # every n-th request is a retry (0: none)


@dataclass(frozen=True)
class Outcome:
    t: float
    caller: str
    decision: Decision
    served: bool


def simulate(book: ReputationBook, flows: list[Flow]) -> list[Outcome]:
    arrivals = []
    for index, flow in enumerate(flows):
        n, t = 0, flow.start + 0.001 * index
        while t < flow.end:
            retry = flow.retry_every > 0 and n % flow.retry_every == flow.retry_every - 1
            arrivals.append((t, flow.caller, retry))
            n += 1
            t += 1.0 / flow.rate
    arrivals.sort()
    served: deque[float] = deque()
    outcomes = []
    for t, caller, retry in arrivals:
        while served and served[0] <= t - 1.0:
            served.popleft()
        book.update_load(t, len(served) / CAPACITY, capacity=CAPACITY)
        decision = book.admit(caller, t, is_retry=retry)
        was_served = decision.admitted and len(served) < CAPACITY
        if was_served:
            served.append(t)
        outcomes.append(Outcome(t, caller, decision, was_served))
    return outcomes


def of(outcomes: list[Outcome], caller: str, start: float = 0.0,
       end: float = math.inf) -> list[Outcome]:
    return [o for o in outcomes if o.caller == caller and start <= o.t < end]


def retry_afters(outcomes: list[Outcome], caller: str, start: float, end: float) -> list[float]:
    """The Retry-After of every throttled request of ``caller`` in [start, end)."""
    waits = []
    for o in of(outcomes, caller, start, end):
        if not o.decision.admitted:
            assert o.decision.retry_after is not None
            waits.append(o.decision.retry_after)
    return waits


def first_punished(outcomes: list[Outcome], caller: str) -> float:
    return next(o.t for o in of(outcomes, caller) if o.decision.phase is Phase.PUNISHED)


COOPERATIVE = [Flow("alice", 10, 0, 60), Flow("bob", 10, 0, 60)]


def periodic_arrivals(flows: list[Flow]) -> list[tuple[float, str]]:
    """Every flow's requests, evenly spaced at its rate, as (time, caller) in time order (no
    retries; :func:`simulate` is the variant with a served-capacity app)."""
    return sorted((flow.start + k / flow.rate + 0.0001 * i, flow.caller)
                  for i, flow in enumerate(flows)
                  for k in range(int((flow.end - flow.start) * flow.rate)))


def test_rogue_at_ten_times_its_share_is_punished_quickly_and_cooperators_are_untouched() -> None:
    book = ReputationBook()
    outcomes = simulate(book, [*COOPERATIVE, Flow("rogue", 100, 0, 10, retry_every=2)])
    punished_at = first_punished(outcomes, "rogue")
    assert 1.0 < punished_at < 3.0
    throttled = [o.decision for o in of(outcomes, "rogue") if not o.decision.admitted]
    assert throttled, "the rogue must see 429s"
    assert all(d.status == 429 and d.level >= 1 for d in throttled)
    for d in throttled:
        assert d.retry_after is not None and d.retry_after == int(d.retry_after)
        assert 1 <= d.retry_after <= 10
    # throttled to half its fair share (5/s) of the 100/s it sends, after the first burst
    late = of(outcomes, "rogue", punished_at + 2.0, punished_at + 8.0)
    assert sum(o.decision.admitted for o in late) / len(late) < 0.07
    for caller in ("alice", "bob"):
        mine = of(outcomes, caller)
        assert all(o.decision.admitted and o.decision.level == 0 for o in mine)
        assert min(o.decision.reputation for o in mine) > 0.99
        # once the rogue is throttled the app has room for them again
        assert all(o.served for o in of(outcomes, caller, punished_at + 1.5))


def test_retry_after_counts_down_the_remaining_punishment() -> None:
    book = ReputationBook()
    outcomes = simulate(book, [*COOPERATIVE, Flow("rogue", 100, 0, 12, retry_every=2)])
    punished_at = first_punished(outcomes, "rogue")
    for o in of(outcomes, "rogue", punished_at, punished_at + 9.9):
        if not o.decision.admitted:
            assert o.decision.retry_after == math.ceil(punished_at + 10.0 - o.t)


def test_rogue_that_returns_to_its_share_is_forgiven_after_punishment_and_probation() -> None:
    book = ReputationBook()
    flows = [*COOPERATIVE, Flow("rogue", 100, 0, 4, retry_every=2), Flow("rogue", 10, 4, 60)]
    outcomes = simulate(book, flows)
    punished_at = first_punished(outcomes, "rogue")
    ends = punished_at + 10.0
    # cooperated through the punishment: full service from its end, on probation at level 1
    after = of(outcomes, "rogue", ends + 0.01)
    assert all(o.decision.admitted for o in after)
    assert all(o.decision.level == 1 for o in of(outcomes, "rogue", ends + 0.01, ends + 29.9))
    # one clean probation period later it is back in good standing
    back = of(outcomes, "rogue", ends + 30.01)
    assert back and all(o.decision.level == 0 and o.decision.phase is Phase.GOOD for o in back)
    assert back[-1].decision.reputation > 0.99
    standing = book.standing("rogue", 60.0)
    assert standing is not None and standing.punishments == 1


def test_defecting_again_during_probation_climbs_to_a_longer_punishment() -> None:
    book = ReputationBook()
    flows = [
        *COOPERATIVE,
        Flow("rogue", 100, 0, 4, retry_every=2),
        Flow("rogue", 10, 4, 20),
        Flow("rogue", 100, 20, 30, retry_every=2),  # the first punishment ended near t = 11.6
    ]
    outcomes = simulate(book, flows)
    second = next(o for o in of(outcomes, "rogue", 20.0) if o.decision.phase is Phase.PUNISHED)
    assert second.decision.level == 2
    waits = retry_afters(outcomes, "rogue", second.t, second.t + 1.0)
    assert waits and max(waits) == 20  # level 2 lasts base * 2 = 20 s
    assert max(retry_afters(outcomes, "rogue", 0.0, 4.0)) == 10
    # harsher too: a quarter of its fair share instead of a half
    late = of(outcomes, "rogue", second.t + 2.0, 30.0)
    assert sum(o.decision.admitted for o in late) / len(late) < 0.04


def test_flooding_through_the_punishment_escalates_at_its_end() -> None:
    book = ReputationBook()
    outcomes = simulate(book, [*COOPERATIVE, Flow("rogue", 100, 0, 15, retry_every=2)])
    punished_at = first_punished(outcomes, "rogue")
    levels = [o.decision.level for o in of(outcomes, "rogue", punished_at + 10.05, 15.0)]
    assert levels and set(levels) == {2}


def test_silence_through_the_punishment_is_cooperation() -> None:
    book = ReputationBook()
    flows = [*COOPERATIVE, Flow("rogue", 100, 0, 3, retry_every=2), Flow("rogue", 10, 45, 50)]
    outcomes = simulate(book, flows)
    assert any(o.decision.level == 1 for o in of(outcomes, "rogue", 0, 3))
    back = of(outcomes, "rogue", 45)
    assert all(o.decision.admitted and o.decision.level == 0 for o in back)


def test_heavy_caller_is_not_policed_while_the_app_has_spare_capacity() -> None:
    book = ReputationBook()
    book.update_load(0.0, congestion=0.1, capacity=100.0)
    for i in range(2000):  # 200/s for 10 s, ten times its fair share of 20/s, no retries
        now = i * 0.005
        if i % 100 == 0:  # four other callers stay active: five share the app
            for other in ("w", "x", "y", "z"):
                book.admit(other, now)
        decision = book.admit("batch-job", now)
        assert decision.fair_share == pytest.approx(20.0)
        assert decision.admitted and decision.level == 0
    # the same traffic against a congested app is a defection
    book.update_load(10.0, congestion=0.95)
    decisions = [book.admit("batch-job", 10.0 + i * 0.005) for i in range(600)]
    assert decisions[-1].level == 1
    assert sum(d.admitted for d in decisions[-200:]) <= 12  # throttled to 10/s (+ rounding)


def test_a_caller_alone_at_a_congested_app_is_not_punished_for_its_rate() -> None:
    """The stranger's finding: the only caller of an app whose limit had collapsed (its
    latency jumped 1000-fold) was punished and then backed off by its own sidecar, though it
    crowded nobody out. The rate norm shares an app among callers: alone, a caller's excess is
    the limiter's to shed. A second caller makes the same flood a defection again."""
    def flood(others: bool) -> Phase:
        book = ReputationBook(PolicingParams(capacity=10.0))
        now, worst = 0.0, Phase.GOOD
        while now < 20.0:  # 100 req/s at an app of 10/s, congested throughout
            book.update_load(now, congestion=1.0, capacity=10.0)
            phase = book.admit("only", now).phase
            if others and round(now * 100) % 50 == 0:
                book.admit("other", now)
            worst = phase if phase is not Phase.GOOD else worst
            now += 0.01
        return worst

    assert flood(others=False) is Phase.GOOD
    assert flood(others=True) is Phase.PUNISHED
    # the anonymous bucket stands for any number of callers: its norm holds even alone
    book = ReputationBook(PolicingParams(capacity=10.0))
    punished = False
    for k in range(2000):
        book.update_load(k / 100, congestion=1.0, capacity=10.0)
        punished |= book.admit(ANONYMOUS, k / 100).phase is Phase.PUNISHED
    assert punished


def test_retry_storm_is_a_defection_even_without_congestion() -> None:
    book = ReputationBook()
    book.update_load(0.0, congestion=0.0, capacity=1000.0)
    # 10/s of which half are retries: 5 retries/s against a budget of 0.2 * 5 + 1 = 2/s
    decisions = [book.admit("stormy", i * 0.1, is_retry=i % 2 == 1) for i in range(50)]
    assert decisions[-1].level == 1
    # 10/s with one retry in ten: 1/s against a budget of 0.2 * 9 + 1 = 2.8/s
    polite = [book.admit("polite", i * 0.1, is_retry=i % 10 == 9) for i in range(50)]
    assert all(d.level == 0 for d in polite)


def test_anonymous_bucket_is_treated_most_strictly() -> None:
    book = ReputationBook()
    first = book.admit(ANONYMOUS, 0.0)
    assert first.reputation == pytest.approx(0.6)
    assert book.fair_share(ANONYMOUS, 0.0) == pytest.approx(0.5 * book.fair_share("x", 0.0))
    # 13/s each with three active callers: 1.3 x a named share, 2.6 x the anonymous share
    flows = [Flow("alice", 13, 0, 10), Flow("bob", 13, 0, 10), Flow(ANONYMOUS, 13, 0, 10)]
    outcomes = simulate(ReputationBook(), flows)
    assert all(o.decision.level == 0 for o in of(outcomes, "alice"))
    anonymous_punished = first_punished(outcomes, ANONYMOUS)
    assert anonymous_punished < 3.0


def test_memory_is_bounded_by_the_cap_and_by_idle_eviction() -> None:
    params = PolicingParams(max_callers=50)
    book = ReputationBook(params)
    for i in range(500):
        book.admit(f"caller-{i}", i * 0.01)
    assert len(book) == 50
    assert book.standing("caller-0", 5.0) is None and book.standing("caller-499", 5.0)
    book.admit("late", 5.0 + params.idle_ttl + 1.0)
    assert len(book) == 1


def test_fair_share_divides_capacity_among_recently_active_callers() -> None:
    book = ReputationBook(PolicingParams(capacity=60.0, active_window=5.0))
    for caller in ("a", "b", "c"):
        book.admit(caller, 0.0)
    assert book.fair_share("a", 1.0) == pytest.approx(20.0)
    book.admit("a", 6.0)
    assert book.fair_share("a", 6.0) == pytest.approx(60.0)


def test_punishment_outweighs_the_flood_gain_when_many_callers_share_the_app() -> None:
    # ten callers share 30/s: s = 3/s. A 100/s flood gains at most g = 30 - 3 = 27/s for
    # T_d = rate_tau + reputation_tau * ln 2 = 2.386 s; a level-1 punishment takes 1.5/s, so it
    # must last 27 * 2.386 / 1.5 = 42.9 s, longer than the 10 s base.
    book = ReputationBook()
    assert book.detection_lag() == pytest.approx(1.0 + 2.0 * math.log(2.0))
    flows = [Flow(f"c{i}", 3, 0, 8) for i in range(9)] + [Flow("rogue", 100, 0, 8)]
    outcomes = simulate(book, flows)
    punished_at = first_punished(outcomes, "rogue")
    waits = retry_afters(outcomes, "rogue", punished_at, punished_at + 1)
    assert max(waits) == math.ceil(27.0 * book.detection_lag() / 1.5)
    assert all(o.decision.level == 0 for o in outcomes if o.caller != "rogue")
    # what the flood gained while undetected is less than what the punishment takes away
    gained = sum(o.served for o in of(outcomes, "rogue", 0, punished_at)) - 3 * punished_at
    assert 0 < gained < 1.5 * max(waits)


@given(rate=st.floats(0, 1e4), share=st.floats(0.01, 100), capacity=st.floats(0.01, 1e4))
def test_deterrent_duration_satisfies_the_inequality(rate, share, capacity) -> None:
    book = ReputationBook()
    book.update_load(0.0, 0.0, capacity=capacity)
    duration = book.deterrent_duration(rate, share)
    gain = min(rate - share, capacity - share)
    assert duration >= 0.0 and math.isfinite(duration)
    assert duration * 0.5 * share >= gain * book.detection_lag() * (1 - 1e-9)


def test_ladder_durations_and_fractions() -> None:
    rules = LadderRules()
    assert [rules.duration(level) for level in range(1, 6)] == [10, 20, 40, 80, 120]
    assert [rules.fraction(level) for level in range(0, 4)] == [1.0, 0.5, 0.25, 0.125]


def test_ladder_rules_step_by_step() -> None:
    ladder = PunishmentLadder(LadderRules(max_level=2))
    ladder.step(0.0, reputation=0.49)  # trigger
    assert (ladder.level, ladder.phase, ladder.until) == (1, Phase.PUNISHED, 10.0)
    ladder.step(5.0, reputation=0.0)  # no restart while punished
    assert ladder.until == 10.0 and ladder.remaining(5.0) == 5.0
    ladder.step(10.0, reputation=0.69)  # not forgiven: climbs
    assert (ladder.level, ladder.phase, ladder.until) == (2, Phase.PUNISHED, 30.0)
    ladder.step(30.0, reputation=0.2)  # at the top: stays at the top, a new punishment
    assert (ladder.level, ladder.until) == (2, 50.0)
    ladder.step(50.0, reputation=0.7)  # forgiven: probation at level 2
    assert (ladder.level, ladder.phase, ladder.until) == (2, Phase.PROBATION, 80.0)
    ladder.step(81.0, reputation=0.9)  # one clean probation period: one level down
    assert (ladder.level, ladder.phase, ladder.until) == (1, Phase.PROBATION, 110.0)
    ladder.step(500.0, reputation=0.9)  # a long clean gap passes every period
    assert (ladder.level, ladder.phase) == (0, Phase.GOOD)
    assert ladder.punishments == 3


def test_params_are_validated() -> None:
    with pytest.raises(ValueError, match="idle_ttl"):
        PolicingParams(idle_ttl=10.0)
    with pytest.raises(ValueError):
        LadderRules(trigger_threshold=0.8, forgive_threshold=0.5)


_request = st.tuples(
    st.sampled_from(["a", "b", ANONYMOUS]),
    st.floats(0.0, 3.0),  # gap to the previous request
    st.booleans(),  # retry
    st.floats(0.0, 1.0),  # congestion
)


@settings(max_examples=100, deadline=None)
@given(st.lists(_request, max_size=150))
def test_standing_stays_well_formed(requests) -> None:
    rules = LadderRules(base_punishment=1.0, max_punishment=4.0, max_level=3, probation=2.0)
    book = ReputationBook(PolicingParams(ladder=rules, capacity=5.0, reputation_tau=0.5))
    now = 0.0
    for caller, gap, retry, congestion in requests:
        now += gap
        book.update_load(now, congestion)
        d = book.admit(caller, now, retry)
        assert 0.0 <= d.reputation <= 1.0 and not math.isnan(d.reputation)
        assert 0 <= d.level <= rules.max_level
        assert (d.level == 0) == (d.phase is Phase.GOOD)
        if d.admitted and d.phase is Phase.PUNISHED:  # let through, told the time left
            assert d.status == 200 and d.retry_after is not None
            assert 0 <= d.retry_after <= rules.max_punishment
        elif d.admitted:
            assert d.status == 200 and d.retry_after is None
        else:
            assert d.status == 429 and d.phase is Phase.PUNISHED
            assert d.retry_after is not None
            assert 1 <= d.retry_after <= rules.max_punishment
            assert d.retry_after == int(d.retry_after)


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


def test_an_admitted_request_of_a_punished_caller_carries_the_time_left() -> None:
    """Issue 14, #13: the punished caller's admitted answers said ``retry=1`` with 8 s left."""
    book = ReputationBook(PolicingParams(capacity=10.0))
    book.update_load(0.0, congestion=1.0, capacity=10.0)
    now = 0.0
    while book.admit("flood", now).phase is not Phase.PUNISHED:  # 1,000 req/s of a 10/s app
        if round(now * 1000) % 500 == 0:
            book.admit("other", now)  # a second caller, which the flood crowds out
        now += 0.001
        assert now < 60.0
    now += 1.0  # a second into the punishment the throttle lets a request through
    decision = book.admit("flood", now)
    standing = book.standing("flood", now)
    assert standing is not None and decision.admitted and decision.phase is Phase.PUNISHED
    assert standing.punished_for > 2
    assert decision.retry_after == pytest.approx(standing.punished_for)


# --- the demand-aware norm (water-filling) ------------------------------------------------------


def test_water_level_by_hand() -> None:
    from mesh.reputation import water_level

    assert water_level(200.0, []) == 200.0
    assert water_level(200.0, [500.0]) == 200.0
    # four callers all asking more than 50: the equal split
    assert water_level(200.0, [60.0, 70.0, 80.0, 250.0]) == pytest.approx(50.0)
    # 28 + 28 leave 144 for the two heavy ones: 72 each
    assert water_level(200.0, [28.0, 83.0, 28.0, 250.0]) == pytest.approx(72.0)
    # everything fits (167 of 200): the heaviest could also have the 33 left over
    assert water_level(200.0, [28.0, 28.0, 28.0, 83.0]) == pytest.approx(116.0)
    # never below the equal split
    assert water_level(90.0, [10.0, 40.0, 40.0]) >= 30.0


def test_an_honest_caller_concentrated_on_one_pod_is_not_punished_during_a_rogue_burst() -> None:
    """The soak of 2026-12-02: a pod of capacity 200 shared by four callers (equal share 50,
    old norm 1.5 x 50 = 75/s). coop-3's sidecar sends all its 83/s to this pod while the
    rogue floods it at 250/s and the two other cooperative callers send 28/s each; the pod
    is congested throughout. Water level: (200 - 28 - 28) / 2 = 72/s, norm 1.5 x 72 = 108/s:
    coop-3 (83/s) is cooperative, the rogue (250/s) is not."""
    capacity = 200.0
    flows = [Flow("coop-1", 28, 0, 20), Flow("coop-2", 28, 0, 20), Flow("coop-3", 83, 0, 20),
             Flow("rogue", 250, 0, 20)]
    for old_norm in (False, True):
        book = ReputationBook(PolicingParams(capacity=capacity))
        arrivals = periodic_arrivals(flows)
        levels: dict[str, int] = {}
        for t, caller in arrivals:
            book.update_load(t, 1.0, capacity)
            if old_norm:  # the norm judged by the equal share alone (before the fix)
                book._level, book._level_at = 0.0, t
            decision = book.admit(caller, t)
            levels[caller] = max(levels.get(caller, 0), decision.level)
        if old_norm:
            assert levels["coop-3"] >= 1  # what the soak saw: punished as a defector
        else:
            assert levels["coop-1"] == levels["coop-2"] == levels["coop-3"] == 0
            assert levels["rogue"] >= 1
            standing = book.standing("coop-3", 20.0)
            assert standing is not None and standing.reputation > 0.99


def test_the_norm_share_is_the_equal_share_when_everyone_asks_for_more() -> None:
    book = ReputationBook(PolicingParams(capacity=30.0))
    outcomes = simulate(book, [*COOPERATIVE, Flow("rogue", 100, 0, 5)])
    judged = [o.decision for o in of(outcomes, "alice", 2.0, 5.0) if o.decision.norm_share > 0]
    # alice and bob ask for their 10/s, the rogue more: water level 10 = 30 / 3 (give or take
    # the ripple of a decayed rate estimate of a periodic flow)
    assert judged and all(10.0 <= d.norm_share < 12.0 for d in judged)


def test_congested_below_its_stated_capacity_the_norm_is_the_equal_share() -> None:
    """Pods stated at 200/s but congested (CPU starvation) while four callers ask for 167/s
    in all: the rogue's 83/s per pod is judged against 1.5 x 50/s, not against the water level
    116/s that the stated capacity would give."""
    book = ReputationBook(PolicingParams(capacity=200.0))
    flows = [Flow("coop-1", 28, 0, 10), Flow("coop-2", 28, 0, 10), Flow("coop-3", 28, 0, 10),
             Flow("rogue", 83, 0, 10)]
    arrivals = periodic_arrivals(flows)
    levels: dict[str, int] = {}
    for t, caller in arrivals:
        book.update_load(t, 1.0, 200.0)
        decision = book.admit(caller, t)
        levels[caller] = max(levels.get(caller, 0), decision.level)
        if t > 2.0:
            assert decision.norm_share == pytest.approx(50.0)
    assert levels["rogue"] >= 1
    assert levels["coop-1"] == levels["coop-2"] == levels["coop-3"] == 0


# --- declared demand (X-GT-Demand) -----------------------------------------------------------


def _run(book: ReputationBook, flows: list[Flow], demands: dict[str, float | None],
         capacity: float) -> dict[str, int]:
    """Every flow's requests in time order on a congested app; the highest level each caller
    reached. ``demands[caller]``: what its sidecar declares on each request."""
    arrivals = periodic_arrivals(flows)
    levels: dict[str, int] = {}
    for t, caller in arrivals:
        book.update_load(t, 1.0, capacity)
        decision = book.admit(caller, t, demand=demands.get(caller))
        levels[caller] = max(levels.get(caller, 0), decision.level)
    return levels


def test_callers_all_concentrated_on_one_pod_are_judged_by_their_demand_on_the_service() -> None:
    """The soak of 2026-12-03 08:18: Redis timed out, the callers' sidecars fell back to
    their own learners and all put 80 % of their traffic (the cap) on the same pod, whose
    capacity had dropped to 120/s under CPU starvation. Equal share 30/s, norm 45/s.
    Each cooperative caller sends 83/s to a service of 3 pods (even spread 27.8/s) and so
    66/s here; the rogue sends 250/s (83/s even spread), 200/s here.

    Judged by their rates here (no declaration), all four are defectors. Judged by their
    declared demand: the water level of 120/s over (27.8, 27.8, 27.8, 83) is 36.7/s, norm
    55/s: the cooperative callers are within it and the rogue is not."""
    flows = [Flow("coop-1", 66, 0, 10), Flow("coop-2", 66, 0, 10), Flow("coop-3", 66, 0, 10),
             Flow("rogue", 200, 0, 10)]
    declared = {"coop-1": 83 / 3, "coop-2": 83 / 3, "coop-3": 83 / 3, "rogue": 250 / 3}
    undeclared = _run(ReputationBook(PolicingParams(capacity=120.0)), flows, {}, 120.0)
    assert all(undeclared[c] >= 1 for c in ("coop-1", "coop-2", "coop-3", "rogue"))
    book = ReputationBook(PolicingParams(capacity=120.0))
    levels = _run(book, flows, declared, 120.0)
    assert levels["coop-1"] == levels["coop-2"] == levels["coop-3"] == 0
    assert levels["rogue"] >= 1
    coop = book.standing("coop-1", 10.0)
    assert coop is not None and coop.demand == pytest.approx(83 / 3)
    assert coop.rate > 60  # its rate here is shown as it is; only the judgement uses the demand


def test_a_declared_demand_above_the_rate_here_changes_nothing() -> None:
    """A caller that sends this pod less than its even spread is judged by what it sends
    here: the norm's rate is the smaller of the two."""
    book = ReputationBook(PolicingParams(capacity=30.0))
    for k in range(50):
        decision = book.admit("alice", k / 10, demand=500.0)
    book.update_load(5.0, 1.0, 30.0)
    decision = book.admit("alice", 5.0, demand=500.0)
    standing = book.standing("alice", 5.0)
    assert standing is not None
    assert decision.judged_rate == pytest.approx(standing.rate)
    # and a declaration below it is what is judged
    decision = book.admit("alice", 5.01, demand=2.0)
    assert decision.judged_rate == pytest.approx(2.0)
    # a request without one is judged by its rate here again
    decision = book.admit("alice", 5.02)
    assert decision.judged_rate > 9.0


def test_time_held_is_never_discounted_by_a_declaration() -> None:
    """A caller whose requests hold the app's slots (charged as request-equivalents) cannot
    hide that behind a small declared demand: ``x' = min(x - h, demand) + h``."""
    book = ReputationBook(PolicingParams(capacity=30.0))
    for k in range(40):
        t = k / 10
        book.update_load(t, 1.0, 30.0)
        book.admit("slow", t, demand=0.5)
        book.admit("other", t)  # a second caller, which the holder crowds out
        decision = book.charge("slow", t + 0.01, 10.0)  # each request held 10 requests' time
    assert decision.judged_rate > 80.0
    assert decision.level >= 1
