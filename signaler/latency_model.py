"""Per-endpoint latency model ``d + 1/(mu - load)`` and its robust fit from observations.

Owns: the M/M/1-style latency curve the signaler's programs price configurations with, its
marginal cost (for the Beckmann system-optimum program), and fitting it from (load, mean latency)
observations. Pure numerics: no Redis, no asyncio, no clock, no global RNG.

The curve. An M/M/1 queue with service rate ``mu`` and arrival rate ``load`` has mean sojourn time
``1/(mu - load)``; ``d`` adds a fixed propagation/processing delay. The curve explodes at
``load = mu``, which would make every program that prices an overloaded endpoint infinite. So past
the *knee* ``kappa = knee * mu`` (default ``knee = 0.95``) the curve is continued by its tangent
line at the knee::

    latency(x) = d + 1/(mu - x)                                  for x <= kappa
    latency(x) = d + 1/(mu - kappa) + (x - kappa)/(mu - kappa)^2 for x >  kappa

The continuation keeps value and slope at the knee, so the curve stays finite, convex and strictly
increasing everywhere, and ``x * latency(x)`` stays convex (its derivative is continuous and
increasing) -- the properties the LP's incentive rows and the convex program rely on. Loads below
zero are not loads and are rejected.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_KNEE = 0.95
#: With too few samples and no prior, the observed latency is split evenly between the fixed delay
#: ``d`` and the queueing delay ``1/(mu - load)`` (one equation, two unknowns: a convention).
DEFAULT_QUEUEING_SHARE = 0.5
_HUBER_C = 1.345


@dataclass(frozen=True)
class LatencyModel:
    """Latency of one endpoint as a function of its offered load: ``d + 1/(mu - load)``.

    ``d`` (>= 0) is the fixed delay, ``mu`` (> 0) the service capacity in the same load units
    (e.g. requests/s with latencies in seconds). Past ``knee * mu`` the curve is its tangent line.
    """

    d: float
    mu: float
    knee: float = DEFAULT_KNEE

    def __post_init__(self) -> None:
        if not (math.isfinite(self.d) and self.d >= 0):
            raise ValueError(f"LatencyModel.d must be finite and >= 0, got {self.d!r}")
        if not (math.isfinite(self.mu) and self.mu > 0):
            raise ValueError(f"LatencyModel.mu must be finite and > 0, got {self.mu!r}")
        if not (0 < self.knee < 1):
            raise ValueError(f"LatencyModel.knee must be in (0, 1), got {self.knee!r}")

    @property
    def knee_load(self) -> float:
        """The load past which the curve is continued by its tangent line."""
        return self.knee * self.mu

    def latency(self, load: float | np.ndarray) -> float | np.ndarray:
        """Mean latency at ``load`` (scalar or array, every element >= 0)."""
        x = np.asarray(load, dtype=float)
        _check_loads(x)
        kappa = self.knee_load
        gap = self.mu - np.minimum(x, kappa)
        value = self.d + 1.0 / gap + np.maximum(x - kappa, 0.0) / (self.mu - kappa) ** 2
        return float(value) if value.ndim == 0 else value

    def slope(self, load: float | np.ndarray) -> float | np.ndarray:
        """d latency / d load (constant past the knee)."""
        x = np.asarray(load, dtype=float)
        _check_loads(x)
        value = 1.0 / (self.mu - np.minimum(x, self.knee_load)) ** 2
        return float(value) if value.ndim == 0 else value

    def total_cost(self, load: float | np.ndarray) -> float | np.ndarray:
        """``load * latency(load)``: the latency summed over the traffic (Beckmann's cost)."""
        x = np.asarray(load, dtype=float)
        value = x * np.asarray(self.latency(x))
        return float(value) if value.ndim == 0 else value

    def marginal_cost(self, load: float | np.ndarray) -> float | np.ndarray:
        """d/dload of ``load * latency(load)`` = latency + load * slope.

        Beckmann, McGuire & Winsten (1956): routing every unit of traffic on its least
        *marginal*-cost path gives the system optimum.
        """
        x = np.asarray(load, dtype=float)
        value = np.asarray(self.latency(x)) + x * np.asarray(self.slope(x))
        return float(value) if value.ndim == 0 else value


def _check_loads(x: np.ndarray) -> None:
    if not np.all(np.isfinite(x)) or np.any(x < 0):
        raise ValueError(f"loads must be finite and >= 0, got {x!r}")


def _as_observations(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=float).reshape(-1)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    if np.any(array < 0):
        raise ValueError(f"{name} must be >= 0")
    return array


def _queueing(loads: np.ndarray, mu: float, knee: float) -> np.ndarray:
    """The queueing part ``1/(mu - load)`` of the curve (tangent-continued), i.e. latency - d."""
    queueing: np.ndarray = _queueing_rows(loads, np.array([mu]), knee)[0]
    return queueing


def _queueing_rows(loads: np.ndarray, mus: np.ndarray, knee: float) -> np.ndarray:
    """The queueing part of the curve (:func:`_queueing`) for many candidate capacities at
    once: one row per ``mus[i]``, one column per load."""
    mu = mus[:, None]
    kappa = knee * mu
    rows: np.ndarray = (1.0 / (mu - np.minimum(loads[None, :], kappa))
                        + np.maximum(loads[None, :] - kappa, 0.0) / (mu - kappa) ** 2)
    return rows


def _weighted_medians(rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The weighted median of each row of ``rows`` (the same weights for every row): the
    smallest value whose cumulative weight, values in increasing order, reaches half the
    total."""
    order = np.argsort(rows, axis=1)
    cumulative = np.cumsum(weights[order], axis=1)
    # the first index whose cumulative weight reaches half the total (searchsorted, left side)
    index = np.minimum((cumulative < 0.5 * cumulative[:, -1:]).sum(axis=1), rows.shape[1] - 1)
    picked = order[np.arange(rows.shape[0]), index]
    medians: np.ndarray = rows[np.arange(rows.shape[0]), picked]
    return medians


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The weighted median of one array (the rule of :func:`_weighted_medians`, without the
    row bookkeeping: the golden-section refinement calls it ~60 times a fit)."""
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    index = int(np.searchsorted(cumulative, 0.5 * cumulative[-1]))
    return float(values[order][min(index, len(values) - 1)])


def _huber(residuals: np.ndarray, scale: float) -> np.ndarray:
    z = np.abs(residuals) / scale
    loss: np.ndarray = np.where(z <= _HUBER_C, 0.5 * z * z, _HUBER_C * (z - 0.5 * _HUBER_C))
    return loss


def fit_latency_model(
    loads: Sequence[float] | np.ndarray,
    latencies: Sequence[float] | np.ndarray,
    *,
    weights: Sequence[float] | np.ndarray | None = None,
    prior: LatencyModel | None = None,
    min_samples: int = 3,
    min_relative_spread: float = 0.05,
    knee: float = DEFAULT_KNEE,
) -> LatencyModel:
    """Fit ``d + 1/(mu - load)`` to (load, mean latency) observations, robustly.

    The fit profiles out ``d``: for each candidate ``mu`` on a log grid, ``d`` is the weighted
    median of ``latency - 1/(mu - load)`` (clipped at 0), and ``mu`` minimises the Huber loss of the
    residuals (scale from the median absolute deviation of a first least-squares pass, so outliers
    barely pull the fit). The best grid point is refined by golden-section search.

    Few samples: with fewer than ``min_samples`` observations, or loads too close together to
    separate ``d`` from ``mu`` (spread below ``min_relative_spread`` of the largest load), the curve
    is not identifiable. Then the fit keeps ``prior.d`` and solves ``mu`` from the observations
    (median of ``load + 1/(latency - d)``), or returns ``prior`` unchanged when there is nothing to
    learn from; with no prior, ``d`` is ``DEFAULT_QUEUEING_SHARE`` of the smallest latency and
    ``mu`` comes from that point. With no observations and no prior it raises ``ValueError``.

    ``weights`` (e.g. request counts per observation) default to 1. NaN, inf, negative values or
    mismatched lengths raise ``ValueError``.
    """
    x = _as_observations("loads", loads)
    y = _as_observations("latencies", latencies)
    if x.shape != y.shape:
        raise ValueError(f"loads and latencies differ in length ({x.size} vs {y.size})")
    w = np.ones_like(x) if weights is None else _as_observations("weights", weights)
    if w.shape != x.shape:
        raise ValueError(f"weights and loads differ in length ({w.size} vs {x.size})")
    keep = w > 0
    x, y, w = x[keep], y[keep], w[keep]
    if min_samples < 1:
        raise ValueError("min_samples must be >= 1")

    load_max = float(x.max()) if x.size else 0.0
    spread = float(x.max() - x.min()) if x.size else 0.0
    if x.size < min_samples or spread <= min_relative_spread * load_max or load_max == 0.0:
        return _fit_few(x, y, w, prior, knee)
    return _fit_profiled(x, y, w, knee)


def _fit_few(
    x: np.ndarray, y: np.ndarray, w: np.ndarray, prior: LatencyModel | None, knee: float
) -> LatencyModel:
    if x.size == 0:
        if prior is None:
            raise ValueError("cannot fit a latency model from no observations without a prior")
        return prior
    if prior is not None:
        queueing = y - prior.d
        usable = queueing > 0
        if not np.any(usable):
            # No queueing visible above the prior's fixed delay: the endpoint is at least as fast
            # as believed. Lower d to what was seen, keep the capacity estimate.
            return LatencyModel(d=min(prior.d, float(y.min())), mu=prior.mu, knee=knee)
        mus = x[usable] + 1.0 / queueing[usable]
        return LatencyModel(d=prior.d, mu=_weighted_median(mus, w[usable]), knee=knee)
    smallest = int(np.argmin(y))
    latency = float(y[smallest])
    if latency <= 0:
        raise ValueError("cannot fit a latency model from zero latencies without a prior")
    d = (1.0 - DEFAULT_QUEUEING_SHARE) * latency
    return LatencyModel(d=d, mu=float(x[smallest]) + 1.0 / (latency - d), knee=knee)


def _fit_profiled(x: np.ndarray, y: np.ndarray, w: np.ndarray, knee: float) -> LatencyModel:
    load_max = float(x.max())
    positive = y[y > 0]
    reference = float(np.median(positive)) if positive.size else 1.0
    # Candidates: mu = load_max + 1/q for a queueing delay q at the busiest point between
    # 1e-5 and 1e2 typical latencies, plus overloaded candidates mu in (0.5, 1] * load_max.
    q = np.geomspace(reference * 1e-5, reference * 1e2, 240)
    grid = np.concatenate([load_max * np.linspace(0.5, 1.0, 40, endpoint=False), load_max + 1 / q])
    grid = np.unique(grid)

    def profile(mu: float, scale: float | None) -> tuple[float, float]:
        base = _queueing(x, mu, knee)
        d = max(_weighted_median(y - base, w), 0.0)
        residuals = y - d - base
        if scale is None:
            return float(np.sum(w * residuals * residuals)), d
        return float(np.sum(w * _huber(residuals, scale))), d

    # Both passes over the whole grid at once, one row per candidate mu, each row the sums
    # ``profile`` makes for it (a call per candidate made the whole fit ~5x slower, and the
    # signaler refits every endpoint that reported, every epoch). Pass 1: least squares, for
    # a residual scale. Pass 2: Huber with that scale.
    rows = y[None, :] - _queueing_rows(x, grid, knee)
    rows -= np.maximum(_weighted_medians(rows, w), 0.0)[:, None]  # residuals for each row's d
    losses = np.sum(w * rows * rows, axis=1)
    mu0 = float(grid[int(np.argmin(losses))])
    d0 = profile(mu0, None)[1]
    residuals = y - d0 - _queueing(x, mu0, knee)
    mad = _weighted_median(np.abs(residuals - _weighted_median(residuals, w)), w)
    scale = max(1.4826 * mad, 1e-9 * reference, 1e-300)
    losses = np.sum(w * _huber(rows, scale), axis=1)
    best = int(np.argmin(losses))
    lo = float(grid[max(best - 1, 0)])
    hi = float(grid[min(best + 1, grid.size - 1)])
    mu = _golden_section(lambda m: profile(m, scale)[0], lo, hi) if hi > lo else float(grid[best])
    if profile(mu, scale)[0] > losses[best]:
        mu = float(grid[best])
    d = profile(mu, scale)[1]
    return LatencyModel(d=d, mu=mu, knee=knee)


def _golden_section(
    f: Callable[[float], float], lo: float, hi: float, iterations: int = 60,
    tolerance: float = 1e-10,
) -> float:
    """The minimum of a unimodal ``f`` on [lo, hi] (Kiefer 1953): the bracket shrinks by the
    golden ratio per evaluation, until ``iterations`` or until it is narrower than
    ``tolerance`` times its ends (a bracket of two steps of the fit's grid, about 14 % wide,
    is that narrow after some 43 evaluations rather than 62: the signaler refits every
    reporting endpoint every epoch, and this search was most of a refit)."""
    ratio = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, e = b - ratio * (b - a), a + ratio * (b - a)
    fc, fe = f(c), f(e)
    for _ in range(iterations):
        if b - a <= tolerance * max(abs(a), abs(b)):
            break
        if fc <= fe:
            b, e, fe = e, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, e, fe
            e = a + ratio * (b - a)
            fe = f(e)
    return (a + b) / 2
