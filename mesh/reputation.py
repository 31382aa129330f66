"""Folk-theorem policing of inbound callers: reputation, a punishment ladder, and forgiveness.

This module owns how the inbound sidecar judges each caller against a cooperative norm and
throttles the ones that defect. It is pure: the sidecar passes ``now``, the caller's verified
name (:mod:`wire.identity`; unverified callers share :data:`ANONYMOUS`), whether
the request is a retry, and, from :mod:`mesh.concurrency`, the app's congestion level and
capacity. It never reads a clock and keeps bounded memory.

The game
--------
The callers of one app play a repeated game. Each period every caller chooses how hard to
load the app; the app's capacity ``C`` is shared. In the one-shot game flooding is dominant:
a caller that sends ten times its share (and retries every failure) gets more of the app while
everyone's latency rises, so the one-shot Nash equilibrium is a retry storm (a tragedy of the
commons). The *folk theorem* for repeated games (Friedman 1971; Fudenberg & Maskin 1986, "The
folk theorem in repeated games with discounting or with incomplete information", Econometrica
54(3)) says that any feasible, individually rational outcome, here "everyone takes at most its
fair share ``C / n`` when the app is congested and retries within a budget", is an equilibrium
of the repeated game for patient players, provided a deviation is followed by a punishment
whose cost outweighs the deviation's gain.

*Grim trigger* (punish forever after one deviation) sustains cooperation but is brittle: the
monitoring here is noisy (bursty but honest traffic, a retry burst after a deploy), and under
imperfect monitoring grim trigger eventually locks every caller out for good. Equilibria with
*finite* punishment phases do better under noise (Green & Porter 1984), and forgiving
strategies like tit-for-tat and generous tit-for-tat (Axelrod 1984; Nowak & Sigmund 1992)
recover cooperation after a mistake. Equilibrium plays such a *forgiving trigger strategy*:

- punishment is finite: level ``L`` throttles to ``throttle_fraction ** L`` of the fair share
  for a duration that doubles with each level and is capped at ``max_punishment``;
- it deters by construction: a flood goes unpunished for at most ``detection_lag()`` seconds,
  and the first punishment is made long enough to take away more than the flood gained in
  that time (:meth:`ReputationBook.deterrent_duration`; the inequality is in
  ``docs/policing.md``); repeated defection climbs the ladder, so the loss grows geometrically
  while the gain per flood does not;
- it forgives: a caller that cooperates through its punishment returns to full service, and
  its level decays back to 0 over clean probation periods, so an honest caller caught by noise
  is not locked out.

The rules, exactly
------------------
Per caller, with ``s`` its fair share (``capacity / active callers``; times
``anonymous_share`` for the anonymous bucket):

- **Rates.** Request rate ``x`` and retry rate ``y`` are exponentially decayed event rates
  (time constant ``rate_tau``; non-retries ``x - y``).
- **Demand.** A pod cannot tell a caller that floods the *service* from a cooperative caller
  whose sidecar concentrated its traffic on this pod (the learner may put up to its cap, 80 %,
  on one endpoint, for instance while the signaler's plan is missing): both send this pod more
  than its share. The caller's sidecar knows its rate ``R`` to the whole service and the
  service's ``K`` endpoints and signs them on each request (``X-GT-Demand``,
  :mod:`wire.demand`). The norm then judges ``x' = min(x - h, R / K) + h``, where ``h`` is the
  part of ``x`` charged for time held (:meth:`ReputationBook.charge`, which no declaration can
  discount): a caller is a defector only if it takes more than its share of the service as if
  it spread evenly over equal pods, *and* more than its share here. ``K`` counts the endpoints
  the caller's policy may send to now (a pod that is down does not dilute the demand). Without
  a declaration (unverified callers, older sidecars) ``x' = x``. ``x'`` also stands for the
  caller's demand in the water level below; the deterrent length still uses ``x``, what the
  flood took from this pod.
- **Norm / verdict.** A request is *cooperative* (``v = 1``) unless (a) the rate norm applies
  (the app is congested, ``congestion >= congestion_threshold``, or the caller is being
  punished; and another caller is active: a verified caller alone crowds nobody out, and
  what the app cannot take is the limiter's to shed; the anonymous bucket, any number of
  unknown callers, keeps the norm alone) and ``x' > max(rate_floor, rate_tolerance * m)``;
  or (b) ``y > retry_ratio * (x - y) + retry_floor`` (a retry budget of 20 % plus a floor,
  as in Linkerd and Finagle).
- **The norm's share** ``m`` is demand-aware: the *water level* of the max-min fair allocation
  of ``capacity`` among the active callers' current rates (water-filling: callers asking less
  than an equal split keep what they ask, the rest is split equally among the others;
  Bertsekas & Gallager, *Data Networks*, 1992, §6.5.2; Jain, Chiu & Hawe 1984 for max-min
  fairness as the fairness norm). ``m >= s`` always: it is the equal share when every caller
  asks for at least that much, and larger when some callers ask for less, so only a caller
  that takes more than the share the others leave over is a defector. (With ``m = s`` an
  honest caller whose sidecar concentrated its 83 req/s on one pod of four callers was
  punished against 1.5 x 50 req/s while the two other callers there sent 28 req/s each; its
  water level there is 72 req/s.) Only when the active callers' rates add up to more than
  ``capacity``: an app congested while they ask for less is not doing ``capacity`` now (CPU
  starvation, a slow dependency), and the rates cannot say who crowds the others out, so ``m
  = s`` then (a soak's rogue at 83 req/s per pod, 250 req/s in all, beside three callers at
  28 req/s per pod on pods congested at ~120 req/s passed a water level of 116 req/s computed
  against the configured 200). ``m`` is computed only while the norm applies, at most
  every ``share_refresh`` seconds (it sorts the active callers' rates); anonymous callers get
  ``anonymous_share * m``.
- **Defection without a request.** Some misconduct is not a request rate: an upload that
  stalls past its deadline or is abandoned half-way held a connection (and the app's
  attention) for nothing. :meth:`ReputationBook.defect` records such an event as a verdict
  ``v = 0`` at ``now`` without counting a request: the reputation relaxes toward 0 over the
  gap since the caller was last seen, exactly as for an over-share request.
- **Reputation** ``r`` in [0, 1] relaxes toward the current verdict with time constant
  ``reputation_tau``: ``r <- v + (r - v) * exp(-dt / reputation_tau)`` at each request (an idle
  gap is judged by the verdict at its end, so silence is cooperation). New callers start at 1;
  the anonymous bucket starts at ``anonymous_initial_reputation`` (suspicious).
- **Trigger.** When not being punished and ``r < trigger_threshold``: ``L <- min(L + 1,
  max_level)`` and a punishment starts now, lasting ``min(max(base_punishment * 2 ** (L - 1),
  deterrence_margin * D), max_punishment)`` where ``D = g * T_d / ((1 - throttle_fraction) *
  s)`` is the deterrent length for the caller's current gain ``g = min(x - s, capacity - s)``
  and detection lag ``T_d``.
- **End of punishment.** If ``r >= forgive_threshold`` the caller cooperated through it and
  enters probation (full service, level kept); otherwise ``L <- min(L + 1, max_level)`` and a
  new, longer punishment starts (same duration rule).
- **Probation.** Each clean ``probation`` period lowers ``L`` by one; at ``L = 0`` the caller
  is back in good standing. A trigger during probation climbs from the current level
  (escalation on recidivism; the caller's own sidecar also paces its return after a
  punishment, :mod:`mesh.probation`).
- **Throttle.** While punished, requests are admitted by a token bucket of rate
  ``throttle_fraction ** L * s`` and burst ``max(1, rate * throttle_burst)``; the rest are
  answered 429 with ``Retry-After = ceil(remaining punishment)``.

Memory is bounded: callers idle for ``idle_ttl`` (long enough that they would have been
forgiven anyway) are dropped, and at most ``max_callers`` are tracked (least recently seen
dropped first).

What an operator sees
---------------------
:meth:`ReputationBook.snapshot` is the book as data, for ``/debug/state``: the busiest
callers by recent traffic (and the anonymous bucket) with their standing, when their
punishment ends, and how many of their requests were admitted or throttled recently
(exponentially decayed counts with time constant ``recent_window``: about the last minute).
It reads the book without changing it.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field
from enum import StrEnum

from mesh.standings import StandingsIndex, busy_key

ANONYMOUS = "anonymous"
"""The caller of every request whose identity did not verify: one shared, strictest bucket."""


class Phase(StrEnum):
    """Where a caller stands on the punishment ladder."""

    GOOD = "good"
    PUNISHED = "punished"
    PROBATION = "probation"


@dataclass(frozen=True, slots=True)
class LadderRules:
    """The trigger, punishment and forgiveness rules (see the module docstring)."""

    trigger_threshold: float = 0.5
    forgive_threshold: float = 0.7
    base_punishment: float = 10.0
    max_punishment: float = 120.0
    max_level: int = 5
    throttle_fraction: float = 0.5
    probation: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.trigger_threshold <= self.forgive_threshold <= 1:
            raise ValueError("need 0 < trigger_threshold <= forgive_threshold <= 1")
        if not 0 < self.base_punishment <= self.max_punishment or self.probation <= 0:
            raise ValueError("need 0 < base_punishment <= max_punishment and probation > 0")
        if self.max_level < 1 or not 0 < self.throttle_fraction < 1:
            raise ValueError("need max_level >= 1 and 0 < throttle_fraction < 1")

    def duration(self, level: int) -> float:
        """Seconds of punishment at ``level`` (>= 1): base * 2^(level-1), capped."""
        return min(self.base_punishment * 2.0 ** (level - 1), self.max_punishment)

    def fraction(self, level: int) -> float:
        """Share of the fair share a caller at ``level`` may use while punished."""
        return self.throttle_fraction**level if level > 0 else 1.0


class PunishmentLadder:
    """One caller's position on the ladder: a small state machine driven by its reputation."""

    __slots__ = ("level", "phase", "punishments", "rules", "until")

    def __init__(self, rules: LadderRules) -> None:
        self.rules = rules
        self.level = 0
        self.phase = Phase.GOOD
        self.until = -math.inf
        self.punishments = 0

    def step(self, now: float, reputation: float, min_duration: float = 0.0) -> None:
        """Apply the expiry, forgiveness and trigger rules at ``now``.

        A punishment that starts here lasts at least ``min_duration`` (the deterrent length
        :class:`ReputationBook` computes), still capped at ``max_punishment``.
        """
        rules = self.rules
        while self.phase is not Phase.GOOD and now >= self.until:
            if self.phase is Phase.PUNISHED:
                if reputation >= rules.forgive_threshold:
                    self.phase, self.until = Phase.PROBATION, self.until + rules.probation
                else:
                    self._punish(now, min_duration)
            else:  # a clean probation period has passed
                self.level -= 1
                if self.level == 0:
                    self.phase, self.until = Phase.GOOD, -math.inf
                else:
                    self.until += rules.probation
        if self.phase is not Phase.PUNISHED and reputation < rules.trigger_threshold:
            self._punish(now, min_duration)

    def remaining(self, now: float) -> float:
        """Seconds of punishment left (0 unless punished)."""
        return max(0.0, self.until - now) if self.phase is Phase.PUNISHED else 0.0

    def _punish(self, now: float, min_duration: float) -> None:
        self.level = min(self.level + 1, self.rules.max_level)
        self.phase = Phase.PUNISHED
        duration = max(self.rules.duration(self.level), min_duration)
        self.until = now + min(duration, self.rules.max_punishment)
        self.punishments += 1


@dataclass(frozen=True, slots=True)
class PolicingParams:
    """Tuning of :class:`ReputationBook` (the rules are in the module docstring)."""

    capacity: float = 100.0
    """App capacity in requests/s until :meth:`ReputationBook.update_load` gives one."""
    congestion_threshold: float = 0.8
    active_window: float = 5.0
    rate_tau: float = 1.0
    rate_tolerance: float = 1.5
    rate_floor: float = 2.0
    retry_ratio: float = 0.2
    retry_floor: float = 1.0
    reputation_tau: float = 2.0
    throttle_burst: float = 1.0
    deterrence_margin: float = 1.0
    """Punishments last at least this multiple of the deterrent length (0 disables it)."""
    anonymous_share: float = 0.5
    anonymous_initial_reputation: float = 0.6
    max_callers: int = 10_000
    idle_ttl: float = 900.0
    recent_window: float = 60.0
    """Time constant of the recent admitted/throttled counts (:meth:`ReputationBook.snapshot`)."""
    share_refresh: float = 0.1
    """Seconds the norm's water level (:meth:`ReputationBook.norm_share`) is reused."""
    ladder: LadderRules = field(default_factory=LadderRules)

    def __post_init__(self) -> None:
        positive = (self.capacity, self.active_window, self.rate_tau, self.rate_tolerance,
                    self.reputation_tau, self.throttle_burst, self.recent_window,
                    self.share_refresh)
        if not all(math.isfinite(v) and v > 0 for v in positive):
            raise ValueError("capacity, windows, time constants and tolerances must be > 0")
        if not 0 < self.anonymous_share <= 1 or not 0 <= self.anonymous_initial_reputation <= 1:
            raise ValueError("need 0 < anonymous_share <= 1 and a reputation in [0, 1]")
        if self.max_callers < 1 or not self.deterrence_margin >= 0:
            raise ValueError("max_callers must be at least 1 and deterrence_margin >= 0")
        worst = self.ladder.max_punishment + self.ladder.max_level * self.ladder.probation
        if self.idle_ttl < worst:
            raise ValueError(
                f"idle_ttl must be at least the longest punishment plus probation ({worst:g} s)"
            )


def _time_left(ladder: PunishmentLadder, now: float) -> float | None:
    """Seconds of punishment left while punished (never above the longest punishment, which
    ``until - now`` can pass by a rounding error), else None."""
    if ladder.phase is not Phase.PUNISHED:
        return None
    return min(ladder.remaining(now), ladder.rules.max_punishment)


@dataclass(frozen=True, slots=True)
class Decision:
    """The policing decision for one request.

    ``status`` is 200 when admitted (forward to the app) and 429 when throttled, with
    ``retry_after`` in whole seconds for the ``Retry-After`` header. While the caller is
    punished an admitted request's ``retry_after`` is the punishment time left too (seconds,
    for ``X-GT-Reputation``'s ``retry``); otherwise None. ``reputation`` and
    ``level`` are the caller's standing after this request (``X-GT-Reputation``).
    ``fair_share`` is the equal share (the throttle's base), ``norm_share`` the demand-aware
    share the rate norm used (0 when the norm did not apply).
    """

    admitted: bool
    status: int
    retry_after: float | None
    level: int
    reputation: float
    phase: Phase = Phase.GOOD
    fair_share: float = 0.0
    norm_share: float = 0.0
    """The share the rate norm judged this request by (the water level; 0: not judged)."""
    judged_rate: float = 0.0
    """The rate the norm judged (``x'`` in the module docstring: the caller's rate here, or
    its declared even-spread demand if smaller, plus time charged)."""


@dataclass(frozen=True, slots=True)
class Standing:
    """One caller's state, for metrics and ``/debug/state``.

    ``punished_until`` is when the current punishment ends, on the clock the book is driven
    by (None unless punished; ``punished_for`` is the same as seconds left). ``admitted`` and
    ``throttled`` count the caller's recent requests let through and refused with 429
    (decayed with time constant ``recent_window``).
    """

    caller: str
    reputation: float
    level: int
    phase: Phase
    punished_for: float
    rate: float
    retry_rate: float
    punishments: int
    punished_until: float | None = None
    admitted: float = 0.0
    throttled: float = 0.0
    demand: float | None = None
    """The even-spread demand its sidecar last declared (requests/s per endpoint of the
    service, ``X-GT-Demand``); None if its last request declared none."""

    @property
    def recent_requests(self) -> float:
        return self.admitted + self.throttled


@dataclass(frozen=True, slots=True)
class GaugeDigest:
    """What the per-caller gauges need (:meth:`ReputationBook.gauge_digest`): the standings of
    the ``named`` callers (those with a metric label of their own) that are tracked, and over
    every other tracked caller (``others`` of them) the lowest reputation and highest level;
    ``punished`` counts every punished caller."""

    named: tuple[Standing, ...]
    others: int
    others_worst_reputation: float
    others_worst_level: int
    punished: int


@dataclass(frozen=True, slots=True)
class BookSnapshot:
    """The book at one instant (:meth:`ReputationBook.snapshot`).

    ``callers`` are the busiest ``top`` callers by recent requests, busiest first, plus the
    anonymous bucket if it is tracked; ``tracked`` counts every caller the book keeps.
    """

    callers: tuple[Standing, ...]
    tracked: int
    punished: int
    congested: bool
    congestion: float
    capacity: float
    active_callers: int


def water_level(capacity: float, demands: Collection[float]) -> float:
    """The water level of the max-min fair allocation of ``capacity`` among ``demands``.

    Progressive filling: serve the demands from the smallest up; each is served in full while
    it is at most an equal split of what is left among the callers not yet served, and the
    first that is not sets the level (that equal split). If every demand fits, the level is
    the largest demand plus what is left over (what the heaviest caller could have). Never
    below ``capacity / len(demands)``; ``capacity`` itself for no demands.
    """
    count = len(demands)
    if count == 0:
        return capacity
    remaining, largest = capacity, 0.0
    for served, demand in enumerate(sorted(demands)):
        equal = remaining / (count - served)
        if demand > equal:
            return equal
        remaining -= demand
        largest = demand
    return largest + remaining


class DecayingRate:
    """An exponentially decayed event rate: events in the last ~tau seconds, per second."""

    __slots__ = ("_count", "_last", "_tau")

    def __init__(self, tau: float, now: float) -> None:
        self._tau, self._count, self._last = tau, 0.0, now

    def add(self, now: float, weight: float = 1.0) -> None:
        self._decay(now)
        self._count += weight

    def count(self, now: float) -> float:
        """The decayed count at ``now`` (reads only)."""
        if now > self._last:
            return self._count * math.exp(-(now - self._last) / self._tau)
        return self._count

    def rate(self, now: float) -> float:
        return self.count(now) / self._tau

    def part(self) -> tuple[float, float]:
        """``(count, at)``: the count held and when it was last brought up to date."""
        return self._count, self._last

    def _decay(self, now: float) -> None:
        if now > self._last:
            self._count, self._last = self.count(now), now


class _CallerState:
    __slots__ = (
        "admitted",
        "bucket_epoch",
        "charged",
        "demand",
        "ladder",
        "last_seen",
        "rate",
        "reputation",
        "retries",
        "throttled",
        "tokens",
        "tokens_at",
    )

    def __init__(self, params: PolicingParams, reputation: float, now: float) -> None:
        self.rate = DecayingRate(params.rate_tau, now)
        self.retries = DecayingRate(params.rate_tau, now)
        self.admitted = DecayingRate(params.recent_window, now)
        self.throttled = DecayingRate(params.recent_window, now)
        self.charged = DecayingRate(params.rate_tau, now)  # the part of ``rate`` for time held
        self.demand: float | None = None  # declared even-spread demand (wire.demand)
        self.reputation = reputation
        self.ladder = PunishmentLadder(params.ladder)
        self.last_seen = now
        self.tokens = 0.0
        self.tokens_at = now
        self.bucket_epoch = 0

    def judged_rate(self, now: float) -> float:
        """``x'``: the rate the norm judges (module docstring, **Demand**)."""
        rate = self.rate.rate(now)
        if self.demand is None:
            return rate
        held = self.charged.rate(now)
        return min(rate - held, self.demand) + held


class ReputationBook:
    """Per-caller reputation and punishment for one app (see the module docstring).

    Per request call exactly one of :meth:`admit` (police) or :meth:`observe` (only record);
    call :meth:`update_load` whenever the congestion level or capacity estimate changes
    (e.g. after each response, from :class:`mesh.concurrency.AdaptiveConcurrencyLimit`).
    """

    def __init__(self, params: PolicingParams | None = None) -> None:
        self.params = params or PolicingParams()
        self._callers: OrderedDict[str, _CallerState] = OrderedDict()  # least recent first
        self._active: OrderedDict[str, float] = OrderedDict()  # seen within active_window
        self._capacity = self.params.capacity
        self._congestion = 0.0
        self._index = StandingsIndex(self.params.ladder.max_level)
        self._changed: set[str] = set()  # recorded or dropped since the index was read
        self._level_at = -math.inf  # when the norm's water level was last computed
        self._level = self._capacity

    # --- inputs ---------------------------------------------------------------------------

    def update_load(self, now: float, congestion: float, capacity: float | None = None) -> None:
        """The app's congestion level in [0, 1] and, if known, its capacity in requests/s.

        Non-finite values are ignored (the last good value stays). ``now`` is taken for
        symmetry with the other inputs; the level applies from the next request on.
        """
        if math.isfinite(congestion):
            self._congestion = min(1.0, max(0.0, congestion))
        if capacity is not None and math.isfinite(capacity) and capacity > 0:
            self._capacity = capacity

    def observe(self, caller: str, now: float, is_retry: bool = False,
                demand: float | None = None) -> Decision:
        """Record one request and update the caller's standing; never refuses."""
        state, share, norm, judged = self._record(caller, now, is_retry, demand=demand)
        state.admitted.add(now)
        ladder = state.ladder
        return Decision(True, 200, _time_left(ladder, now), ladder.level, state.reputation,
                        ladder.phase, share, norm, judged)

    def admit(self, caller: str, now: float, is_retry: bool = False,
              demand: float | None = None) -> Decision:
        """Record one request and decide whether it may reach the app (429 if throttled).

        ``demand``: the caller's declared even-spread demand in requests/s per endpoint
        (:class:`wire.demand.Demand`, verified), or None; module docstring, **Demand**.
        """
        state, share, norm, judged = self._record(caller, now, is_retry, demand=demand)
        ladder = state.ladder
        if ladder.phase is not Phase.PUNISHED:
            state.admitted.add(now)
            return Decision(True, 200, None, ladder.level, state.reputation, ladder.phase, share,
                            norm, judged)
        rate = ladder.rules.fraction(ladder.level) * share
        burst = max(1.0, rate * self.params.throttle_burst)
        if state.bucket_epoch != ladder.punishments:  # a new punishment starts a full bucket
            state.bucket_epoch, state.tokens, state.tokens_at = ladder.punishments, burst, now
        elif now > state.tokens_at:
            state.tokens = min(burst, state.tokens + (now - state.tokens_at) * rate)
            state.tokens_at = now
        if state.tokens >= 1.0:  # let through, but the caller is told how long it stays punished
            state.tokens -= 1.0
            state.admitted.add(now)
            return Decision(True, 200, _time_left(ladder, now), ladder.level, state.reputation,
                            ladder.phase, share, norm, judged)
        state.throttled.add(now)
        retry_after = float(max(1, math.ceil(_time_left(ladder, now) or 0.0)))
        return Decision(False, 429, retry_after, ladder.level, state.reputation, ladder.phase,
                        share, norm, judged)

    def charge(self, caller: str, now: float, weight: float) -> Decision:
        """Record ``weight`` request-equivalents of app time that one request held beyond an
        ordinary request's (a streaming call holding its slot while its client still sends):
        they count in the caller's request rate, and so against its fair share, as that many
        requests would; never refuses."""
        state, share, norm, judged = self._record(caller, now, False, weight=max(0.0, weight),
                                                  charged=True)
        ladder = state.ladder
        return Decision(True, 200, _time_left(ladder, now), ladder.level, state.reputation,
                        ladder.phase, share, norm, judged)

    def defect(self, caller: str, now: float) -> Decision:
        """Record a defection that is not a request (a stalled or abandoned upload): the
        verdict at ``now`` is 0, the request rate is unchanged (the request was counted when it
        was policed). Returns the caller's standing after it (``admitted`` is False)."""
        state, share, norm, judged = self._record(caller, now, False, defected=True)
        ladder = state.ladder
        return Decision(False, 408, _time_left(ladder, now), ladder.level, state.reputation,
                        ladder.phase, share, norm, judged)

    # --- observers ------------------------------------------------------------------------

    @property
    def congested(self) -> bool:
        return self._congestion >= self.params.congestion_threshold

    @property
    def capacity(self) -> float:
        return self._capacity

    def active_callers(self, now: float) -> int:
        self._expire_active(now)
        return max(1, len(self._active))  # O(1): every caller left was seen within the window

    def _active_count(self, now: float) -> int:
        """What :meth:`active_callers` returns, without expiring anyone (reads only)."""
        horizon = now - self.params.active_window
        return max(1, sum(seen >= horizon for seen in self._active.values()))

    def detection_lag(self) -> float:
        """Seconds a flood goes unpunished, at most: ``rate_tau`` for the rate estimate to
        pass the norm (exact for floods of 2.4 x the threshold or more) plus
        ``reputation_tau * ln(1 / trigger_threshold)`` for the reputation to fall from 1."""
        p = self.params
        return p.rate_tau + p.reputation_tau * math.log(1.0 / p.ladder.trigger_threshold)

    def deterrent_duration(self, rate: float, share: float) -> float:
        """The shortest punishment that takes away more than a flood at ``rate`` gained.

        While undetected a flood gains at most ``g = min(rate - share, capacity - share)``
        requests/s over its fair share, for ``detection_lag()`` seconds; a level-1 punishment
        takes ``(1 - throttle_fraction) * share`` requests/s from a caller that then sends its
        share. The punishment deters when ``D * (1 - f) * share >= g * T_d``.
        """
        gain = min(rate - share, self._capacity - share)
        if gain <= 0 or share <= 0:
            return 0.0
        loss_rate = (1.0 - self.params.ladder.fraction(1)) * share
        return self.params.deterrence_margin * gain * self.detection_lag() / loss_rate

    def fair_share(self, caller: str, now: float) -> float:
        """The caller's fair share of the app in requests/s."""
        share = self._capacity / self.active_callers(now)
        return share * self.params.anonymous_share if caller == ANONYMOUS else share

    def norm_share(self, caller: str, now: float) -> float:
        """The share the rate norm judges ``caller`` by: the water level of the max-min fair
        allocation of the capacity among the active callers' rates (:func:`water_level`;
        at least :meth:`fair_share`), recomputed at most every ``share_refresh`` seconds."""
        p = self.params
        if now - self._level_at >= p.share_refresh or now < self._level_at:
            self._expire_active(now)
            rates = [state.judged_rate(now) for name in self._active
                     if (state := self._callers.get(name)) is not None]
            # congested although the callers ask for no more than the capacity: the capacity
            # is not what the app can do now (CPU starvation, a slow dependency), and the
            # demands say nothing about who crowds it out: the equal split
            overloaded = math.fsum(rates) > self._capacity
            self._level = water_level(self._capacity, rates) if overloaded else 0.0
            self._level_at = now
        level = max(self._level, self._capacity / self.active_callers(now))
        return level * p.anonymous_share if caller == ANONYMOUS else level

    def standing(self, caller: str, now: float) -> Standing | None:
        """The caller's current standing without recording a request (None if untracked)."""
        state = self._callers.get(caller)
        if state is None:
            return None
        ladder = state.ladder
        punished = ladder.phase is Phase.PUNISHED
        return Standing(caller, state.reputation, ladder.level, ladder.phase,
                        ladder.remaining(now), state.rate.rate(now), state.retries.rate(now),
                        ladder.punishments, ladder.until if punished else None,
                        state.admitted.count(now), state.throttled.count(now), state.demand)

    def standings(self, now: float) -> list[Standing]:
        """Every tracked caller's standing (bounded by ``max_callers``; O(tracked): for tests
        and tools; the periodic readers use :meth:`gauge_digest` and :meth:`snapshot`)."""
        return [s for c in list(self._callers) if (s := self.standing(c, now)) is not None]

    def _fold(self) -> StandingsIndex:
        """Bring the index up to date with the callers changed since the last read."""
        index, tau = self._index, self.params.recent_window
        for caller in self._changed:
            state = self._callers.get(caller)
            if state is None:
                index.remove(caller)
                continue
            ladder = state.ladder
            index.update(caller, state.reputation, ladder.level, ladder.phase is Phase.PUNISHED,
                         busy_key((state.admitted.part(), state.throttled.part()), tau))
        self._changed.clear()
        return index

    def gauge_digest(self, now: float, named: Collection[str]) -> GaugeDigest:
        """The per-caller gauges' inputs (:class:`GaugeDigest`), in O(changed callers +
        ``len(named)``). Reads only: no caller's standing changes."""
        index = self._fold()
        shown = tuple(s for c in named if (s := self.standing(c, now)) is not None)
        skip = {s.caller for s in shown}
        worst = index.worst_reputation(skip)
        return GaugeDigest(
            named=shown, others=len(self._callers) - len(skip),
            others_worst_reputation=1.0 if worst is None else worst,
            others_worst_level=index.worst_level(skip), punished=index.punished)

    def snapshot(self, now: float, top: int) -> BookSnapshot:
        """The ``top`` busiest callers by recent requests (busiest first; ties by name) and
        the anonymous bucket, with the book's load view, in O(changed callers + ``top``).
        Reads only: no caller's standing changes.
        """
        if top < 0:
            raise ValueError("top must be >= 0")
        index = self._fold()
        busiest = [s for c in index.busiest(top) if (s := self.standing(c, now)) is not None]
        if all(s.caller != ANONYMOUS for s in busiest):
            anonymous = self.standing(ANONYMOUS, now)
            busiest += [anonymous] if anonymous is not None else []
        return BookSnapshot(
            callers=tuple(busiest),
            tracked=len(self._callers),
            punished=index.punished,
            congested=self.congested,
            congestion=self._congestion,
            capacity=self._capacity,
            active_callers=self._active_count(now),
        )

    def __len__(self) -> int:
        return len(self._callers)

    # --- internals ------------------------------------------------------------------------

    def _record(
        self, caller: str, now: float, is_retry: bool, *, defected: bool = False,
        weight: float = 1.0, charged: bool = False, demand: float | None = None,
    ) -> tuple[_CallerState, float, float, float]:
        p = self.params
        self._evict_idle(now)
        state = self._callers.get(caller)
        if state is None:
            initial = p.anonymous_initial_reputation if caller == ANONYMOUS else 1.0
            state = _CallerState(p, initial, now)
            self._callers[caller] = state
            while len(self._callers) > p.max_callers:
                evicted, _ = self._callers.popitem(last=False)
                self._active.pop(evicted, None)
                self._changed.add(evicted)
        else:
            self._callers.move_to_end(caller)
        self._changed.add(caller)
        if len(self._changed) > 2 * p.max_callers + 1024:  # nobody reads: fold, stay bounded
            self._fold()
        self._active[caller] = now
        self._active.move_to_end(caller)
        share = self.fair_share(caller, now)

        if charged:
            state.rate.add(now, weight)
            state.charged.add(now, weight)
        elif not defected:  # a request: its declaration (or the lack of one) is the latest word
            state.rate.add(now, weight)
            state.demand = demand if demand is not None and math.isfinite(demand) and \
                demand >= 0 else None
        if is_retry:
            state.retries.add(now)
        rate, retry_rate = state.rate.rate(now), state.retries.rate(now)
        judged = state.judged_rate(now)
        # the rate norm shares the app among callers: a verified caller alone has nobody to
        # crowd out (its excess is the limiter's to shed, not a defection to punish); the
        # anonymous bucket stands for any number of unknown callers and keeps its norm
        norm_applies = (self.congested or state.ladder.phase is Phase.PUNISHED) and (
            caller == ANONYMOUS or self.active_callers(now) > 1)
        norm = self.norm_share(caller, now) if norm_applies else 0.0
        over_share = norm_applies and judged > max(p.rate_floor, p.rate_tolerance * norm)
        over_retry_budget = retry_rate > p.retry_ratio * (rate - retry_rate) + p.retry_floor
        verdict = 0.0 if (defected or over_share or over_retry_budget) else 1.0
        dt = max(0.0, now - state.last_seen)
        state.reputation = verdict + (state.reputation - verdict) * math.exp(
            -dt / p.reputation_tau)
        state.last_seen = now
        state.ladder.step(now, state.reputation, self.deterrent_duration(rate, share))
        return state, share, norm, judged

    def _expire_active(self, now: float) -> None:
        horizon = now - self.params.active_window
        while self._active:
            caller, seen = next(iter(self._active.items()))
            if seen >= horizon:
                break
            del self._active[caller]

    def _evict_idle(self, now: float) -> None:
        horizon = now - self.params.idle_ttl
        while self._callers:
            caller, state = next(iter(self._callers.items()))
            if state.last_seen >= horizon:
                break
            del self._callers[caller]
            self._active.pop(caller, None)
            self._changed.add(caller)
