"""Benchmark reports, the scenario registry, and the report metrics on known records."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
from pathlib import Path

import pytest

from equilibrium.lab import analysis
from equilibrium.lab.bench import cli
from equilibrium.lab.bench.report import (
    build_document,
    render_console,
    render_markdown,
    write_report,
)
from equilibrium.lab.bench.scenarios import (
    SCENARIOS,
    ScenarioResult,
    Table,
    all_scenarios,
    load_scenario,
)
from equilibrium.lab.loadgen import Record

MACHINE = {"platform": "Linux-test", "processor": "x86_64", "cpus": 2, "python": "3.11.7",
           "implementation": "CPython", "load_average": [0.5, 0.4, 0.3]}


def _doc() -> dict:
    result = ScenarioResult(
        parameters={"pods": 5, "order": "round-robin → equilibrium"},
        tables=[Table("latency", ["policy", "p99"], [["round-robin", "512.0 ms"],
                                                     ["equilibrium", "9.1 ms"], ["a | b", "1"]])],
        data={"p99": {"round-robin": 0.512, "equilibrium": math.nan}},
        notes=["a note"],
        files=["slow-pod-bad-share.png"],
    )
    started = dt.datetime(2026, 11, 26, 19, 0, 0, 123, tzinfo=dt.UTC)
    return build_document("slow-pod", "one bad pod", ["bench", "--scenario", "slow-pod"],
                          result, started, MACHINE)


def test_markdown_has_command_date_machine_tables_and_notes() -> None:
    md = render_markdown(_doc())
    assert "`equilibrium bench --scenario slow-pod`" in md
    assert "2026-11-26T19:00:00+00:00" in md
    assert "Linux-test, 2 CPUs (x86_64), CPython 3.11.7" in md
    assert "| policy | p99 |" in md
    assert "| equilibrium | 9.1 ms |" in md
    assert "| a \\| b | 1 |" in md  # a pipe in a cell cannot break the table
    assert md.index("### latency") < md.index("- a note")
    assert "order=round-robin → equilibrium" in md


def test_console_rendering_aligns_columns() -> None:
    text = render_console(_doc())
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("policy"))
    row = next(line for line in lines if line.startswith("round-robin"))
    assert header.index("p99") == row.index("512.0 ms")


def test_written_json_is_strict_and_nan_becomes_null(tmp_path: Path) -> None:
    json_path, md_path = write_report(_doc(), tmp_path / "out")
    doc = json.loads(json_path.read_text(), parse_constant=lambda c: pytest.fail(c))
    assert doc["data"]["p99"] == {"round-robin": 0.512, "equilibrium": None}
    assert doc["machine"]["cpus"] == 2
    assert md_path.read_text().startswith("## `slow-pod`")


def test_registry_loads_every_scenario_and_rejects_unknown() -> None:
    for name in SCENARIOS:
        assert load_scenario(name).name == name
    with pytest.raises(ValueError, match="unknown scenario 'nope'"):
        load_scenario("nope")


def test_a_scenario_module_that_fails_to_import_does_not_hide_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(SCENARIOS, "broken", "equilibrium.lab.bench.no_such_module")
    loaded, broken = all_scenarios()
    assert "slow-pod" in [s.name for s in loaded]
    assert list(broken) == ["broken"] and "ModuleNotFoundError" in broken["broken"]
    assert cli.main(_parse(["bench", "--scenario", "broken"])) == 2


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    return parser.parse_args(argv)


def test_cli_resolves_scenario_defaults_into_an_exact_command() -> None:
    args = _parse(["bench", "--scenario", "slow-pod", "--policies", "round-robin,equilibrium"])
    scenario, argv = cli.resolve(args)
    assert scenario.name == "slow-pod"
    assert args.policies == ["round-robin", "equilibrium"]
    assert args.duration == scenario.default_duration
    assert argv[:5] == ["bench", "--scenario", "slow-pod", "--policies",
                        "round-robin,equilibrium"]
    assert "--duration" in argv and "--rate" in argv
    assert args.clients == 2  # the scenario's default number of callers
    herding = _parse(["bench", "--scenario", "herding"])
    cli.resolve(herding)
    assert (herding.clients, herding.rate) == (4, 27.5)
    given = _parse(["bench", "--scenario", "herding", "--clients", "3"])
    cli.resolve(given)
    assert given.clients == 3
    args = _parse(["bench", "--policies", "equilibrium,equilibrium"])
    with pytest.raises(ValueError, match="twice"):
        cli.resolve(args)
    assert cli.main(_parse(["bench", "--scenario", "nope"])) == 2


# --- the report metrics on records with known answers -------------------------------------


def _records(shares: list[dict[str, int]], t0: float = 100.0) -> list[Record]:
    """One second per entry; each entry says how many requests each pod answered."""
    out = []
    seq = 0
    for second, counts in enumerate(shares):
        n = sum(counts.values())
        i = 0
        for pod, k in counts.items():
            for _ in range(k):
                out.append(Record("c", seq, t0 + second + i / n, 0.5 if pod == "bad" else 0.01,
                                  200, pod))
                seq += 1
                i += 1
    return out


def test_time_to_shift_flapping_and_shares_on_known_records() -> None:
    pods = ["a", "b", "bad"]
    seconds = [
        {"a": 40, "b": 40, "bad": 20},
        {"a": 45, "b": 45, "bad": 10},
        {"a": 47, "b": 47, "bad": 6},   # still >= 5 %
        {"a": 49, "b": 49, "bad": 2},
        {"a": 60, "b": 39, "bad": 1},
        {"a": 40, "b": 59, "bad": 1},
    ]
    recs = _records(seconds)
    wins = analysis.windows(recs, 100.0, 1.0, 6.0)
    assert [w.answered for w in wins] == [100] * 6
    assert analysis.share_series(wins, "bad") == [0.2, 0.1, 0.06, 0.02, 0.01, 0.01]
    assert analysis.time_to_shift(wins, "bad") == 3.0
    assert analysis.flapping_index(wins[3:], pods) == pytest.approx(20.0)
    assert analysis.flapping_index(wins[:1], pods) != analysis.flapping_index(wins[:1], pods)
    assert analysis.share_between(recs, "bad", 100.0, 102.0) == pytest.approx(0.15)
    m = analysis.run_metrics(recs, 100.0, 6.0, pods, "bad", flap_window=1.0, first_window=1.0)
    assert m.bad_share_first == pytest.approx(0.2)
    assert m.bad_share_steady == pytest.approx(4 / 300)
    assert m.time_to_shift == 3.0
    assert (m.first_under, m.relapses) == (3.0, 0)
    assert m.flapping_pp == pytest.approx(20.0)
    assert m.pod_totals["bad"] == 40
    assert m.steady_latency["p99"] == 0.5 and m.steady_latency["p50"] == 0.01


def test_time_to_shift_is_none_when_never_shifted_and_zero_when_never_high() -> None:
    stuck = analysis.windows(_records([{"a": 80, "bad": 20}] * 3), 100.0, 1.0, 3.0)
    assert analysis.time_to_shift(stuck, "bad") is None
    clean = analysis.windows(_records([{"a": 99, "bad": 1}] * 3), 100.0, 1.0, 3.0)
    assert analysis.time_to_shift(clean, "bad") == 0.0
    assert analysis.flapping_index(clean, ["a", "bad"]) == 0.0
    assert analysis.share_noise_pp(clean, ["a", "bad"]) > 0
    relapse = analysis.windows(
        _records([{"a": 80, "bad": 20}, {"a": 99, "bad": 1}, {"a": 90, "bad": 10},
                  {"a": 99, "bad": 1}]), 100.0, 1.0, 4.0)
    assert analysis.first_under(relapse, "bad") == (1.0, 1)
    assert analysis.time_to_shift(relapse, "bad") == 3.0
    assert analysis.first_under(stuck, "bad") == (None, 0)
