"""equilibrium.lab.bench.report: the benchmark report as Markdown, console text and strict JSON."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import pytest

from equilibrium.lab.bench.report import (
    build_document,
    render_console,
    render_markdown,
    write_report,
)
from equilibrium.lab.bench.scenarios import ScenarioResult, Table

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
