"""One upstream's epoch report for the signaling plane, built from observations.

Owns :class:`SummaryBuilder`: from a policy's routing snapshot (weights, Hart & Mas-Colell's
conditional regret matrix, in-flight counts, latency estimates) and the epoch windows of its
endpoints (:class:`mesh.estimators.EpochWindow`: requests, failures, latency buckets of what
was answered), the :class:`EpochReport` a sidecar sends as its regret summary. Pure: the clock
readings come in as arguments; encoding, signing and sending are the sidecar's
(``sidecar.signaling``), and the wire validation is the protocol's.

Per endpoint, in one epoch: no request, no latency (None); requests of which some were
answered: the mean of the answered latencies and the upper bounds of the buckets holding their
median and 99th percentile (the mean where the bucket is the open one above 5 s); only failures
with no answer: the policy's charged estimate for all three. Every time is clipped into
``[0, max_seconds]``, the regrets into ``[-max_seconds, max_seconds]``, and the weights are
renormalised to sum to one (uniform when they cannot be).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from mesh.estimators import MAX_LATENCY, EpochWindow
from mesh.policy import PolicySnapshot

MAX_DEMAND = 1e9
"""Requests per second above which the reported demand is clipped."""


@dataclass(frozen=True, slots=True)
class EpochReport:
    """What one sidecar saw of one upstream in one epoch (the body of a regret summary).

    Tuples are per endpoint, in ``endpoints`` order; ``epoch`` is ``floor(wall / epoch)``,
    ``sent_at`` the unix time, ``demand`` requests per second over the epoch.
    """

    epoch: int
    sent_at: float
    endpoints: tuple[str, ...]
    requests: tuple[int, ...]
    failures: tuple[int, ...]
    latency_mean: tuple[float | None, ...]
    latency_p50: tuple[float | None, ...]
    latency_p99: tuple[float | None, ...]
    in_flight: tuple[int, ...]
    demand: float
    weights: tuple[float, ...]
    regret: tuple[tuple[float, ...], ...]


class SummaryBuilder:
    """Turns one upstream's snapshots and epoch windows into one :class:`EpochReport` a call."""

    def __init__(self, max_seconds: float = MAX_LATENCY) -> None:
        self.max_seconds = max_seconds
        self._last: float | None = None

    def _clip(self, value: float) -> float:
        return min(max(value, 0.0), self.max_seconds) if math.isfinite(value) else self.max_seconds

    def build(
        self,
        snapshot: PolicySnapshot | None,
        windows: Mapping[str, EpochWindow],
        now: float,
        wall: float,
        epoch_seconds: float,
    ) -> EpochReport | None:
        """The report of the epoch ``windows`` cover; None when there is nothing to report (no
        snapshot or no endpoints). ``now`` is the monotonic clock, ``wall`` unix time; the
        first report counts its demand over one epoch, later ones over the time since the
        previous call."""
        if snapshot is None or not snapshot.endpoints:
            return None
        views = list(snapshot.endpoints)
        endpoints = tuple(v.endpoint for v in views)
        elapsed = epoch_seconds if self._last is None else max(now - self._last, 1e-3)
        self._last = now
        requests, failures, means, p50s, p99s = [], [], [], [], []
        empty = EpochWindow()
        for view in views:
            window = windows.get(view.endpoint, empty)
            n = window.requests
            mean = window.mean()
            p50: float | None
            p99: float | None
            if n == 0:
                mean = p50 = p99 = None
            elif mean is not None:
                mean = self._clip(mean)
                q50, q99 = window.quantile(0.5), window.quantile(0.99)
                p50 = self._clip(mean if q50 is None else q50)
                p99 = max(self._clip(mean if q99 is None else q99), p50)
            else:  # only failures (no response head): the policy's charged estimate
                mean = p50 = p99 = self._clip(view.latency_estimate)
            requests.append(n)
            failures.append(min(window.failures, n))
            means.append(mean)
            p50s.append(p50)
            p99s.append(p99)
        return EpochReport(
            epoch=int(wall // epoch_seconds),
            sent_at=wall,
            endpoints=endpoints,
            requests=tuple(requests),
            failures=tuple(failures),
            latency_mean=tuple(means),
            latency_p50=tuple(p50s),
            latency_p99=tuple(p99s),
            in_flight=tuple(max(v.in_flight, 0) for v in views),
            demand=min(sum(requests) / elapsed, MAX_DEMAND),
            weights=_normalised(snapshot, endpoints),
            regret=self._regret(snapshot, len(endpoints)),
        )

    def _regret(self, snapshot: PolicySnapshot, k: int) -> tuple[tuple[float, ...], ...]:
        matrix = snapshot.regret_matrix
        if len(matrix) != k or any(len(row) != k for row in matrix):
            return tuple(tuple(0.0 for _ in range(k)) for _ in range(k))
        bound = self.max_seconds
        return tuple(
            tuple(min(max(x, -bound), bound) if math.isfinite(x) else 0.0 for x in row)
            for row in matrix
        )


def _normalised(snapshot: PolicySnapshot, endpoints: tuple[str, ...]) -> tuple[float, ...]:
    """The snapshot's weights on ``endpoints``, summing to one (uniform if they cannot)."""
    k = len(endpoints)
    raw = [max(float(snapshot.weights.get(e, 0.0)), 0.0) for e in endpoints]
    total = math.fsum(w for w in raw if math.isfinite(w))
    if not math.isfinite(total) or total <= 0:
        weights = [1.0 / k] * k
    else:
        weights = [w / total if math.isfinite(w) else 0.0 for w in raw]
        weights[max(range(k), key=weights.__getitem__)] += 1.0 - math.fsum(weights)
    return tuple(min(max(w, 0.0), 1.0) for w in weights)
