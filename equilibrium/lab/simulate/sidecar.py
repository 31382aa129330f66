"""One simulated sidecar: the proxy's routing calls, in virtual time, on the unmodified policy.

Owns :class:`SimSidecar`: an :class:`sidecar.upstreams.UpstreamTable` with one upstream (so
the policy, its profile and its retry budget are built exactly as the real sidecar builds
them), its own ``random.Random``, and the three calls the outbound proxy
(:mod:`sidecar.outbound`) makes around every attempt, in the same order and with the same
arguments:

- :meth:`route`: ``policy.pick(rng, now, frozenset(tried))`` (the proxy's ``upstream_pick``
  phase), then ``policy.on_start(endpoint, now)``; a retry first asks the retry budget, as the
  proxy does;
- :meth:`answered`: ``Outcome(endpoint, now - sent, status < 500, now, None, answered=True)``
  for a response head;
- :meth:`refused`: ``Outcome(endpoint, now - sent, False, now)`` for an attempt that got
  nothing (connection refused), which the proxy may retry on an endpoint not tried yet.

and, off the request path, :meth:`tick` (``group.tick(now)``, as the runner's tick loop).
Must not know about events or pods: the engine (:mod:`equilibrium.lab.simulate.engine`) calls it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from mesh.policy import Outcome
from mesh.profiles import StrategyProfile
from sidecar.outbound import RETRYABLE_METHODS
from sidecar.upstreams import UpstreamGroup, UpstreamTable

UPSTREAM = "demo"
#: the proxy's default number of attempts (sidecar.outbound.OutboundProxy max_attempts)
MAX_ATTEMPTS = 3


class SimSidecar:
    """The routing side of one sidecar for one upstream (see the module docstring)."""

    __slots__ = ("group", "id", "index", "max_attempts", "observed", "rng", "table")

    def __init__(
        self, index: int, sidecar_id: str, policy: str, profile: StrategyProfile,
        endpoints: Sequence[str], rng: random.Random, now: float,
        max_attempts: int = MAX_ATTEMPTS, observed: bool = True,
    ) -> None:
        self.index = index
        self.observed = observed
        self.id = sidecar_id
        self.rng = rng
        self.max_attempts = max_attempts
        self.table = UpstreamTable(policy, profile)
        self.table.apply({UPSTREAM: list(endpoints)}, now)
        group = self.table.get(UPSTREAM)
        assert group is not None
        self.group: UpstreamGroup = group

    def set_endpoints(self, endpoints: Sequence[str], now: float) -> None:
        """Discovery changed the endpoint set (the runner applies it to the table)."""
        self.table.apply({UPSTREAM: list(endpoints)}, now)

    def route(self, now: float, tried: tuple[str, ...] = ()) -> str | None:
        """The endpoint of this attempt, counted as started; None when the proxy would give
        up (no endpoint left, or a retry the budget refuses)."""
        group = self.group
        if not tried:
            group.budget.deposit(now)
        endpoint = group.policy.pick(self.rng, now, frozenset(tried))
        if endpoint is None:
            return None
        if tried and not group.budget.try_withdraw(now):
            return None
        group.policy.on_start(endpoint, now)
        return endpoint

    def answered(self, endpoint: str, sent: float, now: float, status: int = 200) -> None:
        self.group.policy.on_outcome(
            Outcome(endpoint, now - sent, status < 500, now, None, answered=True))

    def refused(self, endpoint: str, sent: float, now: float) -> None:
        self.group.policy.on_outcome(Outcome(endpoint, now - sent, False, now))

    def may_retry(self, tried: tuple[str, ...], method: str = "GET") -> bool:
        """Whether the proxy would try again after ``tried`` got nothing (GET: yes)."""
        return method in RETRYABLE_METHODS and len(tried) < self.max_attempts

    def tick(self, now: float) -> None:
        """The runner's tick. With ``observed`` False (nobody reads the snapshot between ticks:
        no signaling task) only the policy's own tick runs, and the observers' snapshot and
        ``X-GT-Regret`` header (which change nothing the policy decides) are built once, by
        :meth:`finish`; a test holds both paths to the same decisions."""
        if self.observed:
            self.group.tick(now)
        else:
            self.group.policy.tick(now)

    def finish(self) -> None:
        """Build the observers' snapshot (the fast path skipped it)."""
        if not self.observed:
            self.group.snapshot = self.group.policy.snapshot()
