"""Routing policies behind one interface (:class:`mesh.policy.Policy`).

The baselines are the strategies Equilibrium is measured against (docs/routing.md §6):

- ``round-robin`` and ``random``;
- ``p2c-least-request`` — Envoy's default LEAST_REQUEST: two distinct endpoints at random, the
  one with fewer active requests wins (Mitzenmacher, "The power of two choices", 2001);
- ``peak-ewma`` — Linkerd2-proxy's balancer: power of two choices on peak-EWMA RTT x
  (pending + 1), default RTT 30 ms, decay 10 s; an endpoint never measured starts at the
  default RTT and decays from the instant :meth:`set_endpoints` adds it, as in tower.

``equilibrium`` is :class:`RegretMatchingPolicy`: Hart & Mas-Colell regret matching over the
endpoints (:mod:`mesh.regret`), shaped by the thundering-herd guard (:mod:`mesh.herd`), with
consecutive-failure ejection, stability checks (:mod:`mesh.nash`) and, when a fresh signed
recommendation from the signaler is handed in, following it inside the same guard.

Every policy keeps its measurements in :class:`mesh.estimators.EndpointStats`; the request path
(:meth:`pick`) reads a snapshot rebuilt by :meth:`tick` off the request path.
"""

from __future__ import annotations

import bisect
import math
import random
import statistics
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from itertools import accumulate
from typing import ClassVar

import numpy as np

from mesh.estimators import (
    LONG_AFTER,
    LONG_HOLD,
    LONG_MARGIN,
    LONG_MIN_ANSWERS,
    LONG_MIN_SHARE,
    LONG_RATIO,
    LONG_RECENT,
    LONG_YOUNG_COUNT,
    MAX_LATENCY,
    STALL_EJECTION,
    EndpointStats,
    EpochWindow,
    EpochWindows,
)
from mesh.hedging import HedgePlan, RecentLatencies, plan_hedges
from mesh.nash import StabilityMonitor, wardrop_gap
from mesh.pacing import EXACT_PACING_ENDPOINTS, CreditPacer, SampledPacer
from mesh.policy import EndpointView, Outcome, PolicySnapshot
from mesh.probes import ProbeReport
from mesh.profiles import StrategyProfile
from mesh.regret import RoutingRegret


class _MeasuredPolicy(ABC):
    """Shared bookkeeping: endpoint stats, observed shares, snapshots."""

    name: ClassVar[str] = "base"

    def __init__(self, profile: StrategyProfile) -> None:
        self.profile = profile
        self.endpoints: list[str] = []
        self._members: frozenset[str] = frozenset()  # the endpoints, for membership tests
        self.stats: dict[str, EndpointStats] = {}
        self._weights = np.zeros(0)
        self._cumulative: list[float] = []
        self._last_tick: float | None = None
        self._monitor = StabilityMonitor(window=profile.stability_window)
        self._gap = 0.0
        self._regret_view = np.zeros(0)
        self._tick_estimates = np.zeros(0)  # the last tick's latency estimates
        # recommended endpoints this sidecar's own evidence held back at the last tick
        # (RegretMatchingPolicy._checked; for /debug/state)
        self.overruled: list[str] = []
        # endpoints judged bad by their own outcomes at the last tick, kept from the herd
        # guard's leftover (RegretMatchingPolicy._good; for /debug/state)
        self.bad: set[str] = set()
        # the last conditional regret matrix (an array no one writes to; listed by snapshot())
        self._regret_matrix: np.ndarray = np.zeros((0, 0))
        # the last matrix snapshot() showed, and it as tuples (the same object: the same
        # tuples; an idle upstream of 1,000 endpoints spent 40 ms a tick making them again)
        self._regret_shown: tuple[np.ndarray, tuple[tuple[float, ...], ...]] | None = None
        self._usable: int | None = None  # set by policies that eject (None: all usable)
        self._usable_mask: list[bool] = []  # which were usable at the last tick (likewise)

    # -- endpoint set -------------------------------------------------------------------
    def set_endpoints(self, endpoints: Sequence[str], now: float) -> None:
        new = list(dict.fromkeys(endpoints))
        old_index = {e: i for i, e in enumerate(self.endpoints)}
        for e in new:
            if e not in self.stats:
                self.stats[e] = EndpointStats.new(
                    e,
                    now=now,
                    tau=self.profile.estimator_tau,
                    decay=self.profile.peak_ewma_decay,
                    failure_penalty=self.profile.failure_penalty,
                    default_rtt=self.profile.default_rtt,
                    request_timeout=self.profile.request_timeout,
                )
        for e in list(self.stats):
            if e not in new and self.stats[e].in_flight == 0:
                del self.stats[e]
        keep = [old_index.get(e) for e in new]
        self._on_resize(keep, new)
        self.endpoints = new
        self._members = frozenset(new)
        self._publish(self._initial_weights(keep))

    def _on_resize(self, keep: list[int | None], new: list[str]) -> None:
        self._monitor.reset()

    def _initial_weights(self, keep: list[int | None]) -> np.ndarray:
        k = len(keep)
        if k == 0:
            return np.zeros(0)
        old = self._weights
        w = np.array([old[i] if i is not None and i < old.shape[0] else 0.0 for i in keep])
        total = float(w.sum())
        if total <= 0:
            return np.full(k, 1.0 / k)
        return w / total

    def _publish(self, weights: np.ndarray) -> None:
        """Swap in a new routing snapshot (weights and their cumulative sums) whole."""
        self._weights = weights
        self._cumulative = list(accumulate(weights.tolist()))

    # -- request path ---------------------------------------------------------------------
    def on_start(self, endpoint: str, now: float, long: bool = False) -> None:
        stats = self.stats.get(endpoint)
        if stats is not None:
            stats.start(now, long)

    def on_outcome(self, outcome: Outcome) -> None:
        stats = self.stats.get(outcome.endpoint)
        if stats is None:
            return
        if outcome.long:
            sent = outcome.now - outcome.latency if outcome.sent_at is None else outcome.sent_at
            stats.finish_declared(outcome.ok, outcome.now, outcome.void or outcome.censored,
                                  sent, outcome.shed)
            return
        stats.finish(outcome.latency, outcome.ok, outcome.now, outcome.congestion,
                     outcome.censored, outcome.void, outcome.sent_at, outcome.got_answer,
                     outcome.shed)
        if outcome.endpoint not in self._members and stats.in_flight == 0:
            del self.stats[outcome.endpoint]  # removed while in flight: forget it now

    def on_answer(self, endpoint: str, now: float) -> None:
        stats = self.stats.get(endpoint)
        if stats is not None:
            stats.answered(now)

    def missed_deadline(self, endpoint: str, now: float) -> bool:
        """A call to ``endpoint`` ran out its caller's deadline at ``now``: whether another
        endpoint missed one in the last :data:`DEADLINE_SHARED` seconds too. Then the miss is
        a shed failure (charged: the pod is learned the slower for it; no failure in a row):
        a deadline every pod misses is the caller's, and counted it ejected them all, over
        and over (a helper's finding: 52 ejections in 6 s). One pod missing alone is failing
        (hung, under deadlines too short for a stall to show) and is ejected as before."""
        shared = any(now - s.deadline_missed_at <= DEADLINE_SHARED
                     for e, s in self.stats.items() if e != endpoint)
        stats = self.stats.get(endpoint)
        if stats is not None:
            stats.deadline_missed_at = max(stats.deadline_missed_at, now)
        return shared

    def on_probe(self, endpoint: str, report: ProbeReport, now: float) -> None:
        """A verified probe answer about ``endpoint`` (:meth:`EndpointStats.observe_probe`);
        the baselines keep it only for observers, ``equilibrium`` learns from it."""
        stats = self.stats.get(endpoint)
        if stats is not None:
            stats.observe_probe(report, now)

    def _candidates(self, exclude: frozenset[str]) -> list[str]:
        return [e for e in self.endpoints if e not in exclude]

    @abstractmethod
    def pick(self, rng: random.Random, now: float,
             exclude: frozenset[str] = frozenset()) -> str | None:
        """Each concrete policy defines how it chooses."""

    # -- off the request path -------------------------------------------------------------
    def _estimates(self) -> np.ndarray:
        """Each endpoint's :meth:`EndpointStats.latency_estimate`; one never measured gets
        the median of the others' latencies (the default RTT if none was), which is only
        computed when some endpoint needs it."""
        stats = [self.stats[e] for e in self.endpoints]
        known = [v for s in stats if (v := s.latency.value) is not None]
        if len(known) == len(stats):
            return np.array([s.latency_estimate(0.0) for s in stats])
        fallback = statistics.median(known) if known else self.profile.default_rtt
        return np.array([s.latency_estimate(fallback) for s in stats])

    def tick(self, now: float) -> None:
        dt = 0.0 if self._last_tick is None else max(0.0, now - self._last_tick)
        self._last_tick = now
        stats = self.stats
        taken = [stats[e].take_tick(now) for e in self.endpoints]
        counts = np.array([n for n, _ in taken], dtype=float)
        means = np.array([m for _, m in taken], dtype=float)
        estimates = self._estimates()
        if estimates.size:  # a hung endpoint: what its stall cost so far (censor_stall)
            stalled = np.array([stats[e].stall_counted for e in self.endpoints])
            estimates = np.maximum(estimates, stalled)
        self._tick_estimates = estimates
        weights = self._next_weights(counts, means, estimates, dt, now)
        self._publish(weights)
        if estimates.size:
            used = self._used(weights)
            self._gap = wardrop_gap(np.where(used, weights, 0.0), np.where(used, estimates, np.inf))
            best = float(estimates[used].min()) if used.any() else float(estimates.min())
            self._monitor.record(weights, self._gap / max(best, 1e-3), now)

    def _used(self, weights: np.ndarray) -> np.ndarray:
        """Endpoints that carry traffic by choice (all of them, for the baselines)."""
        return weights > 0

    def _next_weights(self, counts: np.ndarray, means: np.ndarray, estimates: np.ndarray,
                      dt: float, now: float) -> np.ndarray:
        """Baselines: the weights shown are the observed shares, smoothed."""
        total = float(counts.sum())
        if total <= 0 or self._weights.shape != counts.shape:
            return self._weights if self._weights.shape == counts.shape else counts
        smoothed: np.ndarray = 0.5 * self._weights + 0.5 * counts / total
        return smoothed

    @property
    def following(self) -> bool:
        return False

    def snapshot(self) -> PolicySnapshot:
        estimates = self._estimates() if self.endpoints else np.zeros(0)
        regret = self._regret_view if self._regret_view.shape[0] == len(self.endpoints) \
            else np.zeros(len(self.endpoints))
        views = [
            EndpointView(
                endpoint=e,
                weight=float(self._weights[i]) if i < self._weights.shape[0] else 0.0,
                latency_estimate=float(estimates[i]),
                regret=float(regret[i]),
                in_flight=self.stats[e].in_flight,
                requests=self.stats[e].requests,
                failures=self.stats[e].failures,
                overruled=e in self.overruled,
                bad=e in self.bad,
                usable=self._usable_mask[i] if i < len(self._usable_mask) else True,
                stalled=self.stats[e].stall_counted,
                long_in_flight=self.stats[e].long_in_flight,
                ejected=(self.stats[e].failure_ejections_total,
                         self.stats[e].hang_ejections_total),
            )
            for i, e in enumerate(self.endpoints)
        ]
        return PolicySnapshot(
            policy=self.name,
            weights={v.endpoint: v.weight for v in views},
            endpoints=tuple(views),
            nash_gap=self._gap,
            flapping=self._monitor.flapping,
            converged=self._monitor.converged,
            following=self.following,
            regret_matrix=self._regret_tuples(),
            usable=self._usable,
        )


    def _regret_tuples(self) -> tuple[tuple[float, ...], ...]:
        """The regret matrix as tuples, made again only when it was replaced (it is never
        written in place: ``RegretMatcher.update``)."""
        matrix, shown = self._regret_matrix, self._regret_shown
        if shown is None or shown[0] is not matrix:
            shown = self._regret_shown = (matrix, tuple(map(tuple, matrix.tolist())))
        return shown[1]


class RoundRobin(_MeasuredPolicy):
    name: ClassVar[str] = "round-robin"

    def __init__(self, profile: StrategyProfile) -> None:
        super().__init__(profile)
        self._next = 0

    def pick(self, rng: random.Random, now: float,
             exclude: frozenset[str] = frozenset()) -> str | None:
        n = len(self.endpoints)
        for _ in range(n):
            e = self.endpoints[self._next % n]
            self._next = (self._next + 1) % n
            if e not in exclude:
                return e
        return None


class RandomChoice(_MeasuredPolicy):
    name: ClassVar[str] = "random"

    def pick(self, rng: random.Random, now: float,
             exclude: frozenset[str] = frozenset()) -> str | None:
        candidates = self._candidates(exclude)
        return rng.choice(candidates) if candidates else None


class _PowerOfTwoChoices(_MeasuredPolicy):
    """Pick two distinct endpoints uniformly at random; the lower :meth:`load` wins."""

    @abstractmethod
    def load(self, stats: EndpointStats, now: float) -> float:
        """Subclasses say how load is measured (tower's ``Load``)."""

    def pick(self, rng: random.Random, now: float,
             exclude: frozenset[str] = frozenset()) -> str | None:
        candidates = self._candidates(exclude)
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        a, b = rng.sample(candidates, 2)
        la, lb = self.load(self.stats[a], now), self.load(self.stats[b], now)
        if la == lb:
            return a if rng.random() < 0.5 else b
        return a if la < lb else b


class P2CLeastRequest(_PowerOfTwoChoices):
    name: ClassVar[str] = "p2c-least-request"

    def load(self, stats: EndpointStats, now: float) -> float:
        return float(stats.in_flight)


class P2CPeakEwma(_PowerOfTwoChoices):
    name: ClassVar[str] = "peak-ewma"

    def load(self, stats: EndpointStats, now: float) -> float:
        return stats.peak.cost(now, stats.in_flight)


class RegretMatchingPolicy(_MeasuredPolicy):
    """Equilibrium's policy: regret matching + anti-herd shaping + ejection + following."""

    name: ClassVar[str] = "equilibrium"

    def __init__(self, profile: StrategyProfile) -> None:
        super().__init__(profile)
        self.regret = RoutingRegret(0, profile.regret_memory)
        self._recommendation: tuple[dict[str, float], float] | None = None
        self._following = False
        self._hold_until = -math.inf
        # Share-preserving pacing inside the weights by expected finish time (see pick()).
        # (CreditPacer over every endpoint; SampledPacer past EXACT_PACING_ENDPOINTS of them)
        self._pacer: CreditPacer | SampledPacer | None = (
            CreditPacer(window=profile.pacing_window) if profile.pacing_window > 0 else None)
        self._index: dict[str, int] = {}
        self._first_long: float | None = None  # the first answer of LONG_AFTER (on_outcome)
        self._answered_sent = -math.inf  # the latest sending of a request answered (_long)
        self._standing: float | None = None  # the median standing latency at the last tick
        self._epoch = EpochWindows()  # what the signaling plane is told each epoch
        self._paced: list[bool] = []  # endpoints above their exploration floor (_paced_pick)
        self._shedding = False  # a weight is above the cap, which gave way for bad pods
        # hedged exploration (mesh.hedging): recent latencies, and the plans rebuilt per tick
        self._recent = RecentLatencies()
        self._hedges: dict[str, HedgePlan] = {}
        # an endpoint whose ejection ended, to be sent the next request (see tick())
        self._probation: str | None = None
        self._looked_past = -math.inf  # when a stalling pick last looked past it
        self._covered: list[bool] = []  # which endpoints probes covered at the last tick
        self._probation_sent: str | None = None  # the last pick's probation endpoint
        self._tick_picks = 0  # requests started since the last tick
        self._pick_rate = 0.0  # requests a second between the last two ticks

    def on_start(self, endpoint: str, now: float, long: bool = False) -> None:
        stats = self.stats.get(endpoint)
        if stats is None:
            return
        stats.start(now, long)
        self._tick_picks += 1
        probation, self._probation_sent = self._probation_sent, None
        if long:
            if probation == endpoint:  # the probation request is a declared one: while it
                stats.long_probation_sent = now  # is out, no other (_probation_due)
            return  # nothing the pacer's cost counts changed
        self._reorder(endpoint, stats, now)

    def on_outcome(self, outcome: Outcome) -> None:
        stats = self.stats.get(outcome.endpoint)
        heard = outcome.got_answer and not outcome.censored  # a whole answer came
        answered = outcome.ok and heard and not outcome.void and not outcome.long
        if answered and self._first_long is None and outcome.latency >= LONG_AFTER:
            self._first_long = outcome.now
        if stats is not None and answered and self._long(stats, outcome):
            now = outcome.now
            stats.finish_long(outcome.latency, now)
            # the hedges' p90 keeps it: a hedge after a quick p90 would send long polls twice
            self._recent.add(outcome.endpoint, now, outcome.latency)
            if not self._matched(outcome.endpoint, now):
                assert self._first_long is not None
                if now - self._first_long < LONG_HOLD:  # the other pods' may be on their way
                    stats.hold_long(outcome.latency, now)
                else:
                    self._epoch.observe(outcome.endpoint, outcome.latency, True, True)
                    stats.learn(min(outcome.latency, MAX_LATENCY), now)
            if outcome.endpoint not in self._members and stats.in_flight == 0:
                del self.stats[outcome.endpoint]
            return
        failing = stats is not None and stats.consecutive_failures > 0
        if outcome.long and stats is not None and not (outcome.void or outcome.censored):
            # a request, no latency: its failures count in the summary's share, and so must
            # the answers (the signaler charges the penalty by failures / requests)
            self._epoch.observe(outcome.endpoint, 0.0, outcome.ok, False)
        elif stats is not None and not outcome.void and not outcome.long:
            self._epoch.observe(outcome.endpoint, outcome.latency, outcome.ok, heard)
            if outcome.ok and heard:
                self._recent.add(outcome.endpoint, outcome.now, outcome.latency)
        super().on_outcome(outcome)
        if stats is not None:
            self._reorder(outcome.endpoint, stats, outcome.now)
            pacer = self._pacer
            if isinstance(pacer, SampledPacer) and (stats.consecutive_failures > 0) != failing:
                self._sampled_strategy(pacer)  # the pacer's share of it moves

    def _long(self, stats: EndpointStats, outcome: Outcome) -> bool:
        """Whether an answer is long (:meth:`EndpointStats.long_answer`, against the
        upstream's median standing latency as of the last tick, and overtaken if the upstream
        answered a request sent after it first): a long poll or a watch, by the request's
        nature, when the other endpoints give such answers at a like rate (:meth:`_matched`;
        in the first ``LONG_HOLD`` s after the first answer that took ``LONG_AFTER``, one
        not matched yet is held that long, the time the others' take to come back after a
        start). Otherwise it is learned: a pod that alone answers requests seconds late is
        slow (docs/routing.md, "Long polls"). A long answer teaches the latency estimates,
        the regret and the epoch's summary nothing (the hedges' p90 takes it), nor does it
        re-admit an ejected pod: taken as its first answer, a long poll's length was the
        fresh estimate that starved a healthy pod for good."""
        latency, now = outcome.latency, outcome.now
        sent = outcome.sent_at if outcome.sent_at is not None else now - latency
        overtaken = self._answered_sent > sent
        if sent > self._answered_sent:
            self._answered_sent = sent
        return stats.long_answer(latency, now, self._standing, overtaken, sent)

    def _matched(self, endpoint: str, now: float) -> bool:
        """Whether the other endpoints give long answers at a like rate: the least
        :meth:`EndpointStats.long_share` among those with ``LONG_MIN_ANSWERS`` answers at
        least ``LONG_MIN_SHARE`` (long polls, not a rare slow answer; the least, so that two
        pods slow alike do not vouch for each other), and ``endpoint``'s within
        ``LONG_RATIO`` x that plus ``LONG_MARGIN`` (a pod slow at a share of its requests
        gives more). In the first ``LONG_RECENT`` s after the first answer that took
        ``LONG_AFTER``, or with no other endpoint answering enough to count: more than half
        of the others (of those answering enough, if any) gave a long answer in that time,
        ``LONG_YOUNG_COUNT`` in all at least.
        True for the only endpoint: where it goes does not matter."""
        rest = [self.stats[e] for e in self.endpoints if e != endpoint]
        if not rest:
            return True
        counted = [s.long_share(now) for s in rest if s.answer_count >= LONG_MIN_ANSWERS]
        if not counted or (self._first_long is not None
                           and now - self._first_long < LONG_RECENT):
            # young (the others' first polls may still be out, and their shares count only
            # what came back), or no other with answers enough: a few long answers elsewhere
            # (a rare slow answer is not a service of long polls) will do
            since = now - LONG_RECENT
            pool = [s for s in rest if s.answer_count >= LONG_MIN_ANSWERS] or rest
            giving = [s for s in pool if s.long_at >= since]
            return 2 * len(giving) > len(pool) and \
                sum(s.long_count for s in giving) >= LONG_YOUNG_COUNT
        usual = min(counted)
        return usual >= LONG_MIN_SHARE and \
            self.stats[endpoint].long_share(now) <= LONG_RATIO * usual + LONG_MARGIN

    def on_probe(self, endpoint: str, report: ProbeReport, now: float) -> None:
        super().on_probe(endpoint, report, now)
        if (stats := self.stats.get(endpoint)) is not None:
            self._reorder(endpoint, stats, now)

    @staticmethod
    def _cost_key(stats: EndpointStats, now: float | None) -> float:
        """The order of :meth:`EndpointStats.finish_cost` among endpoints that are not
        failing, as a key that time alone does not change: the log of the cost plus
        ``now / decay`` (every peak-EWMA decays alike). The callee's other requests are those
        of the probe answer fresh at ``now`` (None: left out); one that goes stale between two
        events is forgotten at the next tick, when every key is computed again."""
        peak = stats.peak
        ahead = stats.in_flight + (0 if now is None else stats.others_in_flight(now)) + 1
        drift = peak.updated_at / peak.decay if peak.decay > 0 else 0.0
        return math.log(max(peak.estimate, 1e-12)) + drift + math.log(ahead)

    def _current_keys(self, keys: list[float], now: float) -> list[float]:
        """Every endpoint's :meth:`_cost_key` at ``now``, given the pacer's ``keys``. Only a
        probe answer makes a key change with time (its count of the callee's other requests
        goes stale); every other key was kept current by :meth:`_reorder` as requests started
        and ended, so it is taken as it stands, not computed again."""
        stats, endpoints = self.stats, self.endpoints
        if len(keys) != len(endpoints):
            return [self._cost_key(stats[e], now) for e in endpoints]
        return [keys[i] if (s := stats[e]).probe is None else self._cost_key(s, now)
                for i, e in enumerate(endpoints)]

    def _reorder(self, endpoint: str, stats: EndpointStats, now: float | None) -> None:
        """Keep ``endpoint``'s key in the sampled pacer's cost order current (its ``stats``
        just changed); nothing for the exact pacer, which reads every cost at a pick."""
        pacer = self._pacer
        if isinstance(pacer, SampledPacer) and (i := self._index.get(endpoint)) is not None:
            pacer.order.update(i, self._cost_key(stats, now))

    def hedge_plan(self, endpoint: str) -> HedgePlan | None:
        """The hedge for a request picked to ``endpoint`` when only the exploration floor
        holds it (:mod:`mesh.hedging`; rebuilt by :meth:`tick`); None otherwise."""
        return self._hedges.get(endpoint)

    def rescue_before(self, endpoint: str, now: float) -> float | None:
        """While ``endpoint`` is ejected, the time its ejection began: what was sent to it
        before then and is still unanswered (held by a hung pod, or at a pod failing in a
        row) may be sent elsewhere (:class:`mesh.hedging.Rescuer`). None otherwise, and for
        an endpoint this policy does not know."""
        stats = self.stats.get(endpoint)
        if stats is None or stats.ejected_until <= now:
            return None
        return stats.fresh_from

    def tick(self, now: float) -> None:
        last = self._last_tick  # requests a second since the last tick (_confirmation_due)
        self._pick_rate = self._tick_picks / (now - last) \
            if last is not None and now > last else 0.0
        self._tick_picks = 0
        for e in self.endpoints:  # a hung endpoint's pending requests, as what they cost so far
            stats = self.stats[e]
            stats.censor_stall(now)
            if stats.held_long:  # long answers no other pod had matched
                stats.learn_held(now, self._matched(e, now))
        standing = [v for e in self.endpoints if (v := self.stats[e].standing) is not None]
        self._standing = statistics.median(standing) if standing else None
        super().tick(now)
        self._count_quick_runs(now)
        self._probation = self._probation_due(now)
        if isinstance(self._pacer, SampledPacer):  # a probe's count goes stale with time
            order = self._pacer.order
            order.reset(self._current_keys(order.keys, now))
        n = len(self.endpoints)
        self._recent.forget(self.endpoints)
        if n < 2:
            self._hedges = {}
            return
        self._hedges = plan_hedges(
            self.endpoints, self._weights.tolist(),
            self.profile.herd.floor(n),
            self._covered,  # the tick's own, as the estimates: nothing changed them since
            self._tick_estimates.tolist(),
            lambda i: self._recent.p90(self.endpoints[i], now),
        )

    def _probation_due(self, now: float) -> str | None:
        """An endpoint whose ejection has ended and that has not answered since (nothing sent
        there since its last outcome or the ejection's start, which leaves out the requests
        of the hang it still holds; no fresh probe answer speaking for it; not draining): the
        next request goes there, one per tick at most, as Linkerd's failure accrual sends one
        request when its backoff ends. Otherwise only the exploration floor would find out
        whether it healed: at a low rate, seconds of waiting for a floor request (0.5 % of
        60 req/s is one every 3 s), during which the healed pod served nobody. A declared
        long request sent as the probation request re-admits nothing when it is answered
        (its answer says nothing of the pod's speed); while it is out no other goes, and
        once it ended the next request goes (a review's finding: named again at every tick,
        the pod took every declared request of an upstream of watches, for good)."""
        for e in self.endpoints:
            s = self.stats[e]
            if s.readmitting and now >= s.ejected_until and s.sent_since_outcome == 0 \
                    and s.long_probation_sent == -math.inf and not s.probe_covered(now) \
                    and not s.draining(now):
                return e
        return self._confirmation_due(now)

    def _confirmation_due(self, now: float) -> str | None:
        """With hedged exploration (``profile.hedged``), an endpoint held back (under half
        an equal share; no probe covers it) whose own outcomes in the last tick were quick
        (their mean under a :data:`CONFIRM` th of its latency estimate, and within twice the
        best used endpoint's estimate and 2 ms): the next request goes there too, one per
        tick while none is in flight there. A pod that healed is otherwise learned from the
        floor's requests alone, each pulling its estimate down a third of the way
        (``Ewma.max_step``, which keeps one lucky answer of a pod slow on half its requests
        from clearing it): a stranger measured a healed pod of three back after about 30 s
        without probes. A pod slow on part of its requests ends the run of looks with its
        first slow answer, but each run costs its slow answers: unhedged, the simulator's
        ``slow-pod`` sent the bad pod half as much again (steady 0.48 -> 0.76 %), so only
        where the proxy hedges the looks at a pod the floor holds. Above the floor they are
        not hedged (its estimate has come down by then); limited to the pods the hedge plans
        cover, the looks stopped there and the recovery bench's healed pod stayed out for
        the run again. Not for an endpoint that failed in the last :data:`EVIDENCE_FRESH` s
        (a fast error answer wins a hedge race), nor, while following the signaler, for one
        whose share this sidecar's evidence did not overrule (the plan's share is the
        plan's); none while one is in flight there (a review's findings).

        The looks alone took about a dozen quick answers to bring a healed pod's estimate
        down (each pulls it a fifth of the way at a tick apart), some 13 s after the heal
        before its ramp began: a run of quick ticks is trusted (:meth:`_count_quick_runs`).
        And the floor's requests are drawn at random, so a sidecar could send a healed pod
        nothing for many times their mean gap: with no answer of its own in the tick, a
        held-back pod sent nothing for :data:`FLOOR_DUE` times that gap gets the next
        request (with the looks' conditions, but no failure in the last
        :data:`FLOOR_DUE_CLEAN` s); a look, which a quick answer asked for, goes first."""
        held = self._held_back()
        if held is None:
            return None
        best, small = held
        look = due = None
        rate, limit = self._pick_rate, 2.0 * best + 0.002
        for e, w in zip(self.endpoints, self._weights.tolist(), strict=True):
            s = self.stats[e]
            if s.in_flight:
                continue
            if s.tick_own_mean == math.inf:
                if due is None and 0.0 < w < small and s.latency.value is not None \
                        and rate > 0.0 and now - s.last_sent > FLOOR_DUE / (w * rate) \
                        and now - s.failed_at > FLOOR_DUE_CLEAN and self._may_look(e, s, now):
                    due = e
            elif look is None and self._quick_held_back(e, s, w, limit, small, now):
                look = e
        return look or due  # (a look, which a quick answer asked for, first)

    def _quick_held_back(self, endpoint: str, s: EndpointStats, weight: float, limit: float,
                         small: float, now: float) -> bool:
        """Whether ``endpoint``, held back (its ``weight`` under ``small``), gave quick own
        outcomes in the last tick: their mean within ``limit`` (twice the best used
        endpoint's estimate and 2 ms) and under a :data:`CONFIRM` th of its estimate, no
        failure in the last :data:`EVIDENCE_FRESH` s, and a look may go there
        (:meth:`_may_look`): what asks for a look and adds to a quick run."""
        quick, v = s.tick_own_mean, s.latency.value
        return 0.0 < weight < small and v is not None and quick <= limit \
            and quick * CONFIRM <= v and now - s.failed_at > EVIDENCE_FRESH \
            and self._may_look(endpoint, s, now)

    def _held_back(self) -> tuple[float, float] | None:
        """With hedged exploration and two endpoints or more: the best used endpoint's
        estimate at the last tick and the share under which an endpoint is held back (half
        an equal share); None otherwise."""
        weights, estimates = self._weights, self._tick_estimates
        n = len(self.endpoints)
        if not self.profile.hedged or n < 2 or weights.shape[0] != n \
                or estimates.shape[0] != n:
            return None
        return float(estimates[self._used(weights)].min()), 0.5 / n

    def _may_look(self, endpoint: str, s: EndpointStats, now: float) -> bool:
        """Whether a look, a due request or a quick run may go to ``endpoint``: not
        ejected, no probe speaks for it, not draining, and while following the signaler,
        only where this sidecar's evidence overruled its share (the plan's is the plan's)."""
        return now >= s.ejected_until and not s.probe_covered(now) and not s.draining(now) \
            and (not self._following or endpoint in self.overruled)

    def _count_quick_runs(self, now: float) -> None:
        """At every tick, with hedged exploration: each endpoint's run of quick ticks. A
        tick is slow when its own outcomes' mean is over twice the best used endpoint's
        estimate and 2 ms, when the endpoint failed in the last :data:`EVIDENCE_FRESH` s, or
        while a long answer no other pod matched is held (answers of seconds are no outcome
        of a tick: they are learned after ``LONG_HOLD``); a slow tick ends the run, whatever
        the endpoint's share. A quick tick of a held-back endpoint (:meth:`_may_look`) whose
        mean is also under a :data:`CONFIRM` th of its estimate adds to its run; a tick
        without an outcome of its own leaves it. After :data:`QUICK_RUN` ticks, its estimates
        are the run's mean (:meth:`EndpointStats.trust_quick_run`). A slow tick, or an
        estimate slow again, within :data:`TRUST_KEPT` s of a trust broke it, and the run the
        next trust needs is :data:`TRUST_RAISE` times longer (at most :data:`TRUST_RAISES`
        times; forgiven after :data:`TRUST_FORGIVEN` s without such a break): a pod slow on a
        tenth of its requests gives seven quick ticks in a row half the time, and each trust
        sent it unhedged requests until its next slow answer (a review's finding: with a 3 s
        tail, 2.5 times the slow answers of the code without the trust; now 1.26 times)."""
        held = self._held_back()
        if held is None:
            return
        best, small = held
        limit = 2.0 * best + 0.002
        for e, w in zip(self.endpoints, self._weights.tolist(), strict=True):
            s = self.stats[e]
            if s.trust_raises and now - s.trust_broken_at > TRUST_FORGIVEN:
                s.trust_raises = 0
            quick, v = s.tick_own_mean, s.latency.value
            # slow: a slow or failed tick, or a long answer no other pod matched, held (an
            # answer of seconds is no outcome of the tick: it is learned after LONG_HOLD)
            slow = (quick != math.inf and quick > limit) or bool(s.held_long) \
                or now - s.failed_at <= EVIDENCE_FRESH
            if now - s.trusted_at <= TRUST_KEPT and (slow or (v is not None and v > limit)):
                s.trust_raises = min(s.trust_raises + 1, TRUST_RAISES)
                s.trusted_at, s.trust_broken_at = -math.inf, now
            if slow:
                s.quick_run, s.quick_run_sum = 0, 0.0
                continue
            if quick == math.inf:
                continue
            if self._quick_held_back(e, s, w, limit, small, now):
                s.quick_run += 1
                s.quick_run_sum += quick
                if s.quick_run >= QUICK_RUN * TRUST_RAISE ** s.trust_raises:
                    s.trust_quick_run(now)

    def take_epoch(self) -> dict[str, EpochWindow]:
        """What each endpoint did since the previous call (:class:`mesh.policy.FollowingPolicy`)."""
        return self._epoch.take()

    def _on_resize(self, keep: list[int | None], new: list[str]) -> None:
        super()._on_resize(keep, new)
        self._probation = None  # named again at the next tick, if still due
        self.regret.resize(keep)
        if self._pacer is not None:
            sampled = len(new) > EXACT_PACING_ENDPOINTS
            if sampled != isinstance(self._pacer, SampledPacer):  # credits start afresh
                window = self.profile.pacing_window
                self._pacer = SampledPacer(window=window) if sampled \
                    else CreditPacer(window=window)
            self._pacer.resize(keep)
            self._index = {e: i for i, e in enumerate(new)}
            if isinstance(self._pacer, SampledPacer):
                self._pacer.order.reset([self._cost_key(self.stats[e], None) for e in new])

    def _publish(self, weights: np.ndarray) -> None:
        super()._publish(weights)
        if self._pacer is not None and weights.size:
            floor = self.profile.herd.floor(weights.shape[0])
            self._paced = (weights > 1.5 * floor).tolist()
            if isinstance(self._pacer, SampledPacer):
                self._sampled_strategy(self._pacer)
            else:
                self._pacer.set_strategy(weights.tolist())

    def follow(self, weights: Mapping[str, float], expires_at: float) -> None:
        """Adopt a (verified) recommendation until ``expires_at``; it is still shaped by the
        thundering-herd guard. Weights for unknown endpoints are ignored."""
        clean = {e: float(w) for e, w in weights.items()
                 if e in self.stats and math.isfinite(float(w)) and float(w) >= 0.0}
        self._recommendation = (clean, expires_at) if clean else None

    def await_signal(self, until: float) -> None:
        """Keep the current weights until ``until`` or the first recommendation, whichever
        comes first; regrets are still learned meanwhile.

        A sidecar that joins a coordinated mesh (``--redis``) routes as it started -- evenly --
        for the few epochs its first recommendation takes, instead of piling onto whichever
        endpoint looks fastest in its first second: in a mesh-wide cold start every sidecar
        would do that at once, the herd the signaler is there to prevent, and the signaler's
        first latency fits would be made from that herd's queues. :meth:`stop_following`
        (Redis failed) ends the wait at once."""
        self._hold_until = until

    def stop_following(self) -> None:
        self._recommendation = None
        self._hold_until = -math.inf

    @property
    def following(self) -> bool:
        return self._following

    def pick(self, rng: random.Random, now: float,
             exclude: frozenset[str] = frozenset()) -> str | None:
        endpoints, cumulative = self.endpoints, self._cumulative
        if not endpoints:
            return None
        probation = self._probation
        if probation is not None:
            self._probation = None
            if probation not in exclude and self.stats[probation].ejected_until <= now:
                self._probation_sent = probation  # (on_start: a declared one?)
                return probation
        if not exclude and cumulative and cumulative[-1] > 0:
            i = min(bisect.bisect_right(cumulative, rng.random() * cumulative[-1]),
                    len(endpoints) - 1)
            if self._pacer is not None and len(self._paced) == len(endpoints):
                i = self._paced_pick(i, now) if isinstance(self._pacer, CreditPacer) \
                    else self._sampled_pick(self._pacer, i)
            chosen = endpoints[i]
            stats = self.stats[chosen]
            if len(endpoints) > 1 and (
                    (stats.consecutive_failures
                     and (stats.failing(self.profile.eject_after_failures)
                          or stats.probation_hung))
                    or (stats.readmitting and stats.sent_since_outcome)
                    or stats.stalling(now)):
                # Failing enough to be ejected at the next tick (what is sent there until
                # then fails too: a stranger counted 18 failures before an ejection "at
                # 5"; after a probation request that timed out, a second one did); its
                # probation request after an ejection not answered yet (the floor's draws
                # sent one to three more to a pod still hung: a review's finding); or
                # holding requests it has not answered, longer than a stall: a hung
                # pod until its weight falls at the next tick. What is sent there now waits
                # for the request timeout (a helper counted 20 such 504s a hang, where
                # HAProxy's leastconn, seeing the connections pile up, lost 1 to 5): this
                # request goes elsewhere by the weights of the others, never to one without
                # weight (ejected, draining: a review's finding), else it stays.
                return self._elsewhere(rng, i) or self._look_past(
                    rng, now, chosen, exclude) or chosen
            return chosen
        weights = self._weights
        pool = [(e, float(weights[i])) for i, e in enumerate(endpoints)
                if e not in exclude and i < weights.shape[0]]
        positive = [(e, w) for e, w in pool if w > 0]
        if positive:
            return rng.choices([e for e, _ in positive], [w for _, w in positive])[0]
        rest = [e for e in endpoints if e not in exclude]
        if not rest:
            return None
        # a last resort (every endpoint ejected or draining, or a retry with every endpoint
        # with a weight tried): drawn evenly among the best by (whether it holds requests:
        # stalling, or re-admitting with one out, as a pod ejected for hanging is; whether
        # its last request failed), as Envoy's panic mode routes to every host, but here
        # preferring the ones that answer (drawn evenly among all, a pod still failing took
        # a third of the traffic for 40 s after the others healed: a stranger's finding;
        # a pod just ejected for hanging, whose held requests had not failed yet, took
        # every request: a review's)
        return self._last_resort(rng, now, rest)

    def _last_resort(self, rng: random.Random, now: float, candidates: list[str],
                     beat: tuple[bool, bool] | None = None) -> str | None:
        """One of ``candidates`` (every endpoint may be among them, ejected ones too) drawn
        evenly among the best by :meth:`_resort_rank`; None if none ranks better than
        ``beat`` (the rank of the endpoint a pick would otherwise keep: one stalling, with no
        endpoint with a weight left; a review found a hung pod taking every request for 5 s
        while two healed pods stayed ejected, nothing sent there to end it)."""
        if not candidates:
            return None
        ranks = [self._resort_rank(e, now) for e in candidates]
        best = min(ranks)
        if beat is not None and not best < beat:
            return None
        return rng.choice([e for e, rank in zip(candidates, ranks, strict=True) if rank == best])

    def _look_past(self, rng: random.Random, now: float, chosen: str,
                   exclude: frozenset[str]) -> str | None:
        """The pick landed on ``chosen``, which stalls or fails, and no other endpoint has a
        weight: one request a tick goes to an endpoint ejected for failures that ranks
        better (:meth:`_resort_rank`: it holds nothing unanswered; not one ejected for
        hanging, which may be a pod of long polls), whose success ends its ejection;
        the rest stay with ``chosen`` (every request to a pod ejected for failing fast would
        fail: a review's finding; none, and a hung pod took every request for 5 s while two
        healed pods stayed ejected: another's)."""
        if now - self._looked_past < self.profile.tick_interval:
            return None
        found = self._last_resort(
            rng, now, [e for e in self.endpoints if e != chosen and e not in exclude
                       and self.stats[e].ejected_for_failures],
            self._resort_rank(chosen, now))
        if found is not None:
            self._looked_past = now
        return found

    def _resort_rank(self, endpoint: str, now: float) -> tuple[bool, bool]:
        s = self.stats[endpoint]
        return (s.stalling(now) or (s.readmitting and s.in_flight > 0)), s.failed_last

    def _elsewhere(self, rng: random.Random, i: int) -> str | None:
        """An endpoint other than the ``i``-th, drawn by weight among those with one; None
        if there is none."""
        weights, endpoints = self._weights, self.endpoints
        others = [(e, float(weights[j])) for j, e in enumerate(endpoints)
                  if j != i and j < weights.shape[0] and weights[j] > 0]
        if not others:
            return None
        return rng.choices([e for e, _ in others], [w for _, w in others])[0]

    def _paced_pick(self, drawn: int, now: float) -> int:
        """Queue-aware choice inside the shares (:mod:`mesh.pacing`), given the endpoint
        ``drawn`` at random from the weights.

        An endpoint kept at its exploration floor, or whose last request failed, or back from
        an ejection without an answer yet (``readmitting``), keeps that random draw: it gets
        its share and never more (paced by cost, a pod refusing connections fails fast, a pod
        back from an ejection is passed over while its cost holds the timeouts, and the pacer
        would owe either a burst of its window). Any other
        draw is handed to the pacer, which sends the request, among those endpoints, where it
        should finish first (:meth:`EndpointStats.finish_cost`: peak-EWMA x (own + callee's
        other requests in flight + 1), failures charged the penalty) within ``window``
        requests of each one's share."""
        assert isinstance(self._pacer, CreditPacer)
        stats, endpoints = self.stats, self.endpoints
        paced = self._pacing_mask()
        if not paced[drawn]:
            return drawn
        chosen = self._pacer.choose([stats[e].finish_cost(now) for e in endpoints], paced)
        return drawn if chosen is None else chosen

    def _sampled_strategy(self, pacer: SampledPacer) -> None:
        """The weights to :class:`~mesh.pacing.SampledPacer`, less the endpoints at their
        floor and those whose last request failed (their picks go to them unpaced, as in
        :meth:`_paced_pick`, so the pacer must not keep owing them credit). Called each tick
        and whenever an endpoint starts or stops failing."""
        weights = self._weights
        if len(self._paced) != len(self.endpoints) or weights.shape[0] != len(self.endpoints):
            return
        pacer.set_strategy(weights.tolist(), self._pacing_mask())

    def _pacing_mask(self) -> list[bool]:
        """Per endpoint, whether the pacer may choose it: above its exploration floor, not
        failing (its last request did not fail) and not waiting for its first answer after
        an ejection (until then the next tick's strategy leaves it out of the sampled
        pacer)."""
        stats = self.stats
        return [p and stats[e].consecutive_failures == 0 and not stats[e].readmitting
                for p, e in zip(self._paced, self.endpoints, strict=True)]

    def _sampled_pick(self, pacer: SampledPacer, drawn: int) -> int:
        """:meth:`_paced_pick` past :data:`~mesh.pacing.EXACT_PACING_ENDPOINTS` endpoints, at
        O(log k): the costs are kept in order as requests start and end
        (:class:`mesh.pacing.SampledPacer`, its :class:`~mesh.pacing.CostOrder`)."""
        stats, endpoints, paced = self.stats, self.endpoints, self._paced
        if not paced[drawn] or stats[endpoints[drawn]].consecutive_failures \
                or stats[endpoints[drawn]].readmitting:
            return drawn
        chosen = pacer.choose(
            lambda i: paced[i] and stats[endpoints[i]].consecutive_failures == 0
            and not stats[endpoints[i]].readmitting, drawn)
        return drawn if chosen is None else chosen

    def _used(self, weights: np.ndarray) -> np.ndarray:
        """Endpoints used by choice: those kept only at the exploration floor are being
        re-checked, not used, and do not count towards the Wardrop gap (a deliberate, bounded
        probe of a bad pod is not a disequilibrium)."""
        used = weights > 1.5 * self.profile.herd.floor(weights.shape[0])
        return used if used.any() else weights > 0

    def _live(self, now: float) -> np.ndarray:
        """Which endpoints may be used at ``now`` (not ejected nor draining); ejects those
        that failed ``eject_after_failures`` times in a row or are hung (module docstring)."""
        live = np.ones(len(self.endpoints), dtype=bool)
        p = self.profile
        # the best any endpoint does now: its estimate, or what it has left unanswered if
        # that is longer (when every pod stalls at once, none is hung: see EndpointStats.hung),
        # or the peak of its answers, long ones included (which the estimate leaves out:
        # docs/routing.md, "Long polls"), weighted by its share of long answers (what they
        # added to the estimate when it learned them)
        stats = [self.stats[e] for e in self.endpoints]
        known = [v for s in stats if (v := s.doing_now(now)) is not None]
        best = min(known) if known else None
        after = p.eject_after_failures
        for i, s in enumerate(stats):
            failing = s.failing(after)
            # a probation request after an ejection for failures that timed out: as hung
            hung_probation = s.probation_hung and not failing
            # not again while it is out: what a last resort sends it meanwhile (every pod
            # ejected, or a retry with every other tried) re-ejected it each tick, the
            # backoff doubling to 80 s, healthy pods with it (a stranger's finding); those
            # failures count towards nothing (EndpointStats.finish): its probation request
            # decides when this ejection ends
            if (failing or hung_probation or s.hung(now, best)) and now >= s.ejected_until:
                # Failing; or hung: requests held unanswered for over a second and ten times
                # its latency (no slow pod waits that long; the pick already sends nothing
                # there while it stalls), ejected for STALL_EJECTION, not doubled: the requests
                # it holds time out later (and only then would they have counted), and each
                # look at whether it healed costs the one or two requests that stall again.
                s.ejected_until = now + (
                    p.eject_base * 2 ** min(s.ejections, 3) if failing
                    else STALL_EJECTION * 2 ** min(max(0, s.hung_probations - 2), 2)
                    if hung_probation else STALL_EJECTION)
                s.hung_probations += hung_probation
                s.stall_ejections += not failing and not hung_probation
                if failing:
                    s.failure_ejections_total += 1
                else:
                    s.hang_ejections_total += 1
                s.fresh_from, s.readmitting = now, True
                s.quick_run, s.quick_run_sum = 0, 0.0
                s.ejected_for_failures = failing or hung_probation
                s.long_probation_sent = -math.inf
                # what it still holds is what the ejection was for: only what is sent after
                # it can stall, and the probation request goes while nothing new is out
                s.restart_stall()
                s.ejections += failing
                s.consecutive_failures = 0
                s.probation_failed = s.probation_hung = False
            elif s.ejections and now > s.ejected_until + 4 * p.eject_base:
                s.ejections = 0  # healthy long enough: next ejection starts short again
            if s.stall_ejections and now > s.ejected_until + 4 * STALL_EJECTION:
                s.stall_ejections = 0  # likewise for the stall the next hang needs
            live[i] = now >= s.ejected_until and (s.probe is None or not s.draining(now))
        return live

    def _target(self, now: float, estimates: np.ndarray | None = None) -> np.ndarray:
        rec = self._recommendation
        self.overruled = []
        if rec is not None and now < rec[1]:
            weights, _ = rec
            target = np.array([weights.get(e, 0.0) for e in self.endpoints])
            if target.sum() > 0:
                self._following = True
                if estimates is not None and estimates.shape == target.shape:
                    target = self._checked(target, estimates, now)
                return target
        if rec is not None and now >= rec[1]:
            self._recommendation = None
        self._following = False
        if now < self._hold_until and self._weights.size == len(self.endpoints) \
                and self._weights.sum() > 0:
            return self._weights.copy()
        return self.regret.strategy(self.profile.regret_mode)

    def _next_weights(self, counts: np.ndarray, means: np.ndarray, estimates: np.ndarray,
                      dt: float, now: float) -> np.ndarray:
        self.regret.update(counts, means, estimates, dt)
        self._regret_view = self.regret.endpoint_regret()
        self._regret_matrix = self.regret.conditional  # replaced, never written, by update
        if not self.endpoints:
            return np.zeros(0)
        live = self._live(now)
        self._usable = int(live.sum())
        self._usable_mask = live.tolist()
        self._covered = [self.stats[e].probe_covered(now) for e in self.endpoints]
        target = self._target(now, estimates)
        good = self._good(live, now)
        weights = self.profile.herd.shape(target, self._weights, dt, live,
                                          np.array(self._covered), good)
        # above the cap because it gave way for bad pods: shed at the ramp's pace (herd.py)
        self._shedding = good is not None and weights.size > 0 and float(weights.max()) > max(
            self.profile.herd.cap, 1.0 / max(1, int(live.sum()))) + 1e-9
        return weights

    def _good(self, live: np.ndarray, now: float) -> np.ndarray | None:
        """The endpoints that may take what the herd guard's cap and ramp leave over
        (:meth:`mesh.herd.HerdGuard.shape`): all but those whose recommended share this
        sidecar's evidence overruled (:meth:`_checked`) and those bad beside the others
        (the mean cost of their own outcomes alone, answers and failures at the penalty,
        :attr:`EndpointStats.outcome_mean`, over :data:`BAD_COST` times the best live
        pod's and 2 ms more; judged so, good again only under :data:`RECOVERED` times it;
        none while some pod gave a long answer in the last ``LONG_RECENT`` s: a long-poll
        service's first polls, answered before they could be told long, and the long ones
        learned while the other pods' lagged, made healthy pods bad, a review's finding).
        The cap keeps the rest on the other *good* pods (DESIGN.md, the thundering-herd
        defence); spread over all, it sent a tenth of a caller's traffic to a slow pod the
        signaler's plan gave nothing, and a fifth of a two-pod service's traffic to its slow
        pod, for as long as the pod stayed slow.
        Judged by the latency estimates instead, healthy pods holding long polls (whose
        estimates carry the stalls and rescues of the polls they hold) were bad, and the
        long polls rescued doubled in the long-poll runs of the tests (docs/benchmarks.md,
        session 32). The herd guard keeps off the leftover only a bad pod the target wants
        less than the floor of. None while no endpoint is bad and no weight sheds."""
        means = {e: m.value for e, up in zip(self.endpoints, live.tolist(), strict=True)
                 if up and (m := self.stats[e].outcome_mean) is not None
                 and m.value is not None}
        bad: set[str] = set()
        best = min(means.values()) if len(means) > 1 else math.inf
        if any(now - self.stats[e].long_at < LONG_RECENT for e in self.endpoints):
            best = math.inf  # long polls: no judging (above)
        # (a pod ejected meanwhile comes back judged afresh, against BAD_COST again)
        if best < self.profile.failure_penalty:  # beside a pod that answers: not all failing
            for e, v in means.items():
                if v > best + 0.002 and (v > BAD_COST * best
                                         or (e in self.bad and v > RECOVERED * best)):
                    bad.add(e)
        self.bad = bad
        if not self.overruled and not bad and not self._shedding:
            return None
        good = np.array([e not in self.overruled and e not in bad for e in self.endpoints])
        return None if good[live].all() and not self._shedding else good

    def _checked(self, target: np.ndarray, estimates: np.ndarray, now: float) -> np.ndarray:
        """A recommendation checked against this sidecar's own evidence: an endpoint it
        measured (or had a probe answer from) in the last few seconds at over
        :data:`CONTRADICTED` times the best endpoint's latency (and 2 ms more) gets no more
        than the sidecar's own strategy gives it. The signaler plans from summaries up to
        an epoch old and fits curves to them; a pod that turned bad since, or one nobody
        sent traffic to for a while (so its fit forgot it was bad), must not get a share
        that this sidecar sees is wrong: following the plan is a caller's best response only
        while its own signal does not contradict it. ``overruled`` lists them (for
        /debug/state)."""
        overruled: list[str] = []
        covered = self._covered  # this tick's, set before the target is asked for
        fresh = np.array([now - self.stats[e].last_outcome_at <= EVIDENCE_FRESH or covered[i]
                          for i, e in enumerate(self.endpoints)])
        if fresh.any():
            best = float(estimates[fresh].min())
            bad = fresh & (estimates > CONTRADICTED * best) & (estimates > best + 0.002)
            if bad.any():
                own = self.regret.strategy(self.profile.regret_mode)
                if own.shape == target.shape:
                    target = np.where(bad, np.minimum(target, own), target)
                    overruled = [e for e, b in zip(self.endpoints, bad.tolist(), strict=True)
                                 if b]
        self.overruled = overruled
        return target


CONTRADICTED = 4.0
"""How many times the best endpoint's latency estimate an endpoint's must be (and 2 ms more)
for a sidecar's own evidence to hold back the share a recommendation gives it."""
BAD_COST = 10.0
"""How many times the best live endpoint's mean outcome cost an endpoint's must be (and 2 ms
more) for it to be judged bad, and kept from the herd guard's leftover (:meth:`_good`). Not
:data:`CONTRADICTED`: a capacity-limited pod with four times the service time of a small
quick one is no bad pod, and judged so it made the simulator's ``herding`` shares swing
further (flapping over five seeds 12.0 -> 19.9 pp on average)."""
RECOVERED = 5.0
"""How many times the best mean outcome cost an endpoint judged bad must come under to be
judged good again (a pod near the :data:`BAD_COST` line would switch the cap on and off)."""
CONFIRM = 1.25
"""How many times its own last outcomes' mean an endpoint's latency estimate must be for a
quick answer of a pod held back (under half an equal share) to ask for another look
(:meth:`RegretMatchingPolicy._confirmation_due`)."""
FLOOR_DUE = 1.0
"""With hedging, a held-back endpoint sent nothing for this many times its floor's mean gap
(1 / (its weight x the requests a second of the last tick)) gets the next request
(:meth:`RegretMatchingPolicy._confirmation_due`): the floor's draws are random, and one
sidecar of four sent a healed pod nothing for 14 s. Pure core, 50 requests/s, twenty seeds:
back to 80 % of its fair share a median 7.5 s after healing, 10.5 s at most (8.75 and 25 s
without; 8.25 and 14.5 with 2, 8.5 and 12 with 1.5); a pod slow on half its requests was sent
a fifth more (55.8 requests a minute against 45.8; 51.8 with 1.5, 46 with 2), each hedged."""
TRUST_KEPT = 120.0
"""Seconds after a trust (:data:`QUICK_RUN`) within which a slow tick breaks it."""
TRUST_RAISE = 4
"""How many times longer a broken trust makes the run the next one needs."""
TRUST_RAISES = 4
"""How many times at most (a run of 7 x 4^4 ticks: none, in practice)."""
TRUST_FORGIVEN = 300.0
"""Seconds without a broken trust after which the run a trust needs is :data:`QUICK_RUN`."""
FLOOR_DUE_CLEAN = 30.0
"""Seconds without a failure a held-back endpoint needs for a request due by
:data:`FLOOR_DUE`: held back for its failures, it comes back by its floor's draws alone (a
pod failing half its requests at once was sent 44 requests a minute with the due requests
where the floor alone sends 38)."""
QUICK_RUN = 7
"""Ticks in a row whose own outcomes were quick (:meth:`RegretMatchingPolicy._confirmation_due`)
after which a held-back endpoint's estimates are its quick run's mean."""
DEADLINE_SHARED = 5.0
"""Seconds within which another endpoint's missed caller deadline makes one a shed failure
(:meth:`_MeasuredPolicy.missed_deadline`)."""
EVIDENCE_FRESH = 5.0
"""Seconds an endpoint's last outcome (or a fresh probe answer) counts as evidence against a
recommendation."""


POLICIES: dict[str, Callable[[StrategyProfile], _MeasuredPolicy]] = {
    RoundRobin.name: RoundRobin,
    RandomChoice.name: RandomChoice,
    P2CLeastRequest.name: P2CLeastRequest,
    P2CPeakEwma.name: P2CPeakEwma,
    RegretMatchingPolicy.name: RegretMatchingPolicy,
}
POLICY_NAMES: tuple[str, ...] = tuple(POLICIES)


def make_policy(name: str, profile: StrategyProfile) -> _MeasuredPolicy:
    """Build a policy by name (see :data:`POLICY_NAMES`); ValueError for unknown names."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}"
        ) from None
    return factory(profile)
