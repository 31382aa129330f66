"""The plot of a simulated run (matplotlib, Agg; the ``lab`` extra).

Owns the figure only: per policy, the tracked pod's share in 1 s windows (when the scenario
tracks one) and the p99 of every 1 s window, from the report document of
:mod:`equilibrium.lab.simulate.cli`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure


def _clean(values: list[Any], scale: float) -> list[float]:
    return [math.nan if v is None else float(v) * scale for v in values]


def plot_run(path: Path, doc: dict[str, Any]) -> Path:
    tracked = doc["parameters"]["tracked_pod"]
    fig = Figure(figsize=(10, 7 if tracked else 4), layout="constrained")
    axes = fig.subplots(2 if tracked else 1, 1, sharex=True, squeeze=False)[:, 0]
    for policy, m in doc["policies"].items():
        series = m["series"]
        if tracked:
            axes[0].plot(series["t"], _clean(series["tracked_share"], 100.0), label=policy)
        axes[-1].plot(series["t"], _clean(series["p99"], 1000.0), label=policy)
    if tracked:
        axes[0].set_ylabel(f"share sent to {tracked} (%)")
        axes[0].axhline(5, color="grey", linewidth=0.8, linestyle=":")
        axes[0].set_ylim(bottom=0)
    axes[-1].set_ylabel("p99 latency per 1 s window (ms)")
    axes[-1].set_yscale("log")
    axes[-1].set_xlabel("simulated seconds (after the warm-up)")
    axes[0].legend(fontsize="small")
    p = doc["parameters"]
    fig.suptitle(f"simulate {doc['scenario']}: {p['sidecars']} sidecars, {p['endpoints']} pods, "
                 f"seed {p['seed']}")
    fig.savefig(path, dpi=100)
    return path
