"""Hedged exploration: an endpoint picked only to be explored gets a backup after a delay.

An endpoint without an inbound sidecar answers no probe (:mod:`mesh.probes`), so the only way
to learn whether it healed is to send it user requests: the exploration floor of
:mod:`mesh.herd`. Each such request pays the explored endpoint's latency, which for a slow pod
sets the p99.9. Hedging bounds that price, after Dean & Barroso, "The Tail at Scale" (CACM
2013, "hedged requests"): if the explored endpoint has not answered by the *best* endpoint's
current p90, the same request is sent to the best endpoint as well and the first answer wins;
the other is cancelled, except that an explored endpoint that lost runs on a while so that
its whole latency is learned (the proxy's, ``sidecar/outbound.py``): censored at the race's
bound, a pod slow on half its requests taught only its quick half and looked healthy. A
cancelled racer's observation is censored (its latency is at least the time it was given).

This module owns the pure parts, with the clock passed in:

- :func:`may_hedge` — which requests may be sent twice: idempotent methods (RFC 9110 §9.2.2:
  GET, HEAD, OPTIONS, PUT, DELETE), and never one with a body;
- :class:`HedgePlan` — for one explored endpoint, where the backup goes and after how long;
- :func:`plan_hedges` — the plans of one upstream, rebuilt off the request path from the
  weights (an endpoint is explored when only the floor holds it), the probe cover (an endpoint
  covered by probes is never explored with user requests), the latency estimates (the best
  endpoint) and that endpoint's recent p90 (the delay);
- :class:`RecentLatencies` — each endpoint's recent answered latencies, whose p90 is the delay.

Whether the budget allows a hedge, the racing and the cancelling are the proxy's
(``sidecar/outbound.py``); a hedge spends from the same retry budget as a retry.

The same idempotent requests may also be *rescued* (:class:`Rescuer`): a request still waiting
at an endpoint when the policy ejects it (it failed in a row, or it holds requests it does not
answer: a hung pod) is given up there and sent to another endpoint, as a retry after a per-try
timeout is in Envoy (``per_try_timeout``), except that the try's end is the ejection, which the
policy decides from what the endpoint does, not a fixed time. Without it, what a hung pod holds
waits for the request timeout (15 s by default) and fails.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from mesh.probes import LatencyWindow

HEDGE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
"""Idempotent methods (RFC 9110 §9.2.2) a hedge may send twice (TRACE is left out: it echoes
the request and is no routing traffic)."""

EXPLORED_FACTOR = 1.5
"""An endpoint whose weight is at most this many exploration floors is held only by the floor
(the same test as the policy's "used by choice")."""

MIN_DELAY = 0.001
"""Shortest hedge delay (seconds): a p90 of 0 (an instant stub) must not hedge every request."""


def may_hedge(method: str, has_body: bool) -> bool:
    """Whether a request may be hedged: an idempotent method and no body, ever."""
    return method in HEDGE_METHODS and not has_body


@dataclass(frozen=True, slots=True)
class HedgePlan:
    """For a request to an explored endpoint: send it to ``backup`` too if no answer came
    within ``delay`` seconds."""

    backup: str
    delay: float


@runtime_checkable
class Hedger(Protocol):
    """A policy that hedges its exploratory picks (``equilibrium``)."""

    def hedge_plan(self, endpoint: str) -> HedgePlan | None:
        """The plan for a request picked to ``endpoint``; None: not an exploratory pick (or
        nothing to hedge with)."""


@runtime_checkable
class Rescuer(Protocol):
    """A policy that says when requests waiting at an endpoint should go elsewhere
    (``equilibrium``)."""

    def rescue_before(self, endpoint: str, now: float) -> float | None:
        """A time such that the bodiless idempotent requests sent to ``endpoint`` before it
        and still unanswered at ``now`` should be given up there and sent elsewhere (the
        endpoint was ejected then); None: none should."""


def plan_hedges(
    endpoints: Sequence[str],
    weights: Sequence[float],
    floor: float,
    covered: Sequence[bool],
    estimates: Sequence[float],
    p90_of: Callable[[int], float | None],
    min_delay: float = MIN_DELAY,
) -> dict[str, HedgePlan]:
    """The hedge plans of one upstream, by explored endpoint.

    An endpoint is explored when it has a weight but at most ``EXPLORED_FACTOR × floor`` of it
    and is not ``covered`` by probes. The backup is the endpoint with the lowest latency
    estimate among those used by choice (weight above that bound); the delay is that
    endpoint's recent p90 (``p90_of(index)``, read only for it; None when too few samples:
    then there is no plan, for no delay is known), at least ``min_delay``. No plan without a
    used endpoint or a floor.
    """
    if floor <= 0 or not endpoints:
        return {}
    bound = EXPLORED_FACTOR * floor
    explored = [e for i, e in enumerate(endpoints) if 0.0 < weights[i] <= bound and not covered[i]]
    used = [i for i, w in enumerate(weights) if w > bound]
    if not explored or not used:
        return {}
    best = min(used, key=lambda i: (estimates[i], i))
    p90 = p90_of(best)
    if p90 is None or not math.isfinite(p90):
        return {}
    plan = HedgePlan(endpoints[best], max(min_delay, p90))
    return dict.fromkeys(explored, plan)


class RecentLatencies:
    """Each endpoint's answered latencies of the last few seconds (a :class:`LatencyWindow`
    each: ``span`` seconds, at least ``min_samples`` of them); the p90 is the hedge delay.
    Pure; ``now`` is passed in."""

    def __init__(self, span: float = 5.0, max_samples: int = 256, min_samples: int = 8,
                 max_age: float = 30.0) -> None:
        self._args = (span, max_samples, min_samples, max_age)
        self.min_samples = min_samples
        self._windows: dict[str, LatencyWindow] = {}

    def add(self, endpoint: str, now: float, latency: float) -> None:
        window = self._windows.get(endpoint)
        if window is None:
            window = self._windows[endpoint] = LatencyWindow(*self._args)
        window.add(now, latency)

    def forget(self, keep: Sequence[str]) -> None:
        """Drop the windows of endpoints not in ``keep``."""
        wanted = set(keep)
        for gone in set(self._windows) - wanted:
            del self._windows[gone]

    def p90(self, endpoint: str, now: float) -> float | None:
        """The endpoint's recent p90 (nearest rank), or None with fewer than ``min_samples``
        samples kept."""
        window = self._windows.get(endpoint)
        if window is None:
            return None
        _, _, p90, n = window.summary(now)
        return p90 if n >= self.min_samples else None
