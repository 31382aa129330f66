"""signaler.lp_bench: the LP benchmark's table rows and their Markdown."""

from __future__ import annotations

from signaler.lp_bench import format_markdown, lp_solve_table


def test_benchmark_table_rows_and_markdown() -> None:
    rows = lp_solve_table([(4, 2), (6, 3)], repeats=1, regret_rounds=200, regret_runs=1)
    assert [(r["tokens"], r["endpoints"]) for r in rows] == [(4, 2), (6, 3)]
    for row in rows:
        assert row["method"] == "configuration-lp"
        assert row["system_optimum_ms"] <= row["best_ce_ms"] + 1e-9
        assert row["best_ce_ms"] <= row["pure_nash_ms"] + 1e-9
        assert row["pure_nash_ms"] <= row["worst_pure_nash_ms"]
        assert row["ce_gap"] <= 1e-6
    table = format_markdown(rows)
    lines = table.strip().splitlines()
    assert len(lines) == 4 and lines[2].startswith("| 4 × 2 | 5 | configuration-lp")


def test_one_shape_as_json_from_the_command_line() -> None:
    """``python -m signaler.lp_bench --tokens 32 --endpoints 20 --json``: one JSON object, the
    gap verified on the unpooled curves, the objective between the system optimum's and the
    pure Nash configuration's."""
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "signaler.lp_bench", "--tokens", "32", "--endpoints", "20",
         "--seed", "7", "--utilisation", "0.95", "--repeats", "1", "--json"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    row = json.loads(done.stdout)
    assert row["method"] == "column-generation"
    assert row["status"] in {"optimal", "feasible"}
    for key in ("seconds", "first_seconds", "ce_gap", "objective", "system_optimum_objective"):
        assert isinstance(row[key], float)
    assert row["ce_gap"] <= 1e-6 * row["objective"]
    assert row["system_optimum_objective"] - 1e-9 <= row["objective"]
    assert row["objective"] <= row["pure_nash_objective"] + 1e-9


def test_one_shape_needs_both_sizes() -> None:
    import pytest

    from signaler.lp_bench import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--tokens", "8"])
    assert exit_info.value.code == 2
