"""The bench's numbers, over the simulator's column arrays instead of one object per request.

Owns :func:`run_metrics`, the same definitions as :func:`equilibrium.lab.analysis.run_metrics`
(latency percentiles nearest-rank from the intended start, the tracked pod's share over the
run, its first 5 s and the steady state (second half), time to shift under 5 % in 1 s windows,
first under and relapses, flapping index and its sampling noise over the steady state), computed
with numpy so that millions of requests cost seconds; a unit test holds the two equal on the
same records. Also :func:`pod_shares` (each pod's share of answered requests in the steady
state), :func:`window_series` (per 1 s window: the tracked pod's share and the p99, for the
plots and the recovery numbers) and :func:`recovery_metrics`. Pure: no I/O.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from equilibrium.lab.analysis import SHIFT_THRESHOLD, default_flap_window
from equilibrium.lab.simulate.engine import Records


def _arrays(rec: Records) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return (np.frombuffer(rec.intended, dtype=np.float64),
            np.frombuffer(rec.latency, dtype=np.float64),
            np.frombuffer(rec.pod, dtype=np.int32),
            np.frombuffer(rec.ok, dtype=np.int8).astype(bool))


def percentile(ordered: np.ndarray, q: float) -> float:
    """Nearest rank, as :func:`equilibrium.lab.loadgen.percentile_sorted`."""
    n = ordered.shape[0]
    if n == 0:
        return math.nan
    rank = math.ceil(q / 100.0 * n - 1e-9)
    return float(ordered[max(rank, 1) - 1])


def latency_summary(latencies: np.ndarray) -> dict[str, float]:
    ordered = np.sort(latencies)
    n = ordered.shape[0]
    return {
        "count": float(n),
        "mean": math.fsum(ordered.tolist()) / n if n else math.nan,
        "p50": percentile(ordered, 50), "p99": percentile(ordered, 99),
        "p99.9": percentile(ordered, 99.9),
        "max": float(ordered[-1]) if n else math.nan,
    }


def _window_counts(t: np.ndarray, pod: np.ndarray, ok: np.ndarray, start: float, width: float,
                   n: int, pods: int) -> np.ndarray:
    """(windows x pods) answered requests per window, by intended start."""
    index = np.floor((t - start) / width).astype(np.int64)
    keep = (index >= 0) & (index < n) & ok & (pod >= 0)
    flat = index[keep] * pods + pod[keep]
    return np.bincount(flat, minlength=n * pods).reshape(n, pods).astype(np.float64)


def _shares(counts: np.ndarray) -> np.ndarray:
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, counts / np.where(totals > 0, totals, 1), np.nan)


def _n_windows(duration: float, width: float) -> int:
    return max(1, math.ceil(duration / width - 1e-9))


def _share_between(t: np.ndarray, pod: np.ndarray, ok: np.ndarray, tracked: int,
                   t_from: float, t_to: float) -> float:
    sel = (t >= t_from) & (t < t_to) & ok & (pod >= 0)
    total = int(sel.sum())
    return int((pod[sel] == tracked).sum()) / total if total else math.nan


def run_metrics(rec: Records, t0: float, duration: float, pods: int, tracked: int | None,
                shift_window: float = 1.0, first_window: float = 5.0) -> dict[str, Any]:
    """The numbers of :class:`equilibrium.lab.analysis.RunMetrics` for requests intended in
    ``[t0, t0 + duration)`` and after (the drained tail counts, as in the bench)."""
    t_all, lat_all, pod_all, ok_all = _arrays(rec)
    sel = t_all >= t0
    t, lat, pod, ok = t_all[sel], lat_all[sel], pod_all[sel], ok_all[sel]
    half = t0 + duration / 2.0
    steady = t >= half
    flap_window = default_flap_window(duration)
    flap_counts = _window_counts(t[steady], pod[steady], ok[steady], half, flap_window,
                                 _n_windows(duration / 2.0, flap_window), pods)
    flap = _shares(flap_counts)
    out: dict[str, Any] = {
        "requests": int(t.shape[0]),
        "errors": int((~ok).sum()),
        "latency": latency_summary(lat),
        "steady_latency": latency_summary(lat[steady]),
        "flapping_pp": _flapping(flap),
        "flapping_noise_pp": _noise(flap_counts),
        "flap_window": flap_window,
        "pod_totals": {f"pod-{j}": int(c) for j, c in
                       enumerate(np.bincount(pod[ok & (pod >= 0)], minlength=pods)) if c},
    }
    if tracked is not None:
        n = _n_windows(duration, shift_window)
        shares = _shares(_window_counts(t, pod, ok, t0, shift_window, n, pods))[:, tracked]
        under, relapses = _first_under(shares, shift_window)
        out.update(
            bad_share=_share_between(t, pod, ok, tracked, t0, t0 + duration),
            bad_share_first=_share_between(t, pod, ok, tracked, t0, t0 + first_window),
            bad_share_steady=_share_between(t, pod, ok, tracked, half, t0 + duration),
            time_to_shift=_time_to_shift(shares, shift_window),
            first_under=under, relapses=relapses,
        )
    return out


def _flapping(shares: np.ndarray) -> float:
    """Largest change of any pod's share between consecutive windows (pp), windows without
    an answer skipped per pod, as :func:`equilibrium.lab.analysis.flapping_index`."""
    if shares.shape[0] < 2:
        return math.nan
    worst = 0.0
    for column in shares.T:
        values = column[~np.isnan(column)]
        if values.shape[0] >= 2:
            worst = max(worst, float(np.abs(np.diff(values)).max()) * 100.0)
    return worst


def _noise(counts: np.ndarray) -> float:
    if counts.shape[0] == 0:
        return math.nan
    answered = counts.sum(axis=1)
    total = float(answered.sum())
    n = total / counts.shape[0]
    if n <= 0:
        return math.nan
    p = float((counts.sum(axis=0) / total).max()) if total else 0.0
    return math.sqrt(2.0 * p * (1.0 - p) / n) * 100.0


def _time_to_shift(shares: np.ndarray, width: float) -> float | None:
    above = np.flatnonzero(~np.isnan(shares) & (shares >= SHIFT_THRESHOLD))
    if above.shape[0] == 0:
        return 0.0
    last = int(above[-1])
    if last == shares.shape[0] - 1:
        return None
    return last * width + width


def _first_under(shares: np.ndarray, width: float) -> tuple[float | None, int]:
    under = np.flatnonzero(~np.isnan(shares) & (shares < SHIFT_THRESHOLD))
    if under.shape[0] == 0:
        return None, 0
    i = int(under[0])
    later = shares[i + 1:]
    return i * width, int((~np.isnan(later) & (later >= SHIFT_THRESHOLD)).sum())


def pod_shares(rec: Records, t_from: float, t_to: float, pods: int) -> list[float]:
    """Each pod's share of the answered requests intended in ``[t_from, t_to)``."""
    t, _, pod, ok = _arrays(rec)
    sel = (t >= t_from) & (t < t_to) & ok & (pod >= 0)
    counts = np.bincount(pod[sel], minlength=pods).astype(np.float64)
    total = counts.sum()
    return (counts / total).tolist() if total else [math.nan] * pods


def window_series(rec: Records, t0: float, duration: float, pods: int, tracked: int | None,
                  width: float = 1.0) -> dict[str, list[float]]:
    """Per window of ``width`` s from ``t0``: its end, the tracked pod's share, the p99."""
    t, lat, pod, ok = _arrays(rec)
    n = _n_windows(duration, width)
    index = np.floor((t - t0) / width).astype(np.int64)
    p99 = []
    order = np.argsort(index, kind="stable")
    bounds = np.searchsorted(index[order], np.arange(n + 1))
    for w in range(n):
        chunk = np.sort(lat[order[bounds[w]:bounds[w + 1]]])
        p99.append(percentile(chunk, 99))
    out = {"t": [(w + 1) * width for w in range(n)], "p99": p99}
    if tracked is not None:
        shares = _shares(_window_counts(t, pod, ok, t0, width, n, pods))
        out["tracked_share"] = shares[:, tracked].tolist()
    return out


def recovery_metrics(series: dict[str, list[float]], healed_at: float, pods: int,
                     width: float = 1.0) -> dict[str, Any]:
    """After the tracked pod heals at ``healed_at`` (seconds from t0): when the mean of its
    share over 5 consecutive 1 s windows first reaches 80 % of a fair share (1/pods), counted
    from the heal to the end of those windows; the most it got in any window (the herd's
    overshoot); and the worst window p99 after healing."""
    shares = np.array(series["tracked_share"], dtype=float)
    p99 = np.array(series["p99"], dtype=float)
    first = math.ceil(healed_at / width - 1e-9)
    fair = 1.0 / pods
    readmitted: float | None = None
    for i in range(first, shares.shape[0] - 4):
        window = shares[i:i + 5]
        if not np.isnan(window).any() and window.mean() >= 0.8 * fair:
            readmitted = (i + 5) * width - healed_at
            break
    after = shares[first:]
    after = after[~np.isnan(after)]
    p99_after = p99[first:]
    p99_after = p99_after[~np.isnan(p99_after)]
    return {
        "fair_share": fair,
        "time_to_readmit": readmitted,
        "peak_share_after_heal": float(after.max()) if after.size else math.nan,
        "worst_window_p99_after_heal": float(p99_after.max()) if p99_after.size else math.nan,
    }
