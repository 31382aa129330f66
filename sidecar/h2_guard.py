"""The outbound listener's HTTP/2 flood budgets: how many of a costly frame one app connection
may send before the sidecar ends it with GOAWAY(ENHANCE_YOUR_CALM).

Owns pure counting: a token bucket per kind of frame (:class:`FrameBudget`) and the set of
them one connection carries (:class:`FloodGuard`), with the documented defaults
(:data:`DEFAULT_BUDGETS`). The kinds are the floods of RFC 9113 §10.5 (SETTINGS, PING, empty
DATA frames) and the "rapid reset" pattern of CVE-2023-44487 (a client that opens streams and
resets them before they are answered, so each costs the server work and never counts against
SETTINGS_MAX_CONCURRENT_STREAMS: an allowance earned by the calls answered, as Envoy counts
it, below), and frames that cost the sidecar work for nothing in return:
frames a server ignores (undefined types, which RFC 9113 §5.5 says to ignore, ALTSVC,
ORIGIN: a token bucket), and PRIORITY and
WINDOW_UPDATE frames, which a client sends in proportion to what it does, so their allowance
grows with it (:class:`Allowance`, as Envoy's ``max_inbound_priority_frames_per_stream`` and
``max_inbound_window_update_frames_per_data_frame_sent``): PRIORITY with the streams the
sidecar serves, WINDOW_UPDATE with those and the DATA frames it sent. The clock is
passed in; nothing here reads a socket, sends a frame or touches ``h2``:
:mod:`sidecar.h2_server` feeds it and acts on its verdict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

RAPID_RESET = "rapid_reset"  # the peer reset a young stream whose answer had not begun
PING = "ping"
SETTINGS = "settings"
EMPTY_DATA = "empty_data"  # a DATA frame with no payload and no END_STREAM
UNKNOWN_FRAME = "unknown_frame"  # a frame a server ignores: undefined types, ALTSVC, ORIGIN
PRIORITY = "priority"  # a PRIORITY frame
WINDOW_UPDATE = "window_update"  # a WINDOW_UPDATE frame, for a stream or the connection
KINDS = (RAPID_RESET, PING, SETTINGS, EMPTY_DATA, UNKNOWN_FRAME, PRIORITY, WINDOW_UPDATE)
TIMED_KINDS = (PING, SETTINGS, EMPTY_DATA, UNKNOWN_FRAME)  # token buckets
EARNED_KINDS = (PRIORITY, WINDOW_UPDATE, RAPID_RESET)  # allowances that grow with its work


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
    PING: Budget(rate=10.0, burst=50.0),
    SETTINGS: Budget(rate=10.0, burst=50.0),
    EMPTY_DATA: Budget(rate=20.0, burst=100.0),
    UNKNOWN_FRAME: Budget(rate=10.0, burst=100.0),
}


@dataclass(frozen=True, slots=True)
class Allowance:
    """At most ``base + per_unit × units`` frames over a connection's life, where ``units``
    is what the connection has earned (:meth:`FloodGuard.earn`)."""

    base: int
    per_unit: int

    def __post_init__(self) -> None:
        if self.base < 1 or self.per_unit < 0:
            raise ValueError(f"an allowance needs base >= 1 and per_unit >= 0, got {self}")


# Envoy's defaults: 100 PRIORITY frames per stream opened, 10 WINDOW_UPDATE frames per DATA
# frame sent. A client's flow control sends one WINDOW_UPDATE per stream and one for the
# connection as it reads, at most a few per DATA frame; a stream opened earns its own too
# (gRPC clients enlarge a new stream's window at once).
DEFAULT_ALLOWANCES: Mapping[str, Allowance] = {
    PRIORITY: Allowance(base=100, per_unit=100),  # units: streams served
    WINDOW_UPDATE: Allowance(base=100, per_unit=10),  # units: those, and DATA frames sent
    RAPID_RESET: Allowance(base=500, per_unit=1),  # units: streams answered to the end
}
"""Rapid reset as Envoy counts it (``premature_reset_total_stream_count`` 500, a premature
reset being one within ``premature_reset_min_stream_lifetime`` 1 s): what makes the pattern
an attack is resets that outnumber the calls a connection lets finish, since each frees its
stream's place under SETTINGS_MAX_CONCURRENT_STREAMS at once; resets at some rate are what
deadlines and cancellations are. So a connection may reset 500 young streams before any
answer began, and one more per call answered to its end: a peer sidecar's pooled connection
relays every one of its apps' cancellations (a deadline burst, hedging's losers) beside
their completed calls, which is not a flood. There is no ceiling on the rate, as Envoy has
none: one (tried at 500 a second, 1,000 at once) ended a pooled connection carrying an
ordinary deadline burst of a busy caller, and every call on it. A client can earn its resets
with calls as cheap as an UNIMPLEMENTED answer; each costs it a whole round trip through the
sidecar, so such a client resets no faster than it gets calls answered, the concurrency limit
of SETTINGS_MAX_CONCURRENT_STREAMS back in force on half its streams."""

PREMATURE_LIFETIME = 1.0
"""Seconds: a stream reset by the peer when younger than this, before its answer began,
counts as a rapid reset (Envoy's default lifetime)."""


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
    """One connection's budgets and allowances; :meth:`spend` says whether a frame of a kind
    is still within them."""

    __slots__ = ("_allowances", "_buckets", "_frames", "_units")

    def __init__(self, now: float, budgets: Mapping[str, Budget] = DEFAULT_BUDGETS,
                 allowances: Mapping[str, Allowance] = DEFAULT_ALLOWANCES) -> None:
        self._buckets = {kind: FrameBudget(budget, now) for kind, budget in budgets.items()}
        self._allowances = dict(allowances)
        self._frames = dict.fromkeys(self._allowances, 0)
        self._units = dict.fromkeys(self._allowances, 0)

    def earn(self, kind: str, units: int = 1) -> None:
        """The connection did work that entitles it to more frames of ``kind``."""
        if kind in self._units:
            self._units[kind] += units

    def spend(self, kind: str, now: float) -> bool:
        """Count one frame of ``kind``; False when the connection is over its allowance or
        its budget (a kind may have both: it must pass both)."""
        allowance = self._allowances.get(kind)
        if allowance is not None:
            frames = self._frames[kind] = self._frames[kind] + 1
            if frames > allowance.base + allowance.per_unit * self._units[kind]:
                return False
        bucket = self._buckets.get(kind)
        return bucket is None or bucket.spend(now)
