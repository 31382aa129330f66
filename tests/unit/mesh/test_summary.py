"""Epoch windows (mesh.estimators) and the epoch report built from them (mesh.summary),
against hand-made cases; and the typed following-policy seam (mesh.policy.FollowingPolicy)."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest

from mesh.estimators import LATENCY_BUCKETS, EpochWindow, EpochWindows
from mesh.policies import POLICIES, RegretMatchingPolicy
from mesh.policy import EndpointView, FollowingPolicy, Outcome, PolicySnapshot
from mesh.profiles import get_profile
from mesh.summary import SummaryBuilder
from tests.signaling_samples import BAD, EPS, NOW, routed_group
from wire.summary import RegretSummary, decode_summary, encode_summary

A, B, C = "http://a:1", "http://b:1", "http://c:1"


def view(endpoint: str, estimate: float = 0.05, in_flight: int = 0) -> EndpointView:
    return EndpointView(endpoint, weight=0.0, latency_estimate=estimate, regret=0.0,
                        in_flight=in_flight, requests=0, failures=0)


def snapshot(weights: dict[str, float], matrix: object = (),
             estimates: dict[str, float] | None = None) -> PolicySnapshot:
    endpoints = [view(e, (estimates or {}).get(e, 0.05)) for e in weights]
    return PolicySnapshot("equilibrium", weights, endpoints,
                          regret_matrix=matrix)  # type: ignore[arg-type]


def window(*latencies: float, failed_unanswered: int = 0, failed_answered: int = 0) -> EpochWindow:
    w = EpochWindow()
    for latency in latencies:
        w.observe(latency, True, True)
    for _ in range(failed_answered):
        w.observe(0.5, False, True)
    for _ in range(failed_unanswered):
        w.observe(2.0, False, False)
    return w


# ------------------------------------------------------------------ windows


def test_a_window_counts_and_buckets_what_it_observes() -> None:
    w = window(0.004, 0.004, 0.009, 0.3, failed_unanswered=2, failed_answered=1)
    assert (w.requests, w.failures, w.answered) == (7, 3, 5)
    assert w.mean() == pytest.approx((0.004 * 2 + 0.009 + 0.3 + 0.5) / 5)
    assert w.quantile(0.5) == 0.01  # 3 of 5 are at or below the 10 ms bucket
    assert w.quantile(0.99) == 0.5
    assert w.quantile(0.2) == 0.005
    assert window(0.01).quantile(0.5) == 0.01  # a bound is inclusive, as Prometheus's "le"


def test_a_window_with_nothing_answered_or_above_every_bucket_has_no_quantile() -> None:
    assert window(failed_unanswered=3).mean() is None
    assert window(failed_unanswered=3).quantile(0.5) is None
    slow = window(9.0, 12.0)
    assert slow.mean() == pytest.approx(10.5) and slow.quantile(0.5) is None
    odd = window(math.nan, math.inf)
    assert (odd.requests, odd.answered) == (2, 0)
    assert LATENCY_BUCKETS[-1] == 5.0


def test_windows_restart_when_taken() -> None:
    windows = EpochWindows()
    windows.observe(A, 0.01, True, True)
    windows.observe(A, 0.02, False, True)
    taken = windows.take()
    assert set(taken) == {A} and taken[A].requests == 2 and taken[A].failures == 1
    assert windows.take() == {}


# ------------------------------------------------------------------ the report


def test_the_report_reads_each_endpoint_from_its_window() -> None:
    builder = SummaryBuilder(max_seconds=3600.0)
    windows = {A: window(0.01, 0.01, 0.03), B: window(failed_unanswered=2)}
    report = builder.build(snapshot({A: 0.6, B: 0.2, C: 0.2}, estimates={B: 0.8}), windows,
                           now=5.0, wall=1000.5, epoch_seconds=0.5)
    assert report is not None
    assert report.endpoints == (A, B, C)
    assert report.requests == (3, 2, 0) and report.failures == (0, 2, 0)
    assert report.latency_mean[0] == pytest.approx(0.05 / 3)
    assert (report.latency_p50[0], report.latency_p99[0]) == (0.01, 0.05)
    # only failures with no answer: the policy's estimate; no request: nothing
    assert report.latency_mean[1:] == (0.8, None) and report.latency_p99[1:] == (0.8, None)
    assert report.epoch == 2001 and report.sent_at == 1000.5
    assert report.demand == pytest.approx(5 / 0.5)  # the first report: over one epoch
    assert report.weights == pytest.approx((0.6, 0.2, 0.2)) and math.fsum(report.weights) == 1.0
    assert report.regret == ((0.0,) * 3,) * 3  # no usable matrix: zeros

    later = builder.build(snapshot({A: 1.0, B: 0.0, C: 0.0}), {A: window(0.01)},
                          now=7.0, wall=1002.5, epoch_seconds=0.5)
    assert later is not None and later.demand == pytest.approx(1 / 2.0)  # over the 2 s since


def test_the_report_clips_what_the_wire_cannot_carry() -> None:
    builder = SummaryBuilder(max_seconds=10.0)
    matrix = ((0.0, math.inf), (-50.0, math.nan))
    report = builder.build(snapshot({A: math.inf, B: -1.0}, matrix, {A: 99.0, B: 99.0}),
                           {A: window(20.0), B: window(failed_unanswered=1)},
                           now=0.0, wall=0.0, epoch_seconds=1.0)
    assert report is not None
    assert report.latency_mean == (10.0, 10.0) and report.latency_p50 == (10.0, 10.0)
    assert report.regret == ((0.0, 0.0), (-10.0, 0.0))
    assert report.weights == (0.5, 0.5)  # no finite positive weight: uniform
    assert builder.build(None, {}, 0.0, 0.0, 1.0) is None
    assert builder.build(snapshot({}), {}, 0.0, 0.0, 1.0) is None


def test_a_p99_is_never_below_the_p50() -> None:
    # every latency above the last bucket: both quantiles fall back to the mean
    report = SummaryBuilder().build(snapshot({A: 1.0}), {A: window(6.0, 8.0)}, 0.0, 0.0, 1.0)
    assert report is not None
    assert report.latency_p50 == report.latency_p99 == report.latency_mean == (7.0,)


# ------------------------------------------------------------------ the following policy


def test_only_the_equilibrium_policy_follows() -> None:
    profile = get_profile("balanced")
    following = {name for name, make in POLICIES.items()
                 if isinstance(make(profile), FollowingPolicy)}
    assert following == {RegretMatchingPolicy.name}


def test_the_policy_windows_every_outcome_of_its_endpoints() -> None:
    policy = RegretMatchingPolicy(get_profile("balanced"))
    policy.set_endpoints([A, B], 0.0)
    for outcome in (Outcome(A, 0.01, True, 1.0), Outcome(A, 0.2, False, 1.0, answered=True),
                    Outcome(B, 1.0, False, 1.0), Outcome(C, 0.01, True, 1.0)):
        policy.on_start(outcome.endpoint, 0.5)
        policy.on_outcome(outcome)
    taken = policy.take_epoch()
    assert set(taken) == {A, B}  # C is not one of its endpoints
    assert (taken[A].requests, taken[A].failures, taken[A].answered) == (2, 1, 2)
    assert (taken[B].requests, taken[B].failures, taken[B].answered) == (1, 1, 0)
    assert policy.take_epoch() == {}


def test_summary_builder_reports_each_epochs_movement() -> None:
    table, _ = routed_group()
    group = table.get("orders")
    assert group is not None
    builder = SummaryBuilder()
    policy = group.policy
    assert isinstance(policy, RegretMatchingPolicy)
    now = 1.0
    for i in range(30):
        endpoint = EPS[i % 3]
        latency = 0.3 if endpoint == BAD else 0.01
        policy.on_start(endpoint, now)
        # the bad endpoint fails half of the time with no answer at all
        policy.on_outcome(Outcome(endpoint, latency, endpoint != BAD or i % 2 == 0, now))
    group.tick(now)
    report = builder.build(group.snapshot, policy.take_epoch(), now, NOW, 1.0)
    assert report is not None
    first = RegretSummary(sidecar="sc-1", upstream="orders", **asdict(report))
    assert first.requests == (10, 10, 10) and first.failures == (0, 0, 5)
    assert first.latency_mean[0] == pytest.approx(0.01)
    assert first.latency_p50[2] <= first.latency_p99[2]
    assert first.demand == pytest.approx(30.0)  # first epoch: counted over one epoch
    assert decode_summary(encode_summary(first)) == first
    # nothing happened since: zero requests, no latency, the same weights
    group.tick(now + 1)
    again = builder.build(group.snapshot, policy.take_epoch(), now + 1, NOW + 1, 1.0)
    assert again is not None and again.requests == (0, 0, 0)
    assert again.latency_mean == (None, None, None) and again.demand == 0.0
    assert again.epoch == first.epoch + 1
