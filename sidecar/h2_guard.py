"""The outbound listener's HTTP/2 flood budgets: how many of a costly frame one app connection
may send before the sidecar ends it with GOAWAY(ENHANCE_YOUR_CALM).

Owns pure counting: a token bucket per kind of frame (:class:`FrameBudget`) and the set of
them one connection carries (:class:`FloodGuard`), with the documented defaults
(:data:`DEFAULT_BUDGETS`). The kinds are the floods of RFC 9113 §10.5 (SETTINGS, PING, empty
DATA frames) and the "rapid reset" pattern of CVE-2023-44487 (a client that opens streams and
resets them before they are answered, so each costs the server work and never counts against
SETTINGS_MAX_CONCURRENT_STREAMS). The clock is passed in; nothing here reads a socket, sends a
frame or touches ``h2``: :mod:`sidecar.h2_server` feeds it and acts on its verdict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

RAPID_RESET = "rapid_reset"  # the app reset a stream whose answer had not ended
PING = "ping"
SETTINGS = "settings"
EMPTY_DATA = "empty_data"  # a DATA frame with no payload and no END_STREAM
KINDS = (RAPID_RESET, PING, SETTINGS, EMPTY_DATA)


@dataclass(frozen=True, slots=True)
class Budget:
    """``burst`` frames at once, refilled at ``rate`` per second."""

    rate: float
    burst: float

    def __post_init__(self) -> None:
        if self.rate < 0 or self.burst < 1:
            raise ValueError(f"a budget needs rate >= 0 and burst >= 1, got {self}")


# A gRPC client cancels calls (deadlines, hedging) and pings for keep-alive, but not hundreds a
# second on one connection; an attack sends thousands.
DEFAULT_BUDGETS: Mapping[str, Budget] = {
    RAPID_RESET: Budget(rate=50.0, burst=200.0),
    PING: Budget(rate=10.0, burst=50.0),
    SETTINGS: Budget(rate=10.0, burst=50.0),
    EMPTY_DATA: Budget(rate=20.0, burst=100.0),
}


class FrameBudget:
    """A token bucket: :meth:`spend` takes one token; False once none is left."""

    __slots__ = ("_at", "_budget", "_tokens")

    def __init__(self, budget: Budget, now: float) -> None:
        self._budget = budget
        self._tokens = budget.burst
        self._at = now

    def spend(self, now: float) -> bool:
        elapsed = max(0.0, now - self._at)
        self._at = now
        self._tokens = min(self._budget.burst, self._tokens + elapsed * self._budget.rate)
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class FloodGuard:
    """One connection's budgets; :meth:`spend` names the kind that ran out, if it did."""

    __slots__ = ("_buckets",)

    def __init__(self, now: float, budgets: Mapping[str, Budget] = DEFAULT_BUDGETS) -> None:
        self._buckets = {kind: FrameBudget(budget, now) for kind, budget in budgets.items()}

    def spend(self, kind: str, now: float) -> bool:
        """Count one frame of ``kind``; False when the connection is over its budget."""
        bucket = self._buckets.get(kind)
        return bucket is None or bucket.spend(now)
