"""The herding benchmark's pure parts: the fleet it asks for and how it judges the target."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from equilibrium.lab.bench import peers
from equilibrium.lab.bench.harness import LoadResult
from equilibrium.lab.bench.herding import (
    CE_POLICY,
    SCENARIO,
    fleet_spec,
    measure,
    non_negative,
    peer_contenders,
    peer_tables,
    slowest_pair,
    targets_table,
)
from equilibrium.lab.bench.scenarios import Scenario
from equilibrium.lab.fleet import PodBehaviour
from equilibrium.lab.loadgen import Record


def test_the_fleet_is_one_small_fast_pod_and_big_slow_ones() -> None:
    pods = [PodBehaviour().updated(x) for x in json.loads(fleet_spec(100.0, 4, 25.0, 3))]
    assert [p.capacity for p in pods] == [1, 4, 4, 4]
    # idle, the small pod answers 4x faster; loaded, it saturates first (100 vs 100 req/s each)
    assert 1 / pods[0].service_rate * 4 == 1 / pods[1].service_rate
    assert pods[0].service_rate * 1 == pods[1].service_rate * 4


def test_scenario_interface_and_defaults() -> None:
    assert isinstance(SCENARIO, Scenario) and SCENARIO.name == "herding"
    assert SCENARIO.default_policies == ("peak-ewma", "equilibrium", CE_POLICY)
    # four callers at 55 % of the default fleet's 200 req/s
    assert SCENARIO.default_clients * SCENARIO.default_rate == pytest.approx(0.55 * 200)


def lat(mean: float, steady: float) -> dict[str, dict[str, float]]:
    return {"latency": {"mean": mean}, "steady_latency": {"mean": steady}}


def test_the_target_needs_ce_below_both_others() -> None:
    tables = targets_table({"peak-ewma": lat(0.05, 0.05), "equilibrium": lat(0.07, 0.06),
                            CE_POLICY: lat(0.06, 0.04)})
    verdicts = {row[0]: row[2] for row in tables[0].rows}
    assert verdicts == {
        "mean below equilibrium's": "met", "steady mean below equilibrium's": "met",
        "mean below peak-ewma's": "missed", "steady mean below peak-ewma's": "met",
    }
    nan = targets_table({"equilibrium": lat(math.nan, 0.1), CE_POLICY: lat(0.1, 0.1)})
    assert nan[0].rows[0][2] == "not measured"
    assert targets_table({"equilibrium": lat(0.1, 0.1)}) == []
    assert targets_table({CE_POLICY: lat(0.1, 0.1)}) == []  # nothing to compare with


def test_the_cold_start_is_measured_apart_from_the_run() -> None:
    # 10 s of records, 100 ms apart: the first 2 s are slow (cold start), then 2nd-half faster
    records = [
        Record("c1", i, 100.0 + i / 10, 0.5 if i < 20 else (0.04 if i < 60 else 0.02), 200,
               pod="pod-0" if i % 2 else "pod-1")
        for i in range(100)
    ]
    m = measure(LoadResult(t0=100.0, duration=10.0, records=records), ["pod-0", "pod-1"], 2.0)
    assert m["requests"] == 80
    assert m["cold_start_latency"]["mean"] == pytest.approx(0.5)
    assert m["latency"]["mean"] == pytest.approx((40 * 0.04 + 40 * 0.02) / 80)
    assert m["steady_latency"]["mean"] == pytest.approx(0.02)  # the 2nd half of 2..10 s
    assert m["steady_shares"] == {"pod-0": 0.5, "pod-1": 0.5}


def test_the_cold_start_length_must_be_a_number_of_seconds() -> None:
    assert non_negative("0") == 0.0 and non_negative("2.5") == 2.5
    for bad in ("-1", "nan", "inf", "five"):
        with pytest.raises(argparse.ArgumentTypeError):
            non_negative(bad)


def test_a_queue_one_caller_builds_towards_one_pod_is_named() -> None:
    # two callers, two pods; only c2's requests to pod-1 are slow
    records = [
        Record(c, i, 100.0 + i / 10, 1.0 if (c, pod) == ("c2", "pod-1") else 0.02, 200, pod=pod)
        for c in ("c1", "c2") for i in range(40) for pod in ("pod-0" if i % 2 else "pod-1",)
    ]
    m = measure(LoadResult(t0=100.0, duration=4.0, records=records), ["pod-0", "pod-1"])
    assert m["by_caller_pod"]["c2"]["pod-1"] == {"requests": 20, "mean": 1.0, "slow": 20}
    assert m["by_caller_pod"]["c1"]["pod-1"]["slow"] == 0
    assert m["by_pod"]["pod-1"]["mean"] == pytest.approx(0.51)
    assert slowest_pair(m["by_caller_pod"])[:2] == ("c2", "pod-1")
    assert slowest_pair({}) == ("", "", None)


def test_the_uniform_fleet_has_only_big_pods_with_fixed_service() -> None:
    spec = json.loads(fleet_spec(50.0, 4, 50.0, 3, uniform=True, service="fixed"))
    pods = [PodBehaviour().updated(x) for x in spec]
    assert [(p.capacity, p.service_rate, p.service_dist) for p in pods] == [(4, 50.0, "fixed")] * 3
    with pytest.raises(ValueError, match="service_dist"):
        PodBehaviour().updated({"service_dist": "gamma"})


def test_auto_peers_are_haproxy_leastconn_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peers, "installed", lambda server: True)
    assert [p.name for p in peer_contenders("auto")[0]] == [peers.REFERENCE]
    assert [p.name for p in peer_contenders("haproxy-random2,nginx-least-conn")[0]] == [
        "haproxy-random2", "nginx-least-conn"]
    assert peer_contenders("none") == ([], [])
    monkeypatch.setattr(peers, "installed", lambda server: False)
    chosen, notes = peer_contenders("auto")
    assert chosen == [] and "haproxy is not installed" in notes[0]


def quantiles(mean: float, p99: float) -> dict[str, dict[str, float]]:
    return {"latency": {"mean": mean, "p99": p99}, "steady_latency": {"mean": mean, "p99": p99}}


def test_contenders_are_judged_against_haproxy_leastconn() -> None:
    assert peer_tables({"equilibrium": quantiles(0.02, 0.03)}) == []  # no reference: no table
    ratios, target = peer_tables({"equilibrium": quantiles(0.0225, 0.030),
                                  "peak-ewma": quantiles(0.045, 0.025),
                                  peers.REFERENCE: quantiles(0.0225, 0.025)})
    assert ratios.rows[0] == ["equilibrium", "1.00×", "1.20×", "1.00×", "1.20×"]
    assert ratios.rows[1][1:3] == ["2.00×", "1.00×"]
    assert [row[2] for row in target.rows] == ["met", "missed"]  # equal mean is no worse
