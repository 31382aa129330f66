"""Share-preserving per-request pacing of a mixed strategy.

A routing strategy says *how much* traffic each endpoint gets (weights summing to 1); drawing
every request independently at random from it (Poisson splitting) also decides *when* each
endpoint gets a request, and does so blindly: a single-server pod may receive a request while
it is still busy with this sidecar's previous one, although another endpoint is idle. A
per-request balancer such as power-of-two-choices on in-flight counts (Mitzenmacher, "The
power of two choices in randomized load balancing", 2001) fixes the *when*, but in doing so it
also changes the *how much*: it moves traffic towards whichever endpoint empties fastest, i.e.
back towards the selfish (Wardrop) split that the regret learner or the signaler's correlated
equilibrium was chosen to improve on, and past the thundering-herd cap.

:class:`CreditPacer` keeps the *how much* exactly and only chooses the *when*. It is a deficit
scheduler in the manner of smooth weighted round robin (nginx's ``ngx_http_upstream_wrr``) or
deficit round robin (Shreedhar & Varghese, SIGCOMM 1995): on every request each endpoint earns
its weight in credit and the endpoint served pays one. Credit is kept within ``[-window,
window]``: an endpoint ``window`` requests behind its share is served at once; otherwise any
endpoint that can pay without going ``window`` requests ahead may be chosen, and the pacer takes
the one with the lowest *cost*, largest credit first on ties. The caller passes Linkerd's
peak-EWMA cost, latency estimate x (this caller's requests in flight + 1): the endpoint where
this request is expected to finish first, as a shortest-expected-delay dispatcher would choose,
but only inside the share. So over any stretch of requests each endpoint's count stays within
about ``window`` of weight x requests: the cap, the exploration floor and a recommendation are
honoured, only reordered.

Pure and deterministic: no clock, no random generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

DEFAULT_WINDOW = 4.0
"""Requests an endpoint may fall behind (or run ahead of) its share; measured in the
``herding`` benchmark, 4 and 8 did equally well (docs/benchmarks.md)."""


@dataclass(slots=True)
class CreditPacer:
    """Deficit credits over a fixed list of endpoints (indices ``0..k-1``)."""

    window: float = DEFAULT_WINDOW
    weights: list[float] = field(default_factory=list)
    credit: list[float] = field(default_factory=list)

    def resize(self, keep: Sequence[int | None]) -> None:
        """Carry the credit of endpoints that stay (``keep[i]`` = old index or None)."""
        old = self.credit
        self.credit = [old[j] if j is not None and j < len(old) else 0.0 for j in keep]
        self._rebalance()

    def set_strategy(self, weights: Sequence[float]) -> None:
        """New weights (normalised here), one per endpoint."""
        total = sum(w for w in weights if w > 0)
        if total <= 0 or len(weights) != len(self.credit):
            self.weights = [0.0] * len(self.credit)
            return
        self.weights = [max(w, 0.0) / total for w in weights]
        self._rebalance()

    def choose(self, costs: Sequence[float],
               paced: Sequence[bool] | None = None) -> int | None:
        """The endpoint index for one request (and charge it), or None with no weights.

        ``costs[i]``: what sending this request to endpoint ``i`` is expected to cost (lower is
        better), e.g. its latency estimate x (requests in flight + 1). ``paced[i]`` False
        takes endpoint ``i`` out of this choice: it earns no credit and forfeits what it was
        owed, so the pacer never owes it a burst (the caller sends it its share another way,
        see :func:`split_pick`); the others share this request in proportion to their
        weights."""
        weights, credit = self.weights, self.credit
        if not weights:
            return None
        if paced is None:
            paced = [True] * len(weights)
        total = sum(w for w, ok in zip(weights, paced, strict=True) if ok and w > 0)
        if total <= 0:
            return None
        best: tuple[float, float] | None = None
        owed = -1
        for i, w in enumerate(weights):
            if not paced[i] or w <= 0:
                credit[i] = min(credit[i], 0.0)
                continue
            credit[i] += w / total
            if owed < 0 or credit[i] > credit[owed]:
                owed = i
        if credit[owed] < self.window:
            for i, w in enumerate(weights):
                if w <= 0 or not paced[i] or credit[i] - 1.0 < -self.window:
                    continue
                key = (costs[i], -credit[i])
                if best is None or key < best:
                    best, owed = key, i
        credit[owed] -= 1.0
        return owed

    def _rebalance(self) -> None:
        """Keep credits in [-window, window] and summing to zero, so that a change of
        strategy neither leaves a debt that starves an endpoint nor a windfall that floods
        it; an endpoint with no weight forfeits what it was owed."""
        credit, weights = self.credit, self.weights
        if not credit:
            return
        for i, c in enumerate(credit):
            limit = self.window if i >= len(weights) or weights[i] > 0 else 0.0
            credit[i] = min(max(c, -self.window), limit)
        mean = sum(credit) / len(credit)
        for i in range(len(credit)):
            credit[i] -= mean
