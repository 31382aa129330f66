"""The demo's live terminal view: one frame per second.

Owns turning a :class:`Frame` (what happened in the last window, what each sidecar reports)
into text. On a terminal the frame is redrawn in place with plain ANSI escapes (cursor up,
clear to end of screen); anywhere else (a pipe, a CI log) each frame is one line, so logs stay
readable. It does not collect anything itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

BAR_WIDTH = 20


@dataclass(slots=True)
class PodLine:
    name: str
    share: float
    p50: float
    p99: float
    bad: bool = False


@dataclass(slots=True)
class Frame:
    """Everything one redraw shows. ``states`` are the sidecars' ``/debug/state`` documents."""

    elapsed: float
    duration: float
    requests: int
    errors: int
    window: float
    pods: Sequence[PodLine]
    states: Mapping[str, Mapping[str, Any] | None]
    upstream: str
    extra: Sequence[str] = field(default_factory=tuple)
    #: the sidecars are in a signaling plane: show who follows the signaler
    signaling: bool = False


def fmt_ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    ms = seconds * 1000.0
    return f"{ms:.0f}ms" if ms >= 100 else f"{ms:.1f}ms"


def fmt_pct(share: float) -> str:
    return "-" if math.isnan(share) else f"{share * 100:.1f}%"


def _bar(share: float) -> str:
    if math.isnan(share):
        return " " * BAR_WIDTH
    filled = round(max(0.0, min(1.0, share)) * BAR_WIDTH)
    return "#" * filled + "." * (BAR_WIDTH - filled)


def coordination(up: Mapping[str, Any]) -> str:
    """Where a sidecar's weights come from, when it is in a signaling plane."""
    return ("follows signaler" if up.get("following")
            else "local regret matching (fallback)")


def sidecar_rows(frame: Frame) -> list[str]:
    """Per sidecar: policy, weight per pod, largest regret, Nash gap, converged, and with a
    signaler whether it follows the recommendation or falls back to local regret matching."""
    rows = []
    for sid, state in frame.states.items():
        up = (state or {}).get("upstreams", {}).get(frame.upstream) if state else None
        if not up:
            rows.append(f"  {sid:<10} (no state)")
            continue
        endpoints = up.get("endpoints", [])
        regrets = [float(ep.get("regret", 0.0)) for ep in endpoints]
        weights = [f"{float(ep.get('weight', 0.0)):.2f}" for ep in endpoints]
        rows.append(
            f"  {sid:<10} {up.get('policy', '?'):<12} w=[{' '.join(weights)}]"
            f"  regret={max(regrets, default=0.0):.4f}"
            f"  gap={float(up.get('nash_gap', 0.0)):.4f}"
            f"  flap={float(up.get('flapping', 0.0)):.3f}"
            f"  {'converged' if up.get('converged') else 'learning'}"
            + (f"  {coordination(up)}" if frame.signaling
               else ("  following" if up.get("following") else ""))
        )
    return rows


def render_frame(frame: Frame) -> list[str]:
    """The multi-line frame (terminal)."""
    lines = [
        f"equilibrium demo  t={frame.elapsed:4.0f}s / {frame.duration:.0f}s"
        f"  requests={frame.requests}  errors={frame.errors}"
        f"  (last {frame.window:.0f}s window)",
        f"  {'pod':<8} {'share':>6}  {'':<{BAR_WIDTH}}  {'p50':>7} {'p99':>7}",
    ]
    for pod in frame.pods:
        mark = " (bad)" if pod.bad else ""
        lines.append(
            f"  {pod.name:<8} {fmt_pct(pod.share):>6}  {_bar(pod.share)}"
            f"  {fmt_ms(pod.p50):>7} {fmt_ms(pod.p99):>7}{mark}"
        )
    following = sum(1 for state in frame.states.values()
                    if ((state or {}).get("upstreams") or {}).get(frame.upstream, {})
                    .get("following"))
    lines.append("  sidecars (weights in endpoint order"
                 + (f"; {following}/{len(frame.states)} follow the signaler):"
                    if frame.signaling else "):"))
    lines.extend(sidecar_rows(frame))
    lines.extend(frame.extra)
    return lines


def render_line(frame: Frame) -> str:
    """The one-line frame (not a terminal)."""
    shares = " ".join(
        f"{p.name}{'*' if p.bad else ''}={fmt_pct(p.share)}" for p in frame.pods
    )
    converged = following = 0
    gaps = []
    for state in frame.states.values():
        up = (state or {}).get("upstreams", {}).get(frame.upstream) if state else None
        if up:
            converged += int(bool(up.get("converged")))
            following += int(bool(up.get("following")))
            gaps.append(float(up.get("nash_gap", 0.0)))
    gap = f"{max(gaps):.4f}" if gaps else "-"
    follow = f" following={following}/{len(frame.states)}" if frame.signaling else ""
    extra = ("  " + " ".join(" ".join(e.split()) for e in frame.extra)) if frame.extra else ""
    return (
        f"t={frame.elapsed:.0f}s req={frame.requests} err={frame.errors} share: {shares}"
        f"  nash_gap={gap} converged={converged}/{len(frame.states)}{follow}{extra}"
    )


class LiveView:
    """Writes frames to ``stream``: redrawn in place on a TTY, one line each otherwise."""

    def __init__(self, stream: TextIO, tty: bool | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self._drawn = 0

    def show(self, frame: Frame) -> None:
        if self.tty:
            lines = render_frame(frame)
            up = f"\x1b[{self._drawn}F" if self._drawn else ""
            self.stream.write(up + "\x1b[J" + "\n".join(lines) + "\n")
            self._drawn = len(lines)
        else:
            self.stream.write(render_line(frame) + "\n")
        self.stream.flush()

    def release(self) -> None:
        """Stop redrawing in place: what is on screen stays, later output goes below."""
        self._drawn = 0
