"""mesh.concurrency: the gradient concurrency limit against a simulated app with c workers,
and its snapshot.

The simulated app serves ``n`` concurrent requests with ``c`` workers, each taking ``service``
seconds, so a batch of ``n`` sees RTT ``service * max(1, n / c)`` (queueing once n > c). With
tolerance 0.5 and sqrt headroom the limit's fixed point under saturation is
``L = 1.5 c + sqrt(L)``: 19.6 for c = 10, 10.8 for c = 5, 36.1 for c = 20.
"""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.concurrency import AdaptiveConcurrencyLimit, ConcurrencyParams


def _fixed_point(workers: int) -> float:
    # L = 1.5 c + sqrt(L)  =>  sqrt(L) = (1 + sqrt(1 + 6 c)) / 2
    return ((1.0 + math.sqrt(1.0 + 6.0 * workers)) / 2.0) ** 2


def _saturate(limiter: AdaptiveConcurrencyLimit, now: float, seconds: float, workers: int,
              service: float = 0.01) -> float:
    """Keep the app saturated (start as many as allowed, all finish together) for a while."""
    end = now + seconds
    while now < end:
        started = 0
        while limiter.on_start(now):
            started += 1
        rtt = service * max(1.0, started / workers)
        now += rtt
        for _ in range(started):
            limiter.on_finish(rtt, now)
    return now


def test_first_call_probes_min_rtt_at_the_probe_limit() -> None:
    limiter = AdaptiveConcurrencyLimit(ConcurrencyParams(probe_limit=3, probe_samples=6))
    assert [limiter.on_start(0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.probing and limiter.limit == 3 and limiter.congestion_level() == 1.0
    for _ in range(3):
        limiter.on_finish(0.02, 0.02)
    for _ in range(3):
        assert limiter.on_start(0.02)
    for _ in range(3):
        limiter.on_finish(0.01, 0.03)
    assert not limiter.probing
    assert limiter.min_rtt == 0.01
    assert limiter.limit == 20  # initial limit once the probe is over
    assert limiter.capacity_estimate() == pytest.approx(2000.0)


def test_requests_started_before_a_probe_do_not_count_as_probe_samples() -> None:
    limiter = AdaptiveConcurrencyLimit(ConcurrencyParams(probe_samples=1))
    assert limiter.on_start(1.0)  # starts the probe at t = 1
    limiter.on_finish(5.0, 2.0)  # started at t = -3: queued before the probe
    assert limiter.probing
    limiter.on_start(2.0)
    limiter.on_finish(0.5, 2.5)
    assert limiter.min_rtt == 0.5


def test_limit_settles_at_the_gradient_fixed_point() -> None:
    limiter = AdaptiveConcurrencyLimit()
    _saturate(limiter, 0.0, 20.0, workers=10)
    assert limiter.min_rtt == pytest.approx(0.01)
    assert abs(limiter.limit - _fixed_point(10)) <= 2
    # saturated, limit / sampleRTT is the app's real capacity: 10 workers / 10 ms = 1000/s
    assert limiter.capacity_estimate() == pytest.approx(1000.0, rel=0.1)


def test_limit_shrinks_when_rtt_rises_and_grows_back_when_it_falls() -> None:
    limiter = AdaptiveConcurrencyLimit()
    now = _saturate(limiter, 0.0, 20.0, workers=20)
    healthy = limiter.limit
    assert abs(healthy - _fixed_point(20)) <= 2
    now = _saturate(limiter, now, 10.0, workers=5)  # app loses capacity: RTT rises
    degraded = limiter.limit
    assert abs(degraded - _fixed_point(5)) <= 2
    assert limiter.sample_rtt is not None and limiter.min_rtt is not None
    assert limiter.sample_rtt > 1.5 * limiter.min_rtt
    _saturate(limiter, now, 10.0, workers=20)  # capacity is back: RTT falls
    assert degraded < healthy - 15
    assert abs(limiter.limit - healthy) <= 2


def test_an_app_limited_window_leaves_the_limit_alone() -> None:
    limiter = AdaptiveConcurrencyLimit()
    _saturate(limiter, 0.0, 1.0, workers=100, service=0.01)  # probe, then some growth
    now = 2.0

    def one_at_a_time(count: int) -> None:  # far below half the limit
        nonlocal now
        for _ in range(count):
            assert limiter.on_start(now)
            now += 0.01
            limiter.on_finish(0.01, now)

    one_at_a_time(20)  # closes the window that still saw the saturated peak
    before = limiter.estimated_limit
    one_at_a_time(200)
    assert limiter.estimated_limit == before


def test_min_rtt_is_re_measured_after_the_probe_interval_with_jitter() -> None:
    params = ConcurrencyParams(probe_interval=5.0, probe_jitter=0.2)
    limiter = AdaptiveConcurrencyLimit(params, rng=random.Random(7))
    now = _saturate(limiter, 0.0, 2.0, workers=10, service=0.01)
    assert limiter.min_rtt == pytest.approx(0.01)
    healthy = limiter.limit
    # the app becomes slower for good (no queueing involved): only a new probe can tell
    now = _saturate(limiter, now, 2.5, workers=10, service=0.03)
    assert limiter.min_rtt == pytest.approx(0.01)
    assert limiter.limit < healthy / 2  # RTT tripled against the old minRTT
    _saturate(limiter, now, 8.0, workers=10, service=0.03)
    assert limiter.min_rtt == pytest.approx(0.03)
    assert limiter.limit >= 15  # the limit recovers against the new baseline


def test_congestion_level_is_in_flight_over_limit_and_abandon_frees_a_slot() -> None:
    limiter = AdaptiveConcurrencyLimit(ConcurrencyParams(probe_limit=4, probe_samples=1))
    assert limiter.congestion_level() == 0.0
    limiter.on_start(0.0)
    limiter.on_start(0.0)
    assert limiter.congestion_level() == 0.5 and limiter.available() == 2
    limiter.on_abandon(0.1)
    assert limiter.in_flight == 1 and limiter.congestion_level() == 0.25


def test_finishing_without_starting_is_harmless() -> None:
    limiter = AdaptiveConcurrencyLimit(ConcurrencyParams(min_samples=1, update_interval=0.01))
    for i in range(5):
        limiter.on_finish(0.01, i * 0.1)
    assert limiter.in_flight == 0 and limiter.limit == 20 and limiter.min_rtt is None


def test_params_are_validated() -> None:
    with pytest.raises(ValueError):
        ConcurrencyParams(min_limit=10, initial_limit=5)
    with pytest.raises(ValueError):
        ConcurrencyParams(percentile=0.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.floats(1e-4, 2.0)), min_size=1, max_size=80))
def test_limit_stays_bounded_and_congestion_in_unit_interval(batches) -> None:
    params = ConcurrencyParams(min_limit=2, max_limit=50, probe_samples=3)
    limiter = AdaptiveConcurrencyLimit(params)
    now = 0.0
    for n, rtt in batches:
        started = sum(limiter.on_start(now) for _ in range(n))
        now += rtt
        for _ in range(started):
            limiter.on_finish(rtt, now)
        assert 0.0 <= limiter.congestion_level() <= 1.0
        assert params.min_limit <= limiter.estimated_limit <= params.max_limit
        assert not math.isnan(limiter.estimated_limit)
        assert limiter.in_flight == 0


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


def test_the_probe_never_pins_the_limit_below_min_limit() -> None:
    # soak, 2026-12-02: min_limit 8 (the pod's servers), probe_limit 3: the probe read 3
    limiter = AdaptiveConcurrencyLimit(ConcurrencyParams(min_limit=8, probe_limit=3,
                                                         probe_samples=10))
    assert [limiter.on_start(0.0) for _ in range(9)] == [True] * 8 + [False]
    assert limiter.probing and limiter.limit == 8 and limiter.congestion_level() == 1.0
    for _ in range(8):
        limiter.on_finish(0.04, 0.04)
    assert limiter.probing  # 8 of the 10 samples
    assert limiter.limit == 8 and limiter.available() == 8
    # a probe_limit above min_limit is kept as it is
    other = AdaptiveConcurrencyLimit(ConcurrencyParams(min_limit=2, probe_limit=5))
    assert other.on_start(0.0) and other.probing and other.limit == 5


def _slow_pod(params: ConcurrencyParams, seconds: float) -> AdaptiveConcurrencyLimit:
    """An app that never queues but answers 3 of 5 requests 500 ms late (the soak's slow pod):
    RTT 40 ms or 540 ms whatever the load. 400 requests/s offered, one every 2.5 ms; each
    takes a slot if one is free (else it is refused and forgotten)."""
    limiter = AdaptiveConcurrencyLimit(params)
    finishing: list[tuple[float, float]] = []  # (finish time, rtt), kept sorted
    for tick in range(int(seconds / 0.0025)):
        now = tick * 0.0025
        while finishing and finishing[0][0] <= now:
            end, rtt = finishing.pop(0)
            limiter.on_finish(rtt, end)
        if limiter.on_start(now):
            rtt = 0.54 if tick % 5 < 3 else 0.04
            finishing.append((now + rtt, rtt))
            finishing.sort()
    return limiter


def test_an_apps_own_slow_answers_are_not_congestion() -> None:
    # The median RTT is 540 ms against a minRTT of 40 ms: the median gradient reads
    # 1.5 * 0.04 / 0.54 = 0.11 (clamped to 0.5) in most windows and the limit falls to its
    # floor, although the app never queues. The standing RTT (10th percentile, the window's
    # fast answers) stays at 40 ms: gradient 1, and the limit grows until the app is
    # app-limited (in flight 400/s * mean RTT 0.34 s = 136 < limit / 2).
    median = _slow_pod(ConcurrencyParams(min_limit=8, percentile=0.5), 20.0)
    standing = _slow_pod(ConcurrencyParams(min_limit=8), 20.0)
    assert median.min_rtt == pytest.approx(0.04) and standing.min_rtt == pytest.approx(0.04)
    assert median.estimated_limit < 12  # near its floor of 8 (a fast median now and then)
    assert standing.sample_rtt == pytest.approx(0.04)
    assert standing.estimated_limit > 136
    # Little's law on the mean RTT of the window (mean of 3 x 0.54 and 2 x 0.04 = 0.34 s)
    assert standing.mean_rtt == pytest.approx(0.34, abs=0.05)
    capacity = standing.capacity_estimate()
    assert capacity is not None
    assert capacity == pytest.approx(standing.estimated_limit / standing.mean_rtt)


def test_queueing_behind_slow_answers_still_shrinks_the_limit() -> None:
    # the same slow pod, but now every answer also waits behind the others: RTT + 10 ms per
    # request in flight above 8 (a queue). The fastest answers slow down too, so the
    # standing RTT rises and the limit comes down from its start of 20.
    limiter = AdaptiveConcurrencyLimit(ConcurrencyParams(min_limit=8))
    finishing: list[tuple[float, float]] = []
    for tick in range(int(20.0 / 0.0025)):
        now = tick * 0.0025
        while finishing and finishing[0][0] <= now:
            end, rtt = finishing.pop(0)
            limiter.on_finish(rtt, end)
        if limiter.on_start(now):
            base = 0.54 if tick % 5 < 3 else 0.04
            rtt = base + 0.01 * max(0, limiter.in_flight - 8)
            finishing.append((now + rtt, rtt))
            finishing.sort()
    assert limiter.min_rtt is not None and limiter.min_rtt < 0.06
    assert limiter.estimated_limit < 20
