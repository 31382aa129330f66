"""Retry budget: retries may add at most ``ratio`` of the recent requests plus a floor.

Linkerd and Envoy both bound retries this way (Linkerd: 20 % of requests plus 10 retries per
second, over a 10 s window) so that retries cannot turn a slow upstream into a retry storm
(istio#27419). Counters decay exponentially with time constant ``window``; a retry is allowed
while ``retries <= ratio * requests + min_per_s * window``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class RetryBudget:
    ratio: float = 0.2
    min_per_s: float = 10.0
    window: float = 10.0
    _requests: float = 0.0
    _retries: float = 0.0
    _at: float | None = None

    def _decay(self, now: float) -> None:
        if self._at is not None and now > self._at:
            w = math.exp(-(now - self._at) / self.window)
            self._requests *= w
            self._retries *= w
        self._at = now if self._at is None else max(self._at, now)

    def deposit(self, now: float) -> None:
        """One original (not retried) request was sent."""
        self._decay(now)
        self._requests += 1.0

    def try_withdraw(self, now: float) -> bool:
        """May one retry be sent now? Counts it if so."""
        self._decay(now)
        if self._retries + 1.0 <= self.ratio * self._requests + self.min_per_s * self.window:
            self._retries += 1.0
            return True
        return False
