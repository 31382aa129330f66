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
