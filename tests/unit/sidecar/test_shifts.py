"""sidecar.shifts: log lines when the policy moves traffic off an endpoint and back."""

from __future__ import annotations

import math

from mesh.policy import EndpointView, PolicySnapshot
from sidecar.shifts import DWELL, ShiftLog

A, B, C, D = (f"http://10.0.0.{i}:80" for i in range(1, 5))


def snap(weights: dict[str, float], *, latency: dict[str, float] | None = None,
         counts: dict[str, tuple[int, int]] | None = None, policy: str = "equilibrium",
         usable: int | None = None, following: bool = False,
         out: tuple[str, ...] = ()) -> PolicySnapshot:
    """``out``: the endpoints ejected or draining (``usable`` counts the others)."""
    latency = latency or {}
    counts = counts or {}
    views = [EndpointView(e, w, latency.get(e, 0.010), 0.0, 0, *counts.get(e, (0, 0)),
                          usable=e not in out)
             for e, w in weights.items()]
    return PolicySnapshot(policy, weights, views, usable=usable, following=following)


def run(log: ShiftLog, snapshot: PolicySnapshot, start: float, seconds: float,
        upstream: str = "svc") -> list[str]:
    """The lines of ``snapshot`` held for ``seconds``, one tick a second from ``start``."""
    lines: list[str] = []
    for t in range(int(seconds) + 1):
        lines += log.observe(upstream, snapshot, start + t)
    return lines


def test_an_endpoint_shifted_off_and_back_is_logged_once_each_way() -> None:
    log = ShiftLog()
    even = {A: 0.25, B: 0.25, C: 0.25, D: 0.25}
    assert run(log, snap(even), 0, 5) == []
    slow = {A: 0.33, B: 0.33, C: 0.33, D: 0.01}
    [line] = run(log, snap(slow, latency={D: 0.512}, counts={D: (40, 3)}), 6, DWELL + 5)
    assert line == (f"upstream svc: traffic shifted off {D} 10 s ago (share 1.0% of 4 usable "
                    "endpoints; "
                    "latency estimate 512 ms, best 10 ms; 3 failures in 40 requests in the "
                    "last 20 s)")  # the counts before the fall, a dwell ago
    hover = {A: 0.30, B: 0.30, C: 0.30, D: 0.10}  # between the two marks: nothing
    assert run(log, snap(hover), 30, 30) == []
    [back] = run(log, snap({A: 0.26, B: 0.26, C: 0.26, D: 0.22}), 70, DWELL + 5)
    # the time of the line is a dwell after the crossing: the line says so
    assert back.startswith(f"upstream svc: {D} back in rotation 10 s ago (share 22.0% of 4 "
                           "usable")


def test_a_dip_shorter_than_the_dwell_says_nothing() -> None:
    log = ShiftLog()
    assert run(log, snap({A: 0.5, B: 0.5}), 0, 2) == []
    for start in range(10, 200, 20):  # dips of DWELL - 2 s, then back to even
        assert run(log, snap({A: 0.99, B: 0.01}), start, DWELL - 2) == []
        assert run(log, snap({A: 0.5, B: 0.5}), start + DWELL, 5) == []


def test_failures_are_those_of_the_last_window() -> None:
    log = ShiftLog()
    even = {A: 0.5, B: 0.5}
    log.observe("svc", snap(even, counts={B: (1000, 500)}), 0.0)  # an old bad spell
    log.observe("svc", snap(even, counts={B: (1100, 500)}), 5.0)
    lines = []
    for t in range(12, 12 + int(DWELL) + 1):
        lines += log.observe("svc", snap({A: 0.95, B: 0.05}, counts={B: (1200, 520)}), t)
    [line] = lines
    # the window reaches back past the dwell (the line comes DWELL s after the fall) to the
    # sample at 5 s, not to the old spell at 0
    assert "20 failures in 100 requests in the last 20 s" in line
    log = ShiftLog()
    log.observe("svc", snap(even, counts={B: (1000, 500)}), 0.0)
    log.observe("svc", snap(even, counts={B: (1100, 500)}), 5.0)
    log.observe("svc", snap({A: 0.95, B: 0.05}, counts={B: (1150, 510)}), 6.0)
    lines = []
    for t in range(16, 40):  # a quiet spell after the shift: only recent counts are said
        lines += log.observe("svc", snap({A: 0.95, B: 0.05}, counts={B: (1200, 520)}), t)
    [line] = lines
    assert "20 failures in 200 requests in the last 20 s" in line  # since the sample at 0


def test_the_failures_that_shifted_traffic_off_are_in_its_line() -> None:
    # A helper's finding: an endpoint ejected for its failures was said to have "0
    # failures in 0 requests in the last 10 s": the line comes a dwell after the fall, and
    # the failures that caused it were older than the window.
    log = ShiftLog()
    log.observe("svc", snap({A: 0.5, B: 0.5}, counts={B: (100, 0)}), 0.0)
    log.observe("svc", snap({A: 1.0, B: 0.0}, counts={B: (112, 12)}, usable=1), 1.0)
    lines = run(log, snap({A: 1.0, B: 0.0}, counts={B: (112, 12)}, usable=1), 2, DWELL + 2)
    [line] = lines
    assert line.startswith(f"upstream svc: traffic shifted off {B} ")
    assert "12 failures in 12 requests in the last 20 s" in line


def test_the_one_usable_endpoint_left_is_not_said_to_be_shifted_off() -> None:
    # A helper's finding: with one pod ejected and one left, the line named the healthy
    # pod carrying all the traffic ("share 100.0% of 1 usable endpoints").
    log = ShiftLog()
    run(log, snap({A: 0.5, B: 0.5}), 0, 2)
    lines = run(log, snap({A: 1.0, B: 0.0}, usable=1), 3, 3 * DWELL)
    assert [line.split()[5] for line in lines] == [B]


def test_an_endpoint_added_later_ramps_in_without_a_line() -> None:
    log = ShiftLog()
    run(log, snap({A: 0.5, B: 0.5}), 0, 5)
    # a scale-up: C starts from nothing and climbs (the policy's ramp)
    assert run(log, snap({A: 0.48, B: 0.48, C: 0.04}), 6, DWELL + 5) == []
    assert run(log, snap({A: 0.34, B: 0.33, C: 0.33}), 30, DWELL + 5) == []
    # in rotation now: a later fall is said
    assert len(run(log, snap({A: 0.49, B: 0.49, C: 0.02}), 60, DWELL + 5)) == 1


def test_an_endpoint_out_of_use_is_said_to_be() -> None:
    log = ShiftLog()
    run(log, snap({A: 0.25, B: 0.25, C: 0.25, D: 0.25}), 0, 2)
    # two of four ejected or draining: out of the usable count, share nothing
    lines = run(log, snap({A: 0.8, B: 0.2, C: 0.0, D: 0.0}, usable=2, out=(C, D)), 3,
                DWELL + 2)
    assert [line.split()[5] for line in lines] == [C, D]
    assert all("of 2 usable endpoints" in line and "out of use (ejected or draining)" in line
               for line in lines)
    [line] = run(log, snap({A: 0.9, B: 0.1, C: 0.0, D: 0.0}, usable=2, out=(C, D)), 20,
                 DWELL + 2)
    assert f"shifted off {B} 10 s ago (share 10.0% of 2 usable" in line and "out of use" not in line


def test_a_pod_shifted_off_for_its_latency_is_not_said_to_be_out_of_use() -> None:
    # A helper's finding: the line of a pod moved off for its latency alone said "out of
    # use (ejected or draining)" because another pod was ejected and its weight was 0.
    log = ShiftLog()
    run(log, snap({A: 0.25, B: 0.25, C: 0.25, D: 0.25}), 0, 2)
    lines = run(log, snap({A: 0.5, B: 0.5, C: 0.0, D: 0.0}, usable=3, out=(D,),
                          latency={C: 0.5}), 3, DWELL + 2)
    by_pod = {line.split()[5]: line for line in lines}
    assert "out of use" not in by_pod[C] and "latency estimate 500 ms" in by_pod[C]
    assert "out of use (ejected or draining)" in by_pod[D]


def test_a_hung_pod_is_said_to_leave_requests_unanswered() -> None:
    # A helper's finding: a hung pod's line read "latency estimate 15 ms, best 12 ms; 0
    # failures in 166 requests", which says nothing of why traffic moved.
    log = ShiftLog()
    run(log, snap({A: 0.25, B: 0.25, C: 0.25, D: 0.25}), 0, 2)
    views = [EndpointView(e, w, 0.015 if e == D else 0.012, 0.0, 20 if e == D else 0, 166, 0,
                          stalled=1.25 if e == D else 0.0)
             for e, w in {A: 0.33, B: 0.33, C: 0.33, D: 0.01}.items()]
    hung = PolicySnapshot("equilibrium", {v.endpoint: v.weight for v in views}, views)
    [line] = run(log, hung, 3, DWELL + 2)
    assert line.endswith("; 20 requests in flight, unanswered for 1250 ms)"), line


def test_no_lines_for_a_lone_endpoint_or_the_baselines() -> None:
    log = ShiftLog()
    assert run(log, snap({A: 1.0}), 0, 20, "one") == []
    assert run(log, snap({A: 0.5, B: 0.5}, policy="peak-ewma"), 0, 2, "p2c") == []
    assert run(log, snap({A: 0.0, B: 1.0}, policy="peak-ewma"), 3, 20, "p2c") == []


def test_following_the_plan_and_unmeasured_latency_are_said() -> None:
    log = ShiftLog()
    run(log, snap({A: 0.5, B: 0.5}), 0, 2)
    [line] = run(log, snap({A: 1.0, B: 0.0}, latency={A: math.nan, B: math.inf},
                           following=True), 3, DWELL + 2)
    assert "latency estimate unmeasured, best unmeasured" in line
    assert line.endswith("; following the signaler's plan)")


def test_endpoints_and_upstreams_that_go_are_forgotten() -> None:
    log = ShiftLog()
    run(log, snap({A: 0.5, B: 0.5}), 0, 2)
    assert len(run(log, snap({A: 0.99, B: 0.01}), 3, DWELL + 2)) == 1  # B off
    run(log, snap({A: 0.5, C: 0.5}), 20, 2)  # B removed, C added
    assert run(log, snap({A: 0.5, B: 0.5}), 30, DWELL + 2) == []  # B again: new, ramping
    log.keep({"other"})
    run(log, snap({A: 0.5, B: 0.5}), 50, 2)  # a fresh upstream: both in rotation at once
    assert len(run(log, snap({A: 0.99, B: 0.01}), 60, DWELL + 2)) == 1


def test_with_two_endpoints_the_caps_floor_is_as_far_as_traffic_goes() -> None:
    # a cap of 0.8: the other endpoint keeps 20 %, above a quarter of the fair 50 %
    log = ShiftLog(cap=0.8)
    run(log, snap({A: 0.5, B: 0.5}), 0, 2)
    [line] = run(log, snap({A: 0.8, B: 0.2}, latency={B: 0.5}), 3, DWELL + 2)
    assert f"shifted off {B} 10 s ago (share 20.0% of 2 usable endpoints, as far as the " \
           "anti-herd cap allows;" in line
    assert run(log, snap({A: 0.7, B: 0.3}), 20, DWELL + 2) == []  # under the high mark
    [back] = run(log, snap({A: 0.55, B: 0.45}), 40, DWELL + 2)
    assert back.startswith(f"upstream svc: {B} back in rotation 10 s ago (share 45.0%")
    # the same shares with no cap, or with many endpoints, keep the quarter-of-fair mark
    free = ShiftLog()
    run(free, snap({A: 0.5, B: 0.5}), 0, 2)
    assert run(free, snap({A: 0.8, B: 0.2}), 3, DWELL + 2) == []
    many = ShiftLog(cap=0.8)
    run(many, snap({A: 0.25, B: 0.25, C: 0.25, D: 0.25}), 0, 2)
    [line] = run(many, snap({A: 0.33, B: 0.33, C: 0.33, D: 0.01}), 3, DWELL + 2)
    assert "anti-herd" not in line
    # two usable beside one ejected: the ejected one's nothing is no cap's doing
    out = ShiftLog(cap=0.8)
    run(out, snap({A: 0.34, B: 0.33, C: 0.33}), 0, 2)
    [line] = run(out, snap({A: 0.5, B: 0.5, C: 0.0}, usable=2, out=(C,)), 3, DWELL + 2)
    assert f"shifted off {C} 10 s ago (share 0.0% of 2 usable endpoints;" in line, line
    assert "anti-herd" not in line and "out of use" in line


def test_an_ejection_is_said_at_once_however_short() -> None:
    # The stranger's finding: a hung pod ejected for 5 s left no line (the shares' lines
    # need a 10 s dwell) and no metric; only its requests' timeouts showed, 15 s later.
    log = ShiftLog()
    run(log, snap({A: 0.25, B: 0.25, C: 0.25, D: 0.25}), 0, 2)

    def ejected(counts: tuple[int, int]) -> PolicySnapshot:
        views = [EndpointView(e, 0.0 if e == D else 1 / 3, 0.012, 0.0, 3 if e == D else 0,
                              100, 0, usable=e != D, stalled=1.5 if e == D else 0.0,
                              ejected=counts if e == D else (0, 0))
                 for e in (A, B, C, D)]
        return PolicySnapshot("equilibrium", {v.endpoint: v.weight for v in views}, views,
                              usable=3)

    [line] = log.observe("svc", ejected((0, 1)), 3)
    assert line.startswith(f"upstream svc: {D} ejected (hung: it left requests unanswered; ")
    assert log.observe("svc", ejected((0, 1)), 4) == []  # once
    [line] = log.observe("svc", ejected((1, 1)), 5)
    assert line.startswith(f"upstream svc: {D} ejected (its requests failed in a row; ")
    log.keep(set())  # the upstream removed, and added back with the same stats: no news
    run(log, snap({A: 0.25, B: 0.25, C: 0.25}), 6, 1)
    assert log.observe("svc", ejected((1, 1)), 8) == []


def test_ejections_are_counted_by_reason_from_the_snapshots() -> None:
    from sidecar.metrics import SidecarMetrics

    metrics = SidecarMetrics()

    def seen(counts: tuple[int, int]) -> None:
        views = [EndpointView(A, 1.0, 0.01, 0.0, 0, 10, 0, ejected=counts)]
        metrics.outbound.observe_snapshot("svc", PolicySnapshot("equilibrium", {A: 1.0}, views))

    def count(reason: str) -> float | None:
        return metrics.registry.get_sample_value(
            "equilibrium_endpoint_ejections_total",
            {"upstream": "svc", "endpoint": A, "reason": reason})

    seen((0, 0))
    assert count("hung") is None
    seen((0, 2))
    seen((1, 2))
    seen((1, 2))
    assert (count("failures"), count("hung")) == (1.0, 2.0)
    metrics.outbound.forget_upstream("svc")
    assert count("hung") is None
    seen((1, 2))  # seen again with the same stats (a review's finding): no count twice
    assert count("hung") is None
    seen((1, 3))
    assert count("hung") == 1.0


def test_every_endpoint_out_of_use_is_said_once_and_its_end_too() -> None:
    """A stranger's finding: with every pod ejected, each read "traffic shifted off ...
    (share 0.0% of 0 usable endpoints)" while a last resort spread the traffic."""
    log = ShiftLog(cap=0.8)
    run(log, snap({A: 0.34, B: 0.33, C: 0.33}), 0, 2)
    lines = run(log, snap({A: 0.0, B: 0.0, C: 0.0}, usable=0, out=(A, B, C)), 3, DWELL + 2)
    assert lines == ["upstream svc: every endpoint is out of use (ejected or draining): as a "
                     "last resort each request goes to one that holds no request unanswered "
                     "and whose last request did not fail, if any, until one is back"]
    [back] = run(log, snap({A: 0.0, B: 1.0, C: 0.0}, usable=1, out=(A, C)), 20, 1)
    assert back == "upstream svc: 1 of 3 endpoints usable again"
    # a lone endpoint's ejection is said by its own line: nothing more
    alone = ShiftLog(cap=0.8)
    run(alone, snap({A: 1.0}), 0, 2)
    assert run(alone, snap({A: 0.0}, usable=0, out=(A,)), 3, 2) == []
