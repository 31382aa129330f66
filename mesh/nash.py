"""Equilibrium checks: is the routing stable, or flapping?

- :func:`wardrop_gap` — the Nash/Wardrop gap of a traffic split: how much expected latency a
  unit of traffic would save by moving from where it is to the best endpoint,
  ``sum_i w_i c_i - min_i c_i``. At a Wardrop equilibrium every used endpoint has the same,
  minimal latency and the gap is 0 (Wardrop 1952; no-regret routing converges to near-Wardrop
  flows, Blum, Even-Dar & Ligett 2006).
- :class:`StabilityMonitor` — the flapping index, the window-to-window change of the shares
  (max over endpoints of |mean share in this window - mean share in the last|), and a converged
  flag: flapping and relative gap both under their thresholds for ``settle_windows`` windows in
  a row.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import numpy as np


def wardrop_gap(weights: np.ndarray, costs: np.ndarray) -> float:
    """sum_i w_i c_i - min over endpoints with positive weight or finite cost of c_i (>= 0)."""
    w = np.asarray(weights, dtype=float)
    c = np.asarray(costs, dtype=float)
    ok = np.isfinite(c)
    if not ok.any() or w.sum() <= 0:
        return 0.0
    expected = float(np.sum(np.where(ok, w, 0.0) * np.where(ok, c, 0.0)) / max(w[ok].sum(), 1e-12))
    return max(0.0, expected - float(c[ok].min()))


@dataclass(slots=True)
class StabilityMonitor:
    window: float = 5.0
    flap_threshold: float = 0.05
    gap_threshold: float = 0.5  # relative to the best latency (exploration costs a little)
    settle_windows: int = 2
    flapping: float = 0.0
    converged: bool = False
    _window_start: float | None = None
    _sum: np.ndarray | None = None
    _samples: int = 0
    _last_mean: np.ndarray | None = None
    _calm: int = 0
    _gaps: list[float] = field(default_factory=list)

    def reset(self) -> None:
        self._window_start, self._sum, self._samples, self._last_mean = None, None, 0, None
        self._calm, self.flapping, self.converged, self._gaps = 0, 0.0, False, []

    def record(self, weights: np.ndarray, relative_gap: float, now: float) -> None:
        w = np.asarray(weights, dtype=float)
        if self._sum is None or self._sum.shape != w.shape:
            self.reset()
            self._sum = np.zeros_like(w)
            self._window_start = now
        self._sum += w
        self._samples += 1
        if math.isfinite(relative_gap):
            self._gaps.append(relative_gap)
        assert self._window_start is not None
        if now - self._window_start < self.window:
            return
        mean = self._sum / max(1, self._samples)
        # not np.median: its first call imports numpy.ma (15 ms, in a sidecar's first tick)
        gap = statistics.median(self._gaps) if self._gaps else 0.0
        if self._last_mean is not None:
            self.flapping = float(np.max(np.abs(mean - self._last_mean)))
            calm = self.flapping < self.flap_threshold and gap < self.gap_threshold
            self._calm = self._calm + 1 if calm else 0
            self.converged = self._calm >= self.settle_windows
        self._last_mean = mean
        self._sum = np.zeros_like(w)
        self._samples = 0
        self._gaps = []
        self._window_start = now
