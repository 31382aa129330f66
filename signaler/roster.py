"""Which discovered upstreams the signaler serves, and when it forgets them.

Owns :class:`UpstreamRoster`: the bookkeeping behind discovery (``SCAN`` finds every
``eq:{u}:summaries`` key, including ones nobody legitimate writes to). Pure: times are passed
in, the store is the service's business (:mod:`signaler.service`).

The rules:

* A stream found by ``SCAN`` is only a **candidate**. It is served once a *probe* (its newest
  few entries, ``XREVRANGE``) shows a summary signed with the mesh key and sent within the
  freshness window. A candidate whose probe shows none is probed again only after
  ``probe_every`` seconds, and at most ``probe_budget`` candidates are probed per discovery
  round, so 500 forged streams cost a bounded trickle of reads, not a lease, a consumer group,
  a plan and a dozen metric series each.
* A served upstream stays **active** while valid summaries keep coming: the leader sees them as
  it consumes (:meth:`UpstreamRoster.seen`); a standby re-probes when it has seen none for half
  of ``forget_after``.
* An upstream with no valid summary for ``forget_after`` seconds is **forgotten**: its lease
  is released, its state and its metric series are dropped, and it is a candidate again.

Upstreams named on the command line (``--upstream``) are always served and never forgotten.
Memory is bounded: candidates not found by the latest ``SCAN`` are dropped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

DEFAULT_FORGET_AFTER = 60.0
DEFAULT_PROBE_EVERY = 30.0
DEFAULT_PROBE_BUDGET = 50


@dataclass(slots=True)
class UpstreamRoster:
    """Active upstreams (last valid summary seen) and candidates (next probe due)."""

    forget_after: float = DEFAULT_FORGET_AFTER
    probe_every: float = DEFAULT_PROBE_EVERY
    probe_budget: int = DEFAULT_PROBE_BUDGET
    active: dict[str, float] = field(default_factory=dict)
    next_probe: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.forget_after > 0 and self.probe_every > 0 and self.probe_budget >= 1):
            raise ValueError("forget_after and probe_every must be > 0, probe_budget >= 1")

    def discovered(self, found: Iterable[str], now: float) -> list[str]:
        """After a ``SCAN``: the candidates to probe now (at most ``probe_budget``, the ones
        waiting longest first); candidates no longer found are dropped."""
        found = set(found)
        for gone in [u for u in self.next_probe if u not in found]:
            del self.next_probe[gone]
        due = sorted((self.next_probe.get(u, -math.inf), u) for u in found
                     if u not in self.active and self.next_probe.get(u, -math.inf) <= now)
        return [u for _, u in due[: self.probe_budget]]

    def probed(self, upstream: str, valid: bool, now: float) -> None:
        """The outcome of probing ``upstream``: a valid, fresh summary makes it active."""
        if valid:
            self.seen(upstream, now)
        elif upstream not in self.active:
            self.next_probe[upstream] = now + self.probe_every

    def seen(self, upstream: str, now: float) -> None:
        """A valid summary for ``upstream`` arrived at ``now``."""
        self.active[upstream] = now
        self.next_probe.pop(upstream, None)

    def needs_probe(self, upstream: str, now: float) -> bool:
        """Whether a standby should re-probe an active upstream (half the forget time quiet)."""
        seen = self.active.get(upstream)
        return seen is not None and now - seen > self.forget_after / 2

    def expired(self, now: float) -> list[str]:
        """Forget every active upstream quiet for ``forget_after``; returns them (sorted)."""
        gone = sorted(u for u, seen in self.active.items() if now - seen > self.forget_after)
        for upstream in gone:
            del self.active[upstream]
            self.next_probe[upstream] = now + self.probe_every
        return gone
