"""Estimators: how the cost of an endpoint is measured (never how one is chosen).

Each estimator takes observations with the time they were made and answers questions with the
time they are asked; none reads a clock. Failures (connect errors, timeouts, 5xx) are charged a
penalty latency, so that a fast-failing endpoint never looks attractive.

- :class:`Ewma` — time-weighted exponential moving average of latency.
- :class:`PeakEwma` — Linkerd/Finagle's peak-sensitive EWMA: a slower sample replaces the
  estimate at once, faster samples pull it down with time constant ``decay`` (default 10 s), and
  an idle estimate decays towards zero so that an endpoint once seen slow is eventually tried
  again. Cost = estimate x (pending + 1).
- :class:`EndpointStats` — everything one endpoint's policy needs: the two averages above, the
  in-flight count, failure counters, piggybacked congestion, and the per-tick accumulators that
  regret matching consumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_RTT = 0.030  # Linkerd's default RTT estimate for an endpoint never measured (seconds)
DEFAULT_DECAY = 10.0  # Linkerd's peak-EWMA decay time constant (seconds)
MAX_LATENCY = 3600.0  # any observation above this is clamped: nothing real takes an hour


def _decay_weight(dt: float, tau: float) -> float:
    """exp(-dt/tau), robust to dt <= 0 (no decay) and tau <= 0 (no memory)."""
    if dt <= 0.0:
        return 1.0
    if tau <= 0.0:
        return 0.0
    return math.exp(-dt / tau)


@dataclass(slots=True)
class Ewma:
    """Time-weighted EWMA: each sample pulls the average by ``1 - exp(-dt/tau)``, clamped to
    ``[min_step, max_step]``.

    The first sample sets the value. ``tau`` is the time constant in seconds. The clamp keeps
    both extremes honest: a burst of same-instant samples still moves the average (at least
    ``min_step`` each), and a lone sample after a long silence cannot replace it (at most
    ``max_step``) — an endpoint probed once every few seconds, whose latencies are bimodal (a
    bad pod slow on half its requests), would otherwise look healthy after one lucky answer.
    """

    tau: float
    value: float | None = None
    updated_at: float = 0.0
    min_step: float = 1.0 / 16.0
    max_step: float = 1.0 / 3.0

    def update(self, sample: float, now: float) -> float:
        if self.value is None:
            self.value = sample
        else:
            step = 1.0 - _decay_weight(now - self.updated_at, self.tau)
            step = min(max(step, self.min_step), self.max_step)
            self.value = self.value * (1.0 - step) + sample * step
        self.updated_at = max(self.updated_at, now)
        return self.value


@dataclass(slots=True)
class PeakEwma:
    """Peak-sensitive EWMA of round-trip time, as in Linkerd2-proxy / tower ``PeakEwma``.

    ``update``: a sample above the estimate replaces it (the "peak"); a sample below is
    averaged in with weight ``1 - exp(-dt/decay)``. ``value(now)`` decays the estimate towards
    zero while no sample arrives, as tower does when it computes load.
    """

    decay: float = DEFAULT_DECAY
    estimate: float = DEFAULT_RTT
    updated_at: float | None = None

    def update(self, rtt: float, now: float) -> None:
        if rtt > self.estimate:
            self.estimate = rtt
        else:
            w = _decay_weight(0.0 if self.updated_at is None else now - self.updated_at,
                              self.decay)
            self.estimate = self.estimate * w + rtt * (1.0 - w)
        self.updated_at = now

    def value(self, now: float) -> float:
        if self.updated_at is None:
            return self.estimate
        return self.estimate * _decay_weight(now - self.updated_at, self.decay)

    def cost(self, now: float, pending: int) -> float:
        """Linkerd's load: RTT estimate x (pending requests + 1)."""
        return self.value(now) * (pending + 1)


@dataclass(slots=True)
class EndpointStats:
    """Measurements of one endpoint, fed by outcomes and read by policies."""

    endpoint: str
    latency: Ewma
    peak: PeakEwma
    failure_penalty: float
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    congestion: float = 0.0
    ejected_until: float = -math.inf
    ejections: int = 0
    # Accumulators for the current tick (consumed by regret matching, then reset).
    tick_count: int = 0
    tick_cost_sum: float = 0.0

    @classmethod
    def new(cls, endpoint: str, *, tau: float, decay: float, failure_penalty: float,
            default_rtt: float = DEFAULT_RTT) -> EndpointStats:
        return cls(endpoint, Ewma(tau), PeakEwma(decay, default_rtt), failure_penalty)

    def charged_latency(self, latency: float, ok: bool) -> float:
        """The cost an outcome is charged: its latency, or at least the penalty on failure."""
        if not math.isfinite(latency) or latency < 0.0:
            latency = self.failure_penalty
        latency = min(latency, MAX_LATENCY)
        return latency if ok else max(latency, self.failure_penalty)

    def start(self) -> None:
        self.in_flight += 1

    def finish(self, latency: float, ok: bool, now: float,
               congestion: float | None = None) -> float:
        """Record one finished request; returns the cost charged."""
        self.in_flight = max(0, self.in_flight - 1)
        cost = self.charged_latency(latency, ok)
        self.requests += 1
        if ok:
            self.consecutive_failures = 0
        else:
            self.failures += 1
            self.consecutive_failures += 1
        self.latency.update(cost, now)
        self.peak.update(cost, now)
        if congestion is not None and math.isfinite(congestion):
            self.congestion = 0.5 * self.congestion + 0.5 * min(1.0, max(0.0, congestion))
        self.tick_count += 1
        self.tick_cost_sum += cost
        return cost

    def latency_estimate(self, fallback: float) -> float:
        """Expected latency of the next request here (mean EWMA; ``fallback`` if never seen),
        inflated by the upstream's piggybacked congestion level (C3-style feedback)."""
        base = fallback if self.latency.value is None else self.latency.value
        return base * (1.0 + self.congestion)

    def take_tick(self) -> tuple[int, float]:
        """Return (requests, mean cost) observed since the last tick, and reset."""
        n, total = self.tick_count, self.tick_cost_sum
        self.tick_count, self.tick_cost_sum = 0, 0.0
        return n, (total / n if n else 0.0)
