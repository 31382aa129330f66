"""PNG plots of the demo and the benchmark (matplotlib, Agg; no display needed).

Owns the figures only: the caller passes plain series (times in seconds from the start of
the load). Figures are built with ``matplotlib.figure.Figure`` rather than pyplot, so no
global GUI state or backend switch is involved and plotting works on a headless machine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure


def _clean(values: Sequence[float]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def plot_demo(
    path: Path,
    share_times: Sequence[float],
    shares: Mapping[str, Sequence[float]],
    bad_pods: Sequence[str],
    state_times: Sequence[float],
    regrets: Mapping[str, Sequence[float]],
    nash_gaps: Mapping[str, Sequence[float]],
    title: str = "equilibrium demo",
    following: Mapping[str, Sequence[tuple[float, bool]]] | None = None,
) -> Path:
    """Three panels: traffic share per pod, regret per pod, Nash gap per sidecar; with
    ``following`` (per sidecar, (time, follows the signaler) readings) a fourth one shows when
    each sidecar followed the signaler's recommendation."""
    if following:
        fig = Figure(figsize=(10, 10.5), layout="constrained")
        ax_share, ax_regret, ax_gap, ax_follow = fig.subplots(
            4, 1, sharex=True, height_ratios=[3, 2, 2, 1.2])
    else:
        fig = Figure(figsize=(10, 9), layout="constrained")
        ax_share, ax_regret, ax_gap = fig.subplots(3, 1, sharex=True)
        ax_follow = None
    for pod, series in shares.items():
        bad = pod in bad_pods
        ax_share.plot(share_times, [v * 100 for v in _clean(series)],
                      label=pod + (" (bad)" if bad else ""),
                      linewidth=2.5 if bad else 1.2, linestyle="-" if bad else "--")
    ax_share.axhline(5, color="grey", linewidth=0.8, linestyle=":")
    ax_share.set_ylabel("traffic share (%)")
    ax_share.set_ylim(bottom=0)
    # One row above the panel: traffic can pile up anywhere in it, a legend inside would hide it.
    ax_share.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), fontsize="small",
                    ncol=max(1, len(shares)), frameon=False)
    fig.suptitle(title)

    for pod, series in regrets.items():
        ax_regret.plot(state_times, _clean(series), label=pod,
                       linewidth=2.5 if pod in bad_pods else 1.2)
    ax_regret.set_ylabel("regret (mean over sidecars)")
    if regrets:
        ax_regret.legend(loc="upper right", fontsize="small", ncol=2)

    for sidecar, series in nash_gaps.items():
        ax_gap.plot(state_times, _clean(series), label=sidecar)
    ax_gap.set_ylabel("Nash gap")
    if nash_gaps:
        ax_gap.legend(loc="upper right", fontsize="small")
    if ax_follow is not None and following:
        _plot_following(ax_follow, following)
        ax_follow.set_xlabel("seconds since the load started")
    else:
        ax_gap.set_xlabel("seconds since the load started")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _spans(points: Sequence[tuple[float, bool]]) -> list[tuple[float, float]]:
    """(start, width) of the runs of True readings; a reading covers until the next one (the
    last one only itself)."""
    spans: list[tuple[float, float]] = []
    for (t, on), nxt in zip(points, [*points[1:], None], strict=True):
        if not on:
            continue
        end = nxt[0] if nxt is not None else t
        if spans and math.isclose(spans[-1][0] + spans[-1][1], t):
            spans[-1] = (spans[-1][0], end - spans[-1][0])
        else:
            spans.append((t, end - t))
    return spans


def _plot_following(ax: Any, following: Mapping[str, Sequence[tuple[float, bool]]]) -> None:
    """One row per sidecar: filled where it followed the signaler, empty where it routed by
    local regret matching."""
    names = list(following)
    for row, name in enumerate(names):
        ax.broken_barh(_spans(sorted(following[name])), (row - 0.35, 0.7),
                       color="tab:green")
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.invert_yaxis()
    ax.set_ylabel("follows\nsignaler")
    ax.set_title("green: routes by the signaler's recommendation; blank: local regret matching"
                 " (fallback)", fontsize="small", loc="left")
    ax.grid(axis="x", linewidth=0.4, alpha=0.5)


def plot_bad_share(
    path: Path,
    times: Mapping[str, Sequence[float]],
    bad_share: Mapping[str, Sequence[float]],
    title: str,
) -> Path:
    """One line per policy: the bad pod's traffic share over time (benchmark)."""
    fig = Figure(figsize=(9, 4.5), layout="constrained")
    ax = fig.subplots()
    for policy, series in bad_share.items():
        ax.plot(times[policy], [v * 100 for v in _clean(series)], label=policy)
    ax.axhline(5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_ylabel("share sent to the bad pod (%)")
    ax.set_xlabel("seconds since the load started")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
