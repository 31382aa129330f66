"""Whole simulated runs: determinism, the fast paths against the full-fidelity ones, the CLI.

- the same command and seed print the same JSON (apart from ``wall``), in two processes with
  different hash seeds, with the signaler in the loop (``equilibrium-ce``);
- the numpy metrics equal :func:`equilibrium.lab.analysis.run_metrics` on the same records;
- skipping the observers' snapshot on ticks (the fast path) changes no decision;
- the scenarios do what they say (the bad pod is avoided, the recovering pod is readmitted,
  churn's refused connections are retried).
"""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from equilibrium.lab import analysis
from equilibrium.lab.loadgen import Record
from equilibrium.lab.simulate import metrics
from equilibrium.lab.simulate.engine import Knobs, simulate
from equilibrium.lab.simulate.scenarios import Sizes, build


def run_cli(args: list[str], hash_seed: str) -> dict[str, object]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    out = subprocess.run([sys.executable, "-m", "equilibrium.cli", "simulate", *args, "--json"],
                         capture_output=True, text=True, env=env, timeout=240, check=True)
    doc = json.loads(out.stdout)
    assert isinstance(doc, dict)
    return doc


@pytest.mark.slow
def test_same_command_and_seed_give_the_same_json() -> None:
    args = ["--scenario", "herding", "--sidecars", "2", "--duration", "4", "--seed", "5",
            "--policies", "equilibrium,equilibrium-ce"]
    first, second = run_cli(args, "1"), run_cli(args, "2")
    assert first["requests"] == pytest.approx(2 * 27.5 * (5 + 4) * 2, abs=4)
    first.pop("wall"), second.pop("wall")
    assert first == second
    policies = first["policies"]
    assert isinstance(policies, dict)
    assert policies["equilibrium-ce"]["signaler"]["published"] > 0
    other = run_cli([*args[:-2], "--seed", "6", *args[-2:]], "1")
    other.pop("wall")
    assert other != first  # the seed matters


def records_of(result: object) -> list[Record]:
    rec = result.records  # type: ignore[attr-defined]
    return [Record(client=str(rec.sidecar[i]), seq=i, intended=rec.intended[i],
                   latency=rec.latency[i], status=200 if rec.ok[i] else 0,
                   pod=f"pod-{rec.pod[i]}" if rec.pod[i] >= 0 else None)
            for i in range(len(rec))]


def test_numpy_metrics_equal_the_bench_analysis() -> None:
    setup = build("slow-pod", Sizes(2, 5, 100.0, 12.0))
    result = simulate(setup, "equilibrium", seed=2)
    fast = metrics.run_metrics(result.records, 0.0, 12.0, 5, 4)
    names = [f"pod-{i}" for i in range(5)]
    slow: dict[str, Any] = analysis.run_metrics(records_of(result), 0.0, 12.0, names,
                                                "pod-4").as_dict()
    for key in ("requests", "errors", "bad_share", "bad_share_first", "bad_share_steady",
                "time_to_shift", "first_under", "relapses", "flapping_pp",
                "flapping_noise_pp", "pod_totals", "flap_window"):
        a, b = fast[key], slow[key]
        if isinstance(a, float) and math.isnan(a):
            assert isinstance(b, float) and math.isnan(b), key
        else:
            assert a == pytest.approx(b, rel=1e-12), key
    for part in ("latency", "steady_latency"):
        for key, value in slow[part].items():
            assert fast[part][key] == pytest.approx(value, rel=1e-12), (part, key)
    assert slow["bad_share"] > 0.0  # the learning phase did hit the bad pod


@pytest.mark.parametrize("policy", ["equilibrium", "peak-ewma"])
def test_skipping_the_snapshot_changes_no_decision(policy: str) -> None:
    setup = build("herding", Sizes(3, 4, None, 6.0))
    fast = simulate(setup, policy, seed=4, observed=False)
    full = simulate(setup, policy, seed=4, observed=True)
    assert fast.records.pod == full.records.pod
    assert fast.records.latency == full.records.latency
    assert fast.sidecars == full.sidecars


def test_a_run_gives_the_collector_back_as_it_found_it() -> None:
    """The event loop runs with the engine's ``LONG_RUN_COLLECTOR`` (no full collections over
    the fleet's long-lived objects) and leaves the caller's thresholds as they were."""
    before = gc.get_threshold()
    gc.set_threshold(500, 7, 9)
    try:
        setup = build("herding", Sizes(3, 4, None, 2.0))
        for _ in range(2):
            assert len(simulate(setup, "equilibrium", seed=2).records) > 0
            assert gc.get_threshold() == (500, 7, 9)
    finally:
        gc.set_threshold(*before)


def test_churn_retries_refused_connections_and_uses_the_new_pod() -> None:
    setup = build("churn", Sizes(4, 4, 40.0, 10.0))
    result = simulate(setup, "equilibrium", seed=1, knobs=Knobs(discovery_delay=1.0))
    assert result.retries > 0  # pod-0 refused connections until discovery dropped it
    m = metrics.run_metrics(result.records, 0.0, 10.0, 5, setup.tracked)
    assert m["errors"] == 0  # every refused attempt found another pod
    shares = metrics.pod_shares(result.records, 9.0, 10.0, 5)
    assert shares[0] == 0.0 and shares[4] > 0.05  # pod-0 is gone, pod-4 joined


def test_slow_pod_is_avoided_and_recovery_readmits_it() -> None:
    setup = build("slow-pod", Sizes(2, 5, 100.0, 10.0))
    m = metrics.run_metrics(simulate(setup, "equilibrium", seed=1).records, 0.0, 10.0, 5, 4)
    assert m["bad_share_steady"] < 0.03
    rec = build("recovery", Sizes(4, 4, 50.0, 45.0))
    result = simulate(rec, "equilibrium", seed=1)
    series = metrics.window_series(result.records, 0.0, 45.0, 4, 3)
    out = metrics.recovery_metrics(series, 15.0, 4)
    # readmitted within the run (healed at 15 s of 45); the queue-aware pacer that now runs
    # during local learning (issue 12) made it 25 s on this seed, from under 25 before
    assert out["time_to_readmit"] is not None and out["time_to_readmit"] <= 30.0
    before = metrics.pod_shares(result.records, 10.0, 15.0, 4)[3]
    assert before < 0.05


def test_knobs_move_the_latency_as_documented() -> None:
    setup = replace(build("slow-pod", Sizes(1, 2, 50.0, 4.0)), pods=build(
        "slow-pod", Sizes(1, 3, 50.0, 4.0)).pods[:2])
    base = simulate(setup, "round-robin", seed=1, knobs=Knobs(network=0.0, overhead=0.0))
    more = simulate(setup, "round-robin", seed=1, knobs=Knobs(network=0.002, overhead=0.003))
    diff = [b - a for a, b in zip(base.records.latency, more.records.latency, strict=True)]
    assert min(diff) == pytest.approx(0.007) and max(diff) == pytest.approx(0.007)
    noisy = simulate(setup, "round-robin", seed=1, knobs=Knobs(network=0.0, overhead=0.0,
                                                               jitter=0.01))
    # paired by request (one client: its intended starts are distinct), not by the order in
    # which they finished, which the jitter changes
    by_start = {i: lat for i, lat in zip(base.records.intended, base.records.latency,
                                         strict=True)}
    extra = [lat - by_start[i] for i, lat in zip(noisy.records.intended,
                                                 noisy.records.latency, strict=True)]
    assert min(extra) >= 0.0
    assert sum(extra) / len(extra) == pytest.approx(0.01, rel=0.15)  # exponential, mean 10 ms


def test_cli_writes_the_report_and_refuses_unknown_policies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from equilibrium.cli import main

    code = main(["simulate", "--scenario", "slow-pod", "--duration", "3", "--policies",
                 "round-robin,equilibrium", "--out", str(tmp_path)])
    assert code == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["simulate-slow-pod.json", "simulate-slow-pod.md", "simulate-slow-pod.png"]
    doc = json.loads((tmp_path / "simulate-slow-pod.json").read_text())
    assert set(doc["policies"]) == {"round-robin", "equilibrium"}
    assert doc["policies"]["round-robin"]["bad_share"] == pytest.approx(0.2, abs=0.01)
    assert "| round-robin |" in capsys.readouterr().out
    assert main(["simulate", "--scenario", "slow-pod", "--policies", "fastest"]) == 2
    assert "unknown policy fastest" in capsys.readouterr().err


def test_the_recorded_command_gives_back_every_option() -> None:
    import argparse
    import shlex

    from equilibrium.lab.simulate import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    given = ["--scenario", "churn", "--sidecars", "7", "--endpoints", "5", "--duration", "2.5",
             "--rate", "12.25", "--strategy", "conservative", "--distribution", "pareto",
             "--arrivals", "poisson", "--network", "0.0005", "--overhead", "0",
             "--jitter", "0.001", "--epoch", "0.5", "--tokens", "8", "--cohort", "3",
             "--seed", "9", "--policies", "equilibrium,peak-ewma"]
    args = parser.parse_args(given)
    assert set(cli.RECORDED) | {"scenario", "seed", "policies", "json", "out", "workers"} \
        == set(vars(args))  # a new option must be recorded (or listed here)
    command = " ".join(shlex.quote(a) for a in cli.recorded_argv(args))
    assert vars(parser.parse_args(shlex.split(command))) == vars(args)
    defaults = parser.parse_args(["--scenario", "herding"])
    assert cli.recorded_argv(defaults) == ["--scenario", "herding", "--seed", "1"]


def test_a_cohort_shares_one_routing_state_and_keeps_every_clients_load() -> None:
    setup = build("herding", Sizes(7, 4, 20.0, 4.0))
    result = simulate(setup, "equilibrium", seed=3, knobs=Knobs(cohort=3))
    assert result.sidecars["count"] == 3  # clients 0-2, 3-5 and 6
    assert sorted(set(result.records.sidecar)) == list(range(7))
    assert len(result.records) == pytest.approx(7 * 20.0 * setup.total, abs=7)
    churn = build("churn", Sizes(8, 4, 40.0, 10.0))  # a tenth of the clients leave and join
    moved = simulate(churn, "equilibrium", seed=1, knobs=Knobs(cohort=2))
    assert moved.retries > 0
    assert metrics.run_metrics(moved.records, 0.0, 10.0, 5, churn.tracked)["errors"] == 0
    with pytest.raises(ValueError, match="cohort"):
        Knobs(cohort=0)


def test_cohorts_are_faithful_for_peak_ewma_at_small_sizes() -> None:
    """The cross-check docs/simulate.md reports: peak-EWMA, whose routing state is a cost per
    endpoint however many clients feed it, gives the same shares and mean whether 40 clients
    have 40 sidecars or 4."""
    setup = build("herding", Sizes(40, 8, None, 20.0))
    full = simulate(setup, "peak-ewma", seed=1)
    pooled = simulate(setup, "peak-ewma", seed=1, knobs=Knobs(cohort=10))
    t0, half, end = setup.warmup, setup.warmup + 10.0, setup.total
    a = metrics.pod_shares(full.records, half, end, 8)
    b = metrics.pod_shares(pooled.records, half, end, 8)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 0.03
    mean_a = metrics.run_metrics(full.records, t0, 20.0, 8, None)["latency"]["mean"]
    mean_b = metrics.run_metrics(pooled.records, t0, 20.0, 8, None)["latency"]["mean"]
    assert mean_b == pytest.approx(mean_a, rel=0.10)
    assert pooled.sidecars["count"] == 4 and full.sidecars["count"] == 40
