"""The soak verdict (:mod:`equilibrium.lab.bench.soak_verdict`) on hand-made series, and how
the soak's load process classifies answers (:func:`equilibrium.lab.bench.soak_load.classify`)."""

from __future__ import annotations

import json

import pytest

from equilibrium.lab.bench.soak_load import classify
from equilibrium.lab.bench.soak_verdict import ResourceSample, Rules, growth_of, judge, windows

DURATION = 1000.0  # warm-up 0–200 s, first window 200–300 s, last window 900–1000 s


def series(first_rss: float, last_rss: float, *, fds: int = 20, last_fds: int | None = None,
           step: float = 10.0) -> list[ResourceSample]:
    """A process at ``first_rss`` KiB until 300 s, a straight ramp to ``last_rss`` at 900 s,
    then flat; a big warm-up peak at the start that the verdict must ignore."""
    out = []
    t = 0.0
    while t <= DURATION:
        if t < 100:
            rss = 3 * first_rss  # start-up: imports, first connections
        elif t < 300:
            rss = first_rss
        elif t < 900:
            rss = first_rss + (last_rss - first_rss) * (t - 300) / 600
        else:
            rss = last_rss
        n = fds if t < 900 or last_fds is None else last_fds
        out.append(ResourceSample(t, rss, n))
        t += step
    return out


def test_windows_follow_the_run() -> None:
    assert windows(DURATION, Rules()) == ((200.0, 300.0), (900.0, 1000.0))


def test_flat_memory_passes_despite_the_warm_up_peak() -> None:
    v = judge({"coop-1": series(60_000, 60_000)}, DURATION, {"coop-1": {}})
    assert v.passed, v.reasons
    assert v.growth["coop-1"].rss_growth == pytest.approx(0.0)


def test_growth_just_under_ten_percent_passes() -> None:
    v = judge({"pod-0-in": series(60_000, 60_000 * 1.099)}, DURATION, {})
    assert v.passed, v.reasons
    assert v.growth["pod-0-in"].rss_growth == pytest.approx(0.099)


def test_growth_just_over_ten_percent_fails_and_names_the_process() -> None:
    v = judge({"pod-0-in": series(60_000, 60_000 * 1.101), "coop-1": series(50_000, 50_000)},
              DURATION, {})
    assert not v.passed
    assert len(v.reasons) == 1
    assert v.reasons[0].startswith("pod-0-in: RSS grew +10.1%")


def test_one_spike_in_the_last_window_does_not_fail() -> None:
    s = series(60_000, 60_000)
    s[-3] = ResourceSample(s[-3].t, 90_000, 20)  # one GC peak among ten samples
    assert judge({"signaler": s}, DURATION, {}).passed


def test_too_few_samples_is_no_pass() -> None:
    sparse = [x for x in series(60_000, 60_000) if x.t < 220 or x.t > 975]  # 2 and 3 samples
    v = judge({"rogue": sparse}, DURATION, {})
    assert not v.passed
    assert "too few samples" in v.reasons[0]
    assert growth_of(sparse, DURATION, Rules()).rss_growth is None


def test_open_files_must_grow_by_ratio_and_by_count() -> None:
    small = judge({"a": series(60_000, 60_000, fds=20, last_fds=30)}, DURATION, {})
    assert small.passed, small.reasons  # +50 % but only 10 descriptors
    pool = judge({"a": series(60_000, 60_000, fds=81, last_fds=102)}, DURATION, {})
    assert pool.passed, pool.reasons  # a pool following a grown concurrency limit
    big = judge({"a": series(60_000, 60_000, fds=200, last_fds=300)}, DURATION, {})
    assert not big.passed  # a step in the last window: a new high at the end
    assert "open files grew +50.0%" in big.reasons[0]


def _fds(level: object) -> list[ResourceSample]:
    return [ResourceSample(t, 60_000, int(level(t)))  # type: ignore[operator]
            for t in range(0, int(DURATION) + 1, 10)]


def test_a_pool_that_grew_mid_run_and_stays_passes() -> None:
    """The 30-minute soak's outbound sidecar: 124 descriptors after the warm-up, 217 from a
    burst at a Redis kill on, ~210 to the end; a plateau, not a leak."""
    plateau = _fds(lambda t: 124 if t < 450 else 217 - (t // 10) % 7)
    verdict = judge({"a": plateau}, DURATION, {})
    assert verdict.passed, verdict.reasons


def test_a_slow_ramp_of_open_files_fails() -> None:
    """A leak of one descriptor every 5 s: no window is far above the one before it, but
    every quarter is above the last."""
    ramp = _fds(lambda t: 100 + max(0, t - 200) / 5)
    verdict = judge({"a": ramp}, DURATION, {})
    assert not verdict.passed
    assert "kept rising" in verdict.reasons[0]
    assert judge({"a": _fds(lambda t: 100 + max(0, t - 200) / 50)}, DURATION, {}).passed


def test_any_cooperative_failure_fails_and_is_listed_by_kind() -> None:
    fine = {"coop-1": series(60_000, 60_000)}
    v = judge(fine, DURATION, {"coop-1": {"503 queue-timeout@pod-0-in": 3,
                                          "transport timeout": 1}, "coop-2": {}})
    assert not v.passed
    assert v.reasons == ["cooperative caller coop-1: 4 failed requests "
                         "(3 × 503 queue-timeout@pod-0-in, 1 × transport timeout)"]


def test_an_exited_process_fails() -> None:
    v = judge({"coop-1": series(60_000, 60_000)}, DURATION, {}, exited=["signaler"])
    assert v.reasons == ["signaler: exited during the run"]


def body(**fields: str) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize(("status", "payload", "expected"), [
    (200, b"pod-0", ("ok", "")),
    (302, b"", ("ok", "")),
    # the caller's own sidecar backing off from a punishing upstream: shed by design
    (429, body(reason="punished-backoff", upstream="app"), ("shed", "429 punished-backoff@own")),
    # an inbound sidecar's refusals are failures, named by that sidecar
    (429, body(reason="punished", sidecar="pod-0-in"), ("fail", "429 punished@pod-0-in")),
    (503, body(reason="queue-timeout", sidecar="pod-1-in"),
     ("fail", "503 queue-timeout@pod-1-in")),
    # the caller's own sidecar failing is a failure
    (503, body(reason="no-endpoint", sidecar="coop-1"), ("fail", "503 no-endpoint@own")),
    # a punished-backoff claimed by another sidecar is not the caller's own shedding
    (429, body(reason="punished-backoff", sidecar="pod-0-in"),
     ("fail", "429 punished-backoff@pod-0-in")),
    (500, b"Internal Server Error", ("fail", "500 -@app")),
])
def test_classify(status: int, payload: bytes, expected: tuple[str, str]) -> None:
    assert classify(status, payload, "coop-1") == expected


def test_inbound_outcomes_are_read_per_caller_from_metrics_text() -> None:
    from equilibrium.lab.bench.soak import _outcomes

    text = "\n".join([
        "# TYPE equilibrium_inbound_requests_total counter",
        'equilibrium_inbound_requests_total{caller="coop-3",outcome="admitted"} 10768.0',
        'equilibrium_inbound_requests_total{caller="coop-3",outcome="throttled"} 151.0',
        'equilibrium_inbound_requests_total{caller="coop-3",outcome="queue-timeout"} 0.0',
        'equilibrium_inbound_requests_total{caller="coop-30",outcome="admitted"} 7.0',
        'equilibrium_inbound_requests_total{caller="rogue",outcome="admitted"} 1303.0',
    ])
    assert _outcomes(text, "coop-3") == {"admitted": 10768, "throttled": 151}
    assert _outcomes(text, "nobody") == {}
