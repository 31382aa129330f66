"""Probe answers in the pure core: the responder's window, the caller's timetable, and how the
policy learns from them (hand-computed cases, then the slow-pod story end to end in the core)."""

from __future__ import annotations

import random
from itertools import pairwise

import numpy as np
import pytest

from mesh.estimators import EndpointStats
from mesh.herd import HerdGuard
from mesh.policies import RegretMatchingPolicy, make_policy
from mesh.probes import (
    REFUSED_WAIT_MAX,
    AwaitedAnswers,
    LatencyWindow,
    ProbeRates,
    ProbeReport,
    ProbeSchedule,
)
from mesh.profiles import get_profile


def report(mean: float, *, in_flight: int = 0, samples: int = 5, congestion: float = 0.0,
           draining: bool = False) -> ProbeReport:
    return ProbeReport(in_flight=in_flight, mean=mean, p50=mean, p90=mean, samples=samples,
                       congestion=congestion, limit=20, draining=draining)


# ------------------------------------------------------------------ the responder's window

def test_the_window_keeps_the_last_span_and_reads_nearest_rank_quantiles() -> None:
    window = LatencyWindow(span=2.0, min_samples=1)
    for at, latency in ((0.5, 0.1), (1.5, 0.2), (2.0, 0.3), (2.5, 0.4), (3.0, 1.0)):
        window.add(at, latency)
    mean, p50, p90, n = window.summary(3.0)  # 0.5 is older than 3.0 - 2.0
    assert (n, p50, p90) == (4, 0.3, 1.0)  # ranks ceil(0.5 * 4) = 2 and ceil(0.9 * 4) = 4
    assert mean == pytest.approx((0.2 + 0.3 + 0.4 + 1.0) / 4)
    assert window.summary(10.0) == (1.0, 1.0, 1.0, 1)  # the newest stands in for an empty span
    assert window.summary(14.0) == (0.0, 0.0, 0.0, 0)  # older than max_age (10 s)
    window.add(15.0, float("nan"))  # ignored
    assert window.summary(15.0)[3] == 0


def test_the_window_is_bounded_in_samples() -> None:
    window = LatencyWindow(span=100.0, max_samples=3, min_samples=1, max_age=100.0)
    for i in range(10):
        window.add(float(i), float(i))
    assert window.summary(9.0) == (8.0, 8.0, 9.0, 3)


def test_the_window_forgets_samples_older_than_max_age_as_it_is_fed_not_only_when_read() -> None:
    # a caller keeps one window per endpoint and reads only a few of them (the hedging p90 of
    # the best one): the others must not hold max_samples each forever
    window = LatencyWindow(span=2.0, max_samples=256, min_samples=1, max_age=10.0)
    for i in range(1000):
        window.add(i * 0.5, 0.01)
    assert len(window) == 21  # the samples of the last 10 s, both ends included
    assert window.summary(499.5) == (0.01, 0.01, 0.01, 5)


def test_a_rarely_used_app_is_summarised_over_its_last_samples_not_its_last_one() -> None:
    window = LatencyWindow(span=2.0, min_samples=4, max_age=10.0)
    for at, latency in ((1.0, 0.5), (3.0, 0.5), (5.0, 0.005), (7.0, 0.5), (8.5, 0.005)):
        window.add(at, latency)
    # only one sample in the last 2 s: the newest 4 (not older than 10 s) stand instead
    mean, p50, p90, n = window.summary(9.0)
    assert n == 4 and (p50, p90) == (0.005, 0.5)
    assert mean == pytest.approx((0.5 + 0.005 + 0.5 + 0.005) / 4)
    for i in range(4):  # four fresh samples within 2 s: the window is the span again
        window.add(9.0 + 0.25 * i, 0.005)
    assert window.summary(10.0) == (pytest.approx(0.005), 0.005, 0.005, 5)
    assert window.summary(30.0)[3] == 0  # older than max_age: nothing
    with pytest.raises(ValueError):
        LatencyWindow(span=2.0, min_samples=0)


def test_an_idle_half_slow_pod_does_not_look_healthy_after_eight_lucky_checks() -> None:
    # the seed's bad pod, measured only by the idle check (a few samples a second): its last
    # 16 samples stand for it, so a run of 8 fast ones (1 in 256) leaves the answer slow
    window = LatencyWindow()
    at = 0.0
    for latency in [0.505, 0.005] * 8 + [0.005] * 8:
        at += 0.3
        window.add(at, latency)
    mean, _, p90, n = window.summary(at)
    assert n == 16 and p90 == 0.505
    assert mean == pytest.approx((4 * 0.505 + 12 * 0.005) / 16)  # 26 times a fast answer
    for _ in range(8):  # 16 fast in a row: healed (2 s of checks at 8 a second)
        at += 0.13
        window.add(at, 0.005)
    assert window.summary(at)[0] == pytest.approx(0.005)


# ------------------------------------------------------------------ the caller's timetable

def test_requests_waiting_at_a_hung_app_show_in_the_summary_before_they_time_out() -> None:
    """A helper's finding: a hung pod's probe answers showed its latencies from before the
    hang (12 ms, 16 samples) for 10 s while 20 requests piled up at it, and callers raised
    its share. The second-oldest request still waiting is now a lower bound on them."""
    window, awaited = LatencyWindow(), AwaitedAnswers()
    for i in range(16):
        window.add(9.0 + i * 0.05, 0.012)
    keys = [awaited.sent(10.0 + i * 0.05) for i in range(20)]  # the hang begins at 10 s
    assert awaited.fold(10.01, window.summary(10.01)) == window.summary(10.01)
    mean, p50, p90, n = awaited.fold(12.0, window.summary(12.0))
    assert mean == p50 == p90 == pytest.approx(1.95) and n == 20
    for key in keys:  # they time out: nothing waits any more
        awaited.ended(key)
    assert len(awaited) == 0 and awaited.stall(30.0) == 0.0


def test_long_requests_beside_answered_ones_or_slow_answers_are_no_stall() -> None:
    """One long request alone is no stall; nor are two (long polls, slow uploads) while the
    app answers others (the review's finding: two long polls made a pod answering every other
    request in 4 ms read 4 s, and it was never readmitted); nor are slow answers."""
    window, awaited = LatencyWindow(), AwaitedAnswers()
    awaited.sent(0.0)  # a long poll: alone, however long
    assert awaited.stall(100.0) == 0.0
    awaited.sent(1.0)  # a second one: with nothing answered since, a stall
    assert awaited.stall(100.0) == pytest.approx(99.0)
    quick = awaited.sent(99.9)
    awaited.answered(quick, 99.904)  # the app answers others: they no longer count
    assert awaited.stall(100.0) == 0.0
    for i in range(16):
        window.add(99.0 + i * 0.01, 0.004)
    summary = window.summary(100.0)
    assert awaited.fold(100.0, summary) == summary
    first, second = awaited.sent(100.0), awaited.sent(100.1)  # sent after that answer
    assert awaited.stall(100.9) == pytest.approx(0.8)
    awaited.answered(first, 101.0)
    awaited.ended(first)  # idempotent, and no answer
    assert awaited.stall(101.5) == 0.0
    awaited.ended(second)
    slow = LatencyWindow()
    for i in range(16):
        slow.add(99.0 + i * 0.01, 0.5)  # an app answering in 500 ms
    busy = AwaitedAnswers()
    busy.sent(99.5)
    busy.sent(99.6)  # both in flight for about as long as they all are
    assert busy.fold(100.0, slow.summary(100.0)) == slow.summary(100.0)
    # an idle app (no samples) waiting on two requests for over 50 ms
    assert AwaitedAnswers().fold(1.0, (0.0, 0.0, 0.0, 0)) == (0.0, 0.0, 0.0, 0)
    idle = AwaitedAnswers()
    idle.sent(0.0)
    idle.sent(0.1)
    assert idle.fold(0.2, (0.0, 0.0, 0.0, 0)) == pytest.approx((0.1, 0.1, 0.1, 2))


def test_idle_endpoints_are_probed_four_times_a_second_busy_ones_once() -> None:
    schedule = ProbeSchedule(ProbeRates(idle=4.0, busy=1.0, jitter=0.0))
    rng = random.Random(1)
    schedule.sync(["a", "b"], 0.0, rng)
    assert all(0.0 <= at < 0.25 for at in schedule._next.values())  # spread over one interval
    sent = {"a": 0, "b": 0}
    t = 0.0
    while t < 10.0:
        for endpoint in schedule.due(t, busy={"b"}, rng=rng):
            sent[endpoint] += 1
        t = round(t + 0.01, 2)
    assert 39 <= sent["a"] <= 41 and 9 <= sent["b"] <= 11


def test_an_endpoint_dropped_from_the_traffic_is_probed_at_the_idle_rate_at_once() -> None:
    """A busy endpoint's next probe may be 3 s away, longer than an answer stays fresh; once
    the caller drops it, it must not wait that long (it would be explored meanwhile)."""
    schedule = ProbeSchedule(ProbeRates(idle=4.0, busy=0.5, jitter=0.5))
    rng = random.Random(3)
    schedule.sync(["a", "b"], 0.0, rng)
    probed: dict[str, list[float]] = {"a": [], "b": []}
    t = 0.0
    while t < 20.0:
        busy = {"a", "b"} if t < 10.0 else {"b"}  # "a" is dropped at 10 s
        for endpoint in schedule.due(t, busy=busy, rng=rng):
            probed[endpoint].append(t)
        t = round(t + 0.01, 2)
    after = [10.0] + [x for x in probed["a"] if x >= 10.0]
    assert max(b - a for a, b in pairwise(after)) <= 0.375 + 0.01
    before = [x for x in probed["a"][1:] if x < 10.0]
    assert max(b - a for a, b in pairwise(before)) > 2.0  # while busy, at the busy rate
    assert max(b - a for a, b in pairwise(probed["b"][1:])) >= 1.0  # "b" still busy


def test_an_endpoint_whose_answers_are_no_probe_answers_is_asked_ever_more_rarely() -> None:
    """Refused answers (an app without a sidecar answering 200) double the wait, up to 30 s,
    and are not brought forward as idle; one real answer restores the usual rate. A
    silent endpoint is not slowed (its probes readmit a pod on its way back)."""
    schedule = ProbeSchedule(ProbeRates(idle=4.0, busy=0.5, jitter=0.0))
    rng = random.Random(2)
    schedule.sync(["plain", "meshed"], 0.0, rng)
    probed: dict[str, list[float]] = {"plain": [], "meshed": []}
    t = 0.0
    while t < 120.0:
        for endpoint in schedule.due(t, busy=set(), rng=rng):
            probed[endpoint].append(t)
            if endpoint == "plain":
                schedule.refused(endpoint, t, rng)
            else:
                schedule.answered(endpoint)
        t = round(t + 0.01, 2)
    gaps = [round(b - a, 2) for a, b in pairwise(probed["plain"])]
    assert gaps[:6] == pytest.approx([0.5, 1.0, 2.0, 4.0, 8.0, 16.0], abs=0.011)  # 2^n / 4 s
    assert max(gaps) == pytest.approx(REFUSED_WAIT_MAX, abs=0.011)
    assert len(probed["plain"]) < 12
    assert len(probed["meshed"]) >= 470  # four a second throughout
    schedule.answered("plain")  # it got a sidecar: the usual rate again
    t0 = t
    while t < t0 + 31.0:
        for endpoint in schedule.due(t, busy=set(), rng=rng):
            probed[endpoint].append(t)
        t = round(t + 0.01, 2)
    assert len([x for x in probed["plain"] if x > t0 + 30.0]) >= 3
    schedule.refused("gone", 0.0, rng)  # not in the set: ignored
    assert "gone" not in schedule._next


def test_jitter_spreads_intervals_and_sync_follows_the_endpoint_set() -> None:
    schedule = ProbeSchedule(ProbeRates(idle=4.0, busy=1.0, jitter=0.5))
    rng = random.Random(7)
    intervals = [schedule.interval(False, rng) for _ in range(200)]
    assert min(intervals) >= 0.125 and max(intervals) <= 0.375
    assert max(intervals) - min(intervals) > 0.2
    schedule.sync(["a", "b"], 0.0, rng)
    schedule.sync(["b", "c"], 1.0, rng)
    assert set(schedule._next) == {"b", "c"} and schedule._next["c"] >= 1.0
    with pytest.raises(ValueError):
        ProbeRates(idle=1.0, busy=2.0)


# ------------------------------------------------------------------ one endpoint's stats

def stats(now: float = 0.0) -> EndpointStats:
    return EndpointStats.new("e", now=now, tau=2.0, decay=10.0, failure_penalty=1.0)


def test_a_probe_answer_is_the_latency_estimate_of_an_endpoint_this_caller_does_not_use() -> None:
    s = stats()
    s.start()
    s.finish(0.5, True, now=1.0)  # own measurement: 500 ms
    s.observe_probe(report(0.010, congestion=0.5), now=1.5)  # within 1 s of it: own stays
    assert s.latency.value == 0.5 and s.congestion == 0.0
    s.observe_probe(report(0.010, congestion=0.5), now=2.5)  # quiet for 1.5 s: the probe counts
    assert s.latency.value == 0.010 and s.congestion == 0.5
    assert s.latency_estimate(fallback=1.0) == pytest.approx(0.015)  # x (1 + congestion)
    s.observe_probe(report(0.0, samples=0), now=3.0)  # no evidence: the estimate is kept
    assert s.latency.value == 0.010


def test_coverage_needs_a_fresh_answer_with_latency_and_no_drain() -> None:
    s = stats()
    assert not s.probe_covered(0.0)
    s.observe_probe(report(0.01), now=1.0)
    assert s.probe_covered(3.0) and not s.probe_covered(3.01)  # fresh for 2 s
    s.observe_probe(report(0.0, samples=0), now=4.0)
    assert not s.probe_covered(4.0)
    s.observe_probe(report(0.01, draining=True), now=5.0)
    assert not s.probe_covered(5.0) and s.draining(5.0) and not s.draining(7.5)


def test_the_finish_cost_counts_the_callees_other_requests() -> None:
    s = stats()
    s.start()  # one of ours in flight when the answer comes
    s.observe_probe(report(0.01, in_flight=4), now=0.0)
    assert s.others_in_flight(0.0) == 3
    # peak EWMA at its 30 ms default at creation x (1 ours + 3 others + 1)
    assert s.finish_cost(0.0) == pytest.approx(0.030 * 5)
    assert s.others_in_flight(2.5) == 0  # stale: nothing assumed


# ------------------------------------------------------------------ the herd guard

def test_a_covered_endpoint_below_the_floor_gets_nothing() -> None:
    guard = HerdGuard(explore_floor=0.005, smoothing=1.0)
    target, previous = np.array([0.5, 0.5, 0.0]), np.array([0.45, 0.45, 0.1])
    floored = guard.shape(target, previous, dt=0.5)
    assert floored[2] == pytest.approx(0.005)  # not covered: the floor explores it
    covered = guard.shape(target, previous, dt=0.5, covered=np.array([False, False, True]))
    assert covered.tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert covered[2] == 0.0


def test_a_covered_endpoint_is_dropped_only_when_the_others_can_take_its_share() -> None:
    guard = HerdGuard(explore_floor=0.005, ramp_per_s=0.1, smoothing=1.0)
    w = guard.shape(np.array([0.5, 0.5, 0.0]), np.array([0.3, 0.3, 0.4]), dt=0.5,
                    covered=np.array([False, False, True]))
    # the ramp holds the others at 0.3 + 0.05: the rest stays where it was
    assert w.tolist() == pytest.approx([0.35, 0.35, 0.3])


# ------------------------------------------------------------------ the policy, end to end

LATENCY = {"a": 0.010, "b": 0.010, "c": 0.500}


def drive(policy: RegretMatchingPolicy, start: float, seconds: float, latency: dict[str, float],
          *, probes: bool, rng: random.Random, picks: dict[str, int] | None = None,
          weights: list[dict[str, float]] | None = None) -> float:
    """200 requests/s (each answered at once with its endpoint's latency), ticks every 0.5 s,
    and (with ``probes``) a probe answer from every endpoint every 0.25 s."""
    t, next_tick, next_probe = start, start, start
    end = start + seconds
    while t < end:
        if probes and t >= next_probe:
            for e, mean in latency.items():
                policy.on_probe(e, report(mean), t)
            next_probe += 0.25
        if t >= next_tick:
            policy.tick(t)
            if weights is not None:
                weights.append(dict(policy.snapshot().weights))
            next_tick += 0.5
        e = policy.pick(rng, t)
        assert e is not None
        policy.on_start(e, t)
        from mesh.policy import Outcome
        policy.on_outcome(Outcome(e, latency[e], True, t))
        if picks is not None:
            picks[e] = picks.get(e, 0) + 1
        t = round(t + 0.005, 3)
    return t


def new_policy() -> RegretMatchingPolicy:
    policy = make_policy("equilibrium", get_profile("balanced"))
    assert isinstance(policy, RegretMatchingPolicy)
    policy.set_endpoints(list(LATENCY), 0.0)
    return policy


def test_a_slow_endpoint_covered_by_probes_gets_no_user_request_once_learned() -> None:
    rng = random.Random(3)
    policy = new_policy()
    t = drive(policy, 0.0, 15.0, LATENCY, probes=True, rng=rng)
    late: dict[str, int] = {}
    drive(policy, t, 10.0, LATENCY, probes=True, rng=rng, picks=late)
    assert late.get("c", 0) == 0 and policy.snapshot().weights["c"] == 0.0
    # the same without probes: the exploration floor keeps spending user requests on it
    rng = random.Random(3)
    unprobed = new_policy()
    t = drive(unprobed, 0.0, 15.0, LATENCY, probes=False, rng=rng)
    floor_picks: dict[str, int] = {}
    drive(unprobed, t, 10.0, LATENCY, probes=False, rng=rng, picks=floor_picks)
    assert floor_picks.get("c", 0) >= 5  # 0.5 % of 2000


def test_a_healed_endpoint_is_readmitted_to_its_fair_share_by_probes_within_ten_seconds() -> None:
    rng = random.Random(5)
    policy = new_policy()
    t = drive(policy, 0.0, 20.0, LATENCY, probes=True, rng=rng)
    assert policy.snapshot().weights["c"] == 0.0
    healed = {"a": 0.010, "b": 0.010, "c": 0.010}
    weights: list[dict[str, float]] = []
    drive(policy, t, 10.0, healed, probes=True, rng=rng, weights=weights)
    shares = [w["c"] for w in weights]
    assert shares[-1] >= 0.8 / 3  # at least 80 % of a fair share within 10 s
    assert max(max(w.values()) for w in weights) <= 0.8 + 1e-9  # the cap holds throughout
    steps = np.diff(shares)
    assert np.all(steps <= 0.10 * 0.5 + 1e-9)  # never faster than the ramp (10 pp/s)
    first = next(i for i, share in enumerate(shares) if share > 0)
    assert first * 0.5 <= 2.5  # noticed (first share) within about 2 s of healing


def test_a_draining_endpoint_is_left_alone() -> None:
    rng = random.Random(9)
    policy = new_policy()
    even = {"a": 0.010, "b": 0.010, "c": 0.010}
    t = drive(policy, 0.0, 5.0, even, probes=True, rng=rng)
    policy.on_probe("c", report(0.010, draining=True), t)
    for i in range(12):
        policy.on_probe("c", report(0.010, draining=True), t + 0.25 * i)
        policy.tick(t + 0.25 * i)
    assert policy.snapshot().weights["c"] == 0.0
