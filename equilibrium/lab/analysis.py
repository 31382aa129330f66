"""What the demo and the benchmark compute from request records: shares, shifts, flapping.

Owns the definitions used in every report, so the demo's summary and the benchmark's tables
mean the same thing:

- *share* of a pod in a window: answered requests from that pod / answered requests, over
  requests whose intended start falls in the window (all clients together);
- *time to shift*: the end of the last window in which the bad pod's share was at or above
  the threshold (5 %), measured from the start of the load; 0 if it never was; None if it
  still was in the last window (it never shifted);
- *steady state*: the second half of the run (by intended start), for every policy alike;
- *flapping index*: the largest change of any pod's share between consecutive windows of
  the steady state, in percentage points. With randomised routing part of it is sampling
  noise; :func:`share_noise_pp` gives the 1-sigma noise of such a difference.

Pure functions over :class:`~equilibrium.lab.loadgen.Record` lists; no I/O.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from equilibrium.lab.loadgen import Record, latency_summary, percentile_sorted

SHIFT_THRESHOLD = 0.05
FLAP_WINDOW = 5.0


def default_flap_window(duration: float) -> float:
    """5 s windows, shorter for short runs so that the steady state holds 3 windows."""
    return min(FLAP_WINDOW, duration / 2.0 / 3.0)


@dataclass(slots=True)
class Window:
    """Requests whose intended start lies in [start, start + width) (seconds from t0)."""

    start: float
    width: float
    counts: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    pod_latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: int = 0

    @property
    def answered(self) -> int:
        return sum(self.counts.values())

    def share(self, pod: str) -> float:
        total = self.answered
        return self.counts.get(pod, 0) / total if total else math.nan

    def pod_percentile(self, pod: str, q: float) -> float:
        return percentile_sorted(sorted(self.pod_latencies.get(pod, [])), q)


def windows(
    records: Iterable[Record], t0: float, width: float, duration: float | None = None
) -> list[Window]:
    """Bucket ``records`` into consecutive windows of ``width`` s starting at ``t0``."""
    if width <= 0:
        raise ValueError("window width must be > 0")
    recs = list(records)
    end = duration if duration is not None else max((r.intended - t0 for r in recs), default=0)
    n = max(1, math.ceil(end / width - 1e-9))
    out = [Window(start=i * width, width=width) for i in range(n)]
    for rec in recs:
        index = int((rec.intended - t0) // width)
        if not 0 <= index < n:
            continue
        w = out[index]
        w.latencies.append(rec.latency)
        if rec.pod is not None and rec.ok:
            w.counts[rec.pod] = w.counts.get(rec.pod, 0) + 1
            w.pod_latencies.setdefault(rec.pod, []).append(rec.latency)
        if not rec.ok:
            w.errors += 1
    return out


def share_series(wins: Sequence[Window], pod: str) -> list[float]:
    return [w.share(pod) for w in wins]


def time_to_shift(
    wins: Sequence[Window], pod: str, threshold: float = SHIFT_THRESHOLD
) -> float | None:
    """Seconds until ``pod``'s share stays below ``threshold`` (see the module docstring)."""
    shares = share_series(wins, pod)
    last_above = None
    for i, s in enumerate(shares):
        if not math.isnan(s) and s >= threshold:
            last_above = i
    if last_above is None:
        return 0.0
    if last_above == len(shares) - 1:
        return None
    return wins[last_above].start + wins[last_above].width


def first_under(
    wins: Sequence[Window], pod: str, threshold: float = SHIFT_THRESHOLD
) -> tuple[float | None, int]:
    """When ``pod``'s share first dropped below ``threshold``, and how often it came back.

    Returns the start of the first window under the threshold (None if none was) and the
    number of later windows at or above it ("relapses": probes bursts, re-admissions).
    """
    shares = share_series(wins, pod)
    for i, s in enumerate(shares):
        if not math.isnan(s) and s < threshold:
            relapses = sum(1 for x in shares[i + 1:] if not math.isnan(x) and x >= threshold)
            return wins[i].start, relapses
    return None, 0


def flapping_index(wins: Sequence[Window], pods: Sequence[str]) -> float:
    """Largest window-to-window change of any pod's share, in percentage points.

    NaN when there are fewer than two windows to compare.
    """
    if len(wins) < 2:
        return math.nan
    worst = 0.0
    for pod in pods:
        shares = [s for s in share_series(wins, pod) if not math.isnan(s)]
        for a, b in itertools.pairwise(shares):
            worst = max(worst, abs(b - a) * 100.0)
    return worst


def share_noise_pp(wins: Sequence[Window], pods: Sequence[str]) -> float:
    """1-sigma sampling noise (pp) of a window-to-window share change for the busiest pod.

    A pod routed with fixed probability p over n requests per window shows a share with
    variance p(1-p)/n, so the difference of two windows has sigma sqrt(2 p(1-p)/n) even when
    the policy does not move at all.
    """
    if not wins:
        return math.nan
    n = sum(w.answered for w in wins) / len(wins)
    if n <= 0:
        return math.nan
    total = sum(w.answered for w in wins)
    p = max((sum(w.counts.get(pod, 0) for w in wins) / total for pod in pods), default=0.0)
    return math.sqrt(2.0 * p * (1.0 - p) / n) * 100.0


def share_between(records: Iterable[Record], pod: str, t_from: float, t_to: float) -> float:
    """``pod``'s share of answered requests intended in [t_from, t_to) (absolute times)."""
    total = hits = 0
    for r in records:
        if t_from <= r.intended < t_to and r.ok and r.pod is not None:
            total += 1
            hits += int(r.pod == pod)
    return hits / total if total else math.nan


def pod_totals(records: Iterable[Record]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        if r.ok and r.pod is not None:
            out[r.pod] = out.get(r.pod, 0) + 1
    return out


@dataclass(slots=True)
class RunMetrics:
    """The per-run numbers of the slow-pod reports (latencies in seconds, shares 0..1)."""

    requests: int
    errors: int
    latency: dict[str, float]
    steady_latency: dict[str, float]
    bad_share: float
    bad_share_first: float
    bad_share_steady: float
    time_to_shift: float | None
    first_under: float | None
    relapses: int
    flapping_pp: float
    flapping_noise_pp: float
    pod_totals: dict[str, int]
    flap_window: float

    def as_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "latency": self.latency,
            "steady_latency": self.steady_latency,
            "bad_share": self.bad_share,
            "bad_share_first": self.bad_share_first,
            "bad_share_steady": self.bad_share_steady,
            "time_to_shift": self.time_to_shift,
            "first_under": self.first_under,
            "relapses": self.relapses,
            "flapping_pp": self.flapping_pp,
            "flapping_noise_pp": self.flapping_noise_pp,
            "pod_totals": self.pod_totals,
            "flap_window": self.flap_window,
        }


def run_metrics(
    records: Sequence[Record],
    t0: float,
    duration: float,
    pods: Sequence[str],
    bad_pod: str,
    shift_window: float = 1.0,
    flap_window: float | None = None,
    first_window: float = 5.0,
) -> RunMetrics:
    """All numbers of one run; ``t0`` is the schedule's origin, ``duration`` its length."""
    if flap_window is None:
        flap_window = default_flap_window(duration)
    half = t0 + duration / 2.0
    steady = [r for r in records if r.intended >= half]
    shift_wins = windows(records, t0, shift_window, duration)
    flap_wins = windows(steady, half, flap_window, duration / 2.0)
    under, relapses = first_under(shift_wins, bad_pod)
    return RunMetrics(
        first_under=under,
        relapses=relapses,
        flap_window=flap_window,
        requests=len(records),
        errors=sum(1 for r in records if not r.ok),
        latency=latency_summary(r.latency for r in records),
        steady_latency=latency_summary(r.latency for r in steady),
        bad_share=share_between(records, bad_pod, t0, t0 + duration),
        bad_share_first=share_between(records, bad_pod, t0, t0 + first_window),
        bad_share_steady=share_between(records, bad_pod, half, t0 + duration),
        time_to_shift=time_to_shift(shift_wins, bad_pod),
        flapping_pp=flapping_index(flap_wins, pods),
        flapping_noise_pp=share_noise_pp(flap_wins, pods),
        pod_totals=pod_totals(records),
    )
