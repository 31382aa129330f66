"""A caller's own sidecar on probation: back off while punished, then ramp back up.

This module owns how the *calling* sidecar plays its side of a punishment by an upstream: the
back-off while it lasts and the paced return after it. It is pure: the sidecar passes ``now``
(monotonic seconds) and what it learned from the upstream's answers.

Why a ramp
----------
Each inbound sidecar keeps its own reputation book (:mod:`mesh.reputation`), and the caller's
sidecar backs off from the *whole* upstream service while the harshest of its pods punishes
the caller. When the back-off ended, the caller's app used to resume at once with whatever it
had been doing: a flooding app sent its full flood to every pod of the service, including pods
where it was in good standing (never punished there, or forgiven during the long back-off), and
congested them for the seconds their books needed to detect it again (``detection_lag()``,
about 2.4 s): cooperative callers got ``503 queue-timeout`` meanwhile (the soak of
2026-12-02, docs/benchmarks.md). A cooperative sidecar therefore leaves a punishment the way a
TCP sender leaves a retransmission timeout: by *slow start* (Jacobson, "Congestion avoidance
and control", SIGCOMM 1988), not at its old rate. Here the start is the rate the upstream
delivered to this caller before the punishment, scaled by the punishment's throttle
(``throttle_fraction ** level``, the share the punisher itself would have let through), and the
allowed rate doubles every ``doubling`` seconds. Probation ends when the allowed rate reaches
``headroom`` times the rate delivered before the punishment: a caller that returns to what it
was served is never held back for long; a flood that returns reaches the pods as a ramp, which
their books judge (and punish again, one level higher) before it congests them. It is the
graduated-sanctions idea (Ostrom, *Governing the Commons*, 1990, design principle 5) applied by
the sanctioned party's own agent, as the self-enforced back-off before it.

The rules, exactly
------------------
- **Delivered rate** ``d``: an exponentially decayed rate (time constant ``rate_tau``) of the
  upstream's answers that were not refusals (:meth:`SelfProbation.delivered`).
- **Punished** until ``u`` at level ``L`` (:meth:`SelfProbation.punish`): the back-off runs to
  the latest ``u`` heard. The first signal of a punishment fixes ``b = max(min_rate, d)`` (the
  rate delivered before it) and ``r0 = max(min_rate, b * throttle_fraction ** L)``.
- **Back-off**: before ``u`` nothing is sent (:meth:`SelfProbation.check` gives the seconds
  left).
- **Probation**: from ``u`` the allowed rate is ``r(t) = r0 * 2 ** ((t - u) / doubling)``; a
  token bucket of that rate and a burst of one second's worth (at least 1, full at ``u``)
  lets requests through; the rest are refused locally with a wait of ``1 / r(t)`` seconds.
  When ``r(t) >= headroom * b`` probation is over and nothing is paced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum


class SelfStanding(StrEnum):
    """Where the caller stands with one upstream, by its own sidecar's account."""

    FREE = "free"
    BACKING_OFF = "backing-off"
    PROBATION = "probation"


@dataclass(frozen=True, slots=True)
class ProbationRules:
    """Tuning of :class:`SelfProbation` (see the module docstring)."""

    doubling: float = 2.0
    """Seconds for the allowed rate to double on probation."""
    headroom: float = 2.0
    """Probation ends when the allowed rate is this multiple of the rate delivered before."""
    throttle_fraction: float = 0.5
    """The punisher's throttle per level (:class:`mesh.reputation.LadderRules`)."""
    rate_tau: float = 5.0
    """Time constant (s) of the delivered-rate estimate."""
    min_rate: float = 1.0
    """Requests/s the ramp never starts below."""

    def __post_init__(self) -> None:
        values = (self.doubling, self.headroom, self.rate_tau, self.min_rate)
        if not all(math.isfinite(v) and v > 0 for v in values) or self.headroom < 1:
            raise ValueError("need doubling, rate_tau, min_rate > 0 and headroom >= 1")
        if not 0 < self.throttle_fraction < 1:
            raise ValueError("need 0 < throttle_fraction < 1")


@dataclass(frozen=True, slots=True)
class Paced:
    """The answer of :meth:`SelfProbation.check`: ``send`` or not, and if not, for how long
    (``wait`` seconds) and why (``standing``)."""

    send: bool
    standing: SelfStanding
    wait: float = 0.0


_FREE = Paced(True, SelfStanding.FREE)  # the answer to nearly every request, made once


class SelfProbation:
    """One upstream's back-off and probation, as the calling sidecar enforces them."""

    __slots__ = ("_at", "_before", "_count", "_start", "_tokens", "_tokens_at", "level", "rules",
                 "until")

    def __init__(self, rules: ProbationRules | None = None) -> None:
        self.rules = rules or ProbationRules()
        self.until = -math.inf
        self.level = 0
        self._count, self._at = 0.0, -math.inf  # the delivered rate's decayed count
        self._before = self._start = self.rules.min_rate
        self._tokens, self._tokens_at = 0.0, -math.inf

    # --- inputs -----------------------------------------------------------------------------

    def delivered(self, now: float) -> None:
        """The upstream answered one request (not a refusal)."""
        self._count = self.delivered_count(now) + 1.0
        self._at = max(self._at, now)

    def punish(self, now: float, until: float, level: int) -> bool:
        """The upstream says this caller is punished until ``until`` at ``level``; True if
        that extends the back-off."""
        if until <= self.until:
            return False
        if self.standing(now) is SelfStanding.FREE:  # a new punishment: remember what was
            r = self.rules
            self._before = max(r.min_rate, self.delivered_rate(now))
            self._start = max(r.min_rate, self._before * r.throttle_fraction ** max(1, level))
        self.until, self.level = until, level
        self._tokens_at = -math.inf  # the bucket is filled when probation starts
        return True

    # --- decisions ----------------------------------------------------------------------------

    def check(self, now: float) -> Paced:
        """May a request be sent now? Takes a token on probation when it may."""
        standing = self.standing(now)
        if standing is SelfStanding.FREE:
            return _FREE
        if standing is SelfStanding.BACKING_OFF:
            return Paced(False, standing, self.until - now)
        rate = self.allowed_rate(now)
        burst = max(1.0, rate)
        if self._tokens_at < self.until:
            self._tokens, self._tokens_at = burst, now
        elif now > self._tokens_at:
            self._tokens = min(burst, self._tokens + (now - self._tokens_at) * rate)
            self._tokens_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return Paced(True, standing)
        return Paced(False, standing, (1.0 - self._tokens) / rate)

    # --- observers ----------------------------------------------------------------------------

    def standing(self, now: float) -> SelfStanding:
        if now < self.until:
            return SelfStanding.BACKING_OFF
        if self.until > -math.inf and self.allowed_rate(now) < self.rules.headroom * self._before:
            return SelfStanding.PROBATION
        return SelfStanding.FREE

    def allowed_rate(self, now: float) -> float:
        """Requests/s allowed on probation at ``now`` (0 while backing off, inf when free)."""
        if self.until == -math.inf:
            return math.inf
        if now < self.until:
            return 0.0
        doublings = min((now - self.until) / self.rules.doubling, 64.0)
        return float(self._start * 2.0**doublings)

    def delivered_count(self, now: float) -> float:
        if self._at == -math.inf:
            return 0.0
        return self._count * math.exp(-max(0.0, now - self._at) / self.rules.rate_tau)

    def delivered_rate(self, now: float) -> float:
        """Answers/s the upstream delivered lately (decayed, time constant ``rate_tau``)."""
        return self.delivered_count(now) / self.rules.rate_tau

    @property
    def before(self) -> float:
        """The delivered rate when the current (or last) punishment began."""
        return self._before

    @property
    def start_rate(self) -> float:
        """The allowed rate when probation begins."""
        return self._start
