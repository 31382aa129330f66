"""Estimators: EWMA, Linkerd's peak EWMA, failure penalty."""

from __future__ import annotations

import math

import pytest

from mesh.estimators import DEFAULT_RTT, EndpointStats, Ewma, PeakEwma
from mesh.probes import ProbeReport


def test_ewma_first_sample_then_time_weighted_within_bounds() -> None:
    e = Ewma(tau=4.0)
    assert e.update(0.1, 0.0) == 0.1
    w = math.exp(-1.0 / 4.0)
    assert e.update(0.2, 1.0) == pytest.approx(0.1 * w + 0.2 * (1 - w))
    # A lone sample after a long silence moves the average by a third at most ...
    assert e.update(5.0, 100.0) == pytest.approx(e.value)
    f = Ewma(tau=1.0)
    f.update(0.3, 0.0)
    assert f.update(0.0, 100.0) == pytest.approx(0.2)
    # ... and same-instant samples by a sixteenth at least.
    assert f.update(1.6, 100.0) == pytest.approx(0.2 * 15 / 16 + 1.6 / 16)


def test_peak_ewma_jumps_to_slower_samples_and_decays() -> None:
    p = PeakEwma(updated_at=0.0)
    assert p.value(0.0) == DEFAULT_RTT  # Linkerd's default before any sample
    p.update(0.5, 1.0)
    assert p.value(1.0) == 0.5  # peak: a slower sample replaces the estimate at once
    p.update(0.1, 2.0)
    w = math.exp(-1.0 / 10.0)
    assert p.value(2.0) == pytest.approx(0.5 * w + 0.1 * (1 - w))
    # Idle, the estimate decays towards zero (tower: update with rtt=0 to decay).
    assert p.value(12.0) == pytest.approx(p.value(2.0) * math.exp(-1.0))
    assert p.cost(2.0, pending=3) == pytest.approx(4 * p.value(2.0))


def test_peak_ewma_never_measured_decays_from_creation() -> None:
    # tower's RttEstimate starts at the default RTT stamped with its creation instant.
    p = PeakEwma(updated_at=100.0)
    assert p.value(90.0) == DEFAULT_RTT  # asked before creation: no decay, never growth
    assert p.value(100.0) == DEFAULT_RTT
    assert p.value(110.0) == pytest.approx(0.030 * math.exp(-1.0))  # 11.04 ms
    assert p.value(120.0) == pytest.approx(0.030 * math.exp(-2.0))  # 4.06 ms
    assert p.cost(110.0, pending=1) == pytest.approx(2 * 0.030 * math.exp(-1.0))
    # The first sample below the default is averaged with the weight of the time since creation.
    p.update(0.005, 105.0)
    w = math.exp(-0.5)
    assert p.estimate == pytest.approx(0.030 * w + 0.005 * (1 - w))  # 20.16 ms
    assert p.updated_at == 105.0
    s = EndpointStats.new("a", now=100.0, tau=1.0, decay=10.0, failure_penalty=1.0)
    assert s.peak.value(110.0) == pytest.approx(0.030 * math.exp(-1.0))


def test_failures_are_charged_the_penalty_latency() -> None:
    s = EndpointStats.new("a", now=0.0, tau=1.0, decay=10.0, failure_penalty=1.0)
    s.start()
    assert s.finish(0.002, ok=False, now=0.0) == 1.0
    assert s.failures == 1 and s.consecutive_failures == 1 and s.in_flight == 0
    assert s.finish(0.002, ok=True, now=0.1) == 0.002
    assert s.consecutive_failures == 0
    assert s.finish(float("nan"), ok=True, now=0.2) == 1.0  # garbage latency is not trusted


def test_congestion_inflates_the_estimate_and_is_clamped() -> None:
    s = EndpointStats.new("a", now=0.0, tau=1.0, decay=10.0, failure_penalty=1.0)
    s.finish(0.01, True, 0.0, congestion=5.0)
    assert 0.0 < s.congestion <= 1.0
    assert s.latency_estimate(0.03) > 0.01
    n, mean = s.take_tick(0.5)
    assert n == 1 and mean == pytest.approx(0.01)
    assert s.take_tick(1.0) == (0, 0.0)


def test_a_fast_failing_endpoint_costs_at_least_the_penalty_until_it_answers() -> None:
    s = EndpointStats.new("refusing", now=0.0, tau=2.0, decay=10.0, failure_penalty=1.0)
    healthy = EndpointStats.new("ok", now=0.0, tau=2.0, decay=10.0, failure_penalty=1.0)
    healthy.start()
    healthy.start()
    healthy.finish(0.005, True, now=0.0)  # 5 ms, one request still out
    s.start()
    s.finish(0.0002, False, now=0.0)  # connection refused in 0.2 ms
    # the peak EWMA took the 1 s penalty; 20 s later it has decayed to 1 s x e^-2 = 135 ms,
    # but while the last request failed the cost stays at the penalty x (0 + 1)
    assert s.finish_cost(0.0) == pytest.approx(1.0)
    assert s.finish_cost(20.0) == pytest.approx(1.0)
    assert healthy.finish_cost(0.0) == pytest.approx(0.030 * 2)  # 30 ms peak kept x (1 + 1)
    s.start()
    s.finish(0.004, True, now=20.0)  # it answers again: its 4 ms averaged into the peak
    w = math.exp(-2.0)
    assert s.finish_cost(20.0) == pytest.approx(1.0 * w + 0.004 * (1.0 - w))


def test_the_outcome_mean_takes_answers_and_failures_alone() -> None:
    """What judges a pod bad beside the others (RegretMatchingPolicy._good): answers, and
    failures at the penalty; no lower bound of a cancelled request, no success without an
    answer, nothing void, while the latency estimate takes what it takes; an ejection's
    re-admission starts it afresh. Folded at each tick: the tick's mean, one step."""
    s = EndpointStats.new("a", now=0.0, tau=1.0, decay=10.0, failure_penalty=1.0)
    assert s.outcome_mean is None
    s.start(0.0)
    s.finish(0.010, True, 0.010)
    s.start(0.0)
    s.finish(0.030, True, 0.030)
    assert s.outcome_mean is None  # not before the tick
    s.take_tick(0.5)
    assert s.outcome_mean is not None and s.outcome_mean.value == pytest.approx(0.020)
    for at, kwargs in ((0.6, {"censored": True}), (0.7, {"answered": False}),
                       (0.8, {"void": True})):
        s.start(at)
        s.finish(2.0, True, at + 2.0, **kwargs)
    s.take_tick(3.0)
    assert s.outcome_mean.value == pytest.approx(0.020)
    assert s.latency.value is not None and s.latency.value > 0.1  # the estimate took them
    s.start(3.1)
    s.finish(0.001, False, 3.101)  # a quick failure: at the penalty
    s.take_tick(3.5)
    assert s.outcome_mean.value > 0.3
    s.start(3.6)
    s.finish(0.001, False, 3.601)  # not folded before the ejection: history
    s.fresh_from, s.readmitting = 4.0, True  # ejected at 4 s; the first answer after it
    s.start(4.5)
    s.finish(0.020, True, 4.52, sent_at=4.5)
    s.take_tick(5.0)
    assert s.outcome_mean.value == pytest.approx(0.020)
    s.learn(5.0, 6.0)  # a long answer learned after all: not what judges a pod bad (a
    s.take_tick(6.5)  # healthy one's, when others lag)
    assert s.outcome_mean.value == pytest.approx(0.020)


def test_a_probe_answer_stands_for_the_outcome_mean_while_own_outcomes_are_quiet() -> None:
    """A pod judged bad by its outcomes, then healed while this caller sent it nothing: its
    probe answers say so (a recovery run of the whole mesh kept a healed pod at 0 % for the
    30 s after its heal, judged by the outcomes of before)."""
    s = EndpointStats.new("a", now=0.0, tau=1.0, decay=10.0, failure_penalty=1.0)
    s.start(0.0)
    s.finish(0.5, True, 0.5)
    s.take_tick(0.5)
    healed = ProbeReport(in_flight=0, mean=0.004, p50=0.004, p90=0.005, samples=40,
                         congestion=0.0, limit=10, draining=False)
    s.observe_probe(healed, 0.8)  # its own outcome 0.3 s ago: it stands
    assert s.outcome_mean is not None and s.outcome_mean.value == pytest.approx(0.5)
    s.observe_probe(healed, 5.0)
    assert s.outcome_mean.value == pytest.approx(0.004)
    fresh = EndpointStats.new("b", now=0.0, tau=1.0, decay=10.0, failure_penalty=1.0)
    fresh.observe_probe(healed, 5.0)  # never sent to: the probe's word
    assert fresh.outcome_mean is not None and fresh.outcome_mean.value == pytest.approx(0.004)
