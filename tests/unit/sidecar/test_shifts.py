"""sidecar.shifts: log lines when the policy moves traffic off an endpoint and back."""

from __future__ import annotations

import math

from mesh.policy import EndpointView, PolicySnapshot
from sidecar.shifts import ShiftLog

A, B, C, D = (f"http://10.0.0.{i}:80" for i in range(1, 5))


def snap(weights: dict[str, float], *, latency: dict[str, float] | None = None,
         counts: dict[str, tuple[int, int]] | None = None, policy: str = "equilibrium",
         usable: int | None = None, following: bool = False) -> PolicySnapshot:
    latency = latency or {}
    counts = counts or {}
    views = [EndpointView(e, w, latency.get(e, 0.010), 0.0, 0, *counts.get(e, (0, 0)))
             for e, w in weights.items()]
    return PolicySnapshot(policy, weights, views, usable=usable, following=following)


def test_an_endpoint_shifted_off_and_back_is_logged_once_each_way() -> None:
    log = ShiftLog()
    even = {A: 0.25, B: 0.25, C: 0.25, D: 0.25}
    assert log.observe("svc", snap(even), 0.0) == []
    slow = {A: 0.33, B: 0.33, C: 0.33, D: 0.01}
    [line] = log.observe("svc", snap(slow, latency={D: 0.512}, counts={D: (40, 3)}), 1.0)
    assert line == (f"upstream svc: traffic shifted off {D} (share 1.0% of 4 endpoints; "
                    "latency estimate 512 ms, best 10 ms; 3 failures in 40 requests in the "
                    "last 10 s)")
    assert log.observe("svc", snap(slow), 2.0) == []  # still off: said once
    hover = {A: 0.30, B: 0.30, C: 0.30, D: 0.10}  # between the two marks: nothing
    assert log.observe("svc", snap(hover), 3.0) == []
    [back] = log.observe("svc", snap({A: 0.26, B: 0.26, C: 0.26, D: 0.22}), 4.0)
    assert back.startswith(f"upstream svc: {D} back in rotation (share 22.0% of 4 endpoints;")


def test_failures_are_those_of_the_last_window() -> None:
    log = ShiftLog()
    even = {A: 0.5, B: 0.5}
    log.observe("svc", snap(even, counts={B: (1000, 500)}), 0.0)  # an old bad spell
    log.observe("svc", snap(even, counts={B: (1100, 500)}), 5.0)
    [line] = log.observe("svc", snap({A: 0.95, B: 0.05}, counts={B: (1200, 520)}), 12.0)
    assert "20 failures in 100 requests in the last 10 s" in line  # since the sample at 5 s


def test_the_fair_share_counts_usable_endpoints_only() -> None:
    log = ShiftLog()
    # two of four ejected (their traffic shifted off, said as such); a share of 0.2 is 40 %
    # of the fair 0.5 among the usable two: above the mark
    weights = {A: 0.8, B: 0.2, C: 0.0, D: 0.0}
    lines = log.observe("svc", snap(weights, usable=2), 0.0)
    assert [line.split()[5] for line in lines] == [C, D]
    assert all("of 2 endpoints" in line for line in lines)
    [line] = log.observe("svc", snap({A: 0.9, B: 0.1, C: 0.0, D: 0.0}, usable=2), 1.0)
    assert f"shifted off {B} (share 10.0% of 2 endpoints" in line


def test_no_lines_for_a_lone_endpoint_baselines_or_no_weights() -> None:
    log = ShiftLog()
    assert log.observe("one", snap({A: 1.0}), 0.0) == []
    assert log.observe("p2c", snap({A: 0.0, B: 1.0}, policy="peak-ewma"), 0.0) == []
    assert log.observe("two", snap({A: 1.0, B: 0.0}, usable=1), 0.0) == []


def test_following_the_plan_and_unmeasured_latency_are_said() -> None:
    log = ShiftLog()
    log.observe("svc", snap({A: 0.5, B: 0.5}), 0.0)
    [line] = log.observe("svc", snap({A: 1.0, B: 0.0}, latency={A: math.nan, B: math.inf},
                                     following=True), 1.0)
    assert "latency estimate unmeasured, best unmeasured" in line
    assert line.endswith("; following the signaler's plan)")


def test_endpoints_and_upstreams_that_go_are_forgotten() -> None:
    log = ShiftLog()
    log.observe("svc", snap({A: 0.5, B: 0.5}), 0.0)
    log.observe("svc", snap({A: 0.99, B: 0.01}), 1.0)  # B off
    log.observe("svc", snap({A: 0.5, C: 0.5}), 2.0)  # B removed, C added
    assert log.observe("svc", snap({A: 0.5, B: 0.5}), 3.0) == []  # B again: a new endpoint
    log.keep({"other"})
    assert log.observe("svc", snap({A: 0.99, B: 0.01}), 4.0) != []  # fresh state
