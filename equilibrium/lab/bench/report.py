"""Benchmark reports: the header (command, date, machine) and the JSON and Markdown files.

Owns the layout of a result document::

    {"scenario", "summary", "command", "date", "machine": {...}, "parameters": {...},
     "tables": [{"title", "columns", "rows"}], "notes": [...], "data": {...}, "files": [...]}

and its rendering. Scenarios produce the tables and the data; they never format the header.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import shlex
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from equilibrium.lab.bench.scenarios import ScenarioResult


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured: platform, CPUs, Python, load when started."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    pressure = ""
    with contextlib.suppress(OSError):
        pressure = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    return {
        "cpu_pressure": pressure,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "load_average": load,
    }


def command_line(argv: Sequence[str]) -> str:
    return "equilibrium " + " ".join(shlex.quote(a) for a in argv)


def build_document(
    scenario: str, summary: str, argv: Sequence[str], result: ScenarioResult,
    started: dt.datetime, machine: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "scenario": scenario,
        "summary": summary,
        "command": command_line(argv),
        "date": started.replace(microsecond=0).isoformat(),
        "machine": machine if machine is not None else machine_info(),
        "parameters": result.parameters,
        "tables": [asdict(t) for t in result.tables],
        "notes": list(result.notes),
        "data": result.data,
        "files": list(result.files),
    }


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(_cell(c) for c in columns) + " |",
             "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(doc: dict[str, Any]) -> str:
    """The Markdown report of one scenario run."""
    m = doc["machine"]
    load = m.get("load_average") or []
    lines = [
        f"## `{doc['scenario']}` — {doc['summary']}",
        "",
        f"- command: `{doc['command']}`",
        f"- date: {doc['date']}",
        f"- machine: {m.get('platform')}, {m.get('cpus')} CPUs ({m.get('processor')}),"
        f" {m.get('implementation')} {m.get('python')}"
        + (f", load average at start {', '.join(str(x) for x in load)}" if load else ""),
    ]
    if m.get("cpu_pressure"):
        lines.append(f"- CPU pressure at start (Linux PSI, % of time some task waited for a "
                     f"CPU): `{m['cpu_pressure']}`")
    params = doc.get("parameters") or {}
    if params:
        lines.append("- parameters: " + ", ".join(f"{k}={v}" for k, v in params.items()))
    for table in doc["tables"]:
        lines += ["", render_table(table["title"], table["columns"], table["rows"])]
    if doc.get("notes"):
        lines += ["", *[f"- {n}" for n in doc["notes"]]]
    if doc.get("files"):
        lines += ["", "Files: " + ", ".join(f"`{f}`" for f in doc["files"])]
    return "\n".join(lines) + "\n"


def render_console(doc: dict[str, Any]) -> str:
    """Plain-text tables for the terminal."""
    out = []
    for table in doc["tables"]:
        cols = table["columns"]
        rows = [[str(c) for c in r] for r in table["rows"]]
        widths = [max(len(str(c)), *(len(r[i]) for r in rows)) if rows else len(str(c))
                  for i, c in enumerate(cols)]
        out.append(table["title"])
        out.append("  ".join(str(c).ljust(w) for c, w in zip(cols, widths, strict=True)))
        out.extend("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
        out.append("")
    out.extend(f"- {n}" for n in doc.get("notes", []))
    return "\n".join(out) + "\n"


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None, so the JSON is strict."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_report(doc: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``<scenario>.json`` and ``<scenario>.md`` into ``out``; returns both paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{doc['scenario']}.json"
    md_path = out / f"{doc['scenario']}.md"
    json_path.write_text(json.dumps(json_safe(doc), indent=2, allow_nan=False) + "\n")
    md_path.write_text(render_markdown(doc))
    return json_path, md_path


# --- cell formatting shared by scenarios --------------------------------------------------


def ms(seconds: float | None) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "—"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds * 1000:.0f} ms"


def pct(share: float | None) -> str:
    if share is None or (isinstance(share, float) and math.isnan(share)):
        return "—"
    return f"{share * 100:.1f} %"


def secs(value: float | None, never: str = "never") -> str:
    return never if value is None else f"{value:.0f} s"


def pp(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.1f} pp"
