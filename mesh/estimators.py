"""Estimators: how the cost of an endpoint is measured (never how one is chosen).

Each estimator takes observations with the time they were made and answers questions with the
time they are asked; none reads a clock. Failures (connect errors, timeouts, 5xx) are charged a
penalty latency, so that a fast-failing endpoint never looks attractive.

- :class:`Ewma` — time-weighted exponential moving average of latency.
- :class:`PeakEwma` — Linkerd/Finagle's peak-sensitive EWMA: a slower sample replaces the
  estimate at once, faster samples pull it down with time constant ``decay`` (default 10 s), and
  an idle estimate decays towards zero from its last sample or, never measured, from the
  endpoint's creation at the default RTT, so that an endpoint once seen slow, or never tried, is
  eventually tried. Cost = estimate x (pending + 1).
- :class:`EndpointStats` — everything one endpoint's policy needs: the two averages above, the
  in-flight count, failure counters, piggybacked congestion, the last verified probe answer
  (:mod:`mesh.probes`), and the per-tick accumulators that regret matching consumes.
- :class:`EpochWindow` / :class:`EpochWindows` — what each endpoint did in one signaling epoch
  (requests, failures, latency in fixed buckets), the raw material of a regret summary
  (:mod:`mesh.summary`).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from mesh.probes import ProbeReport

DEFAULT_RTT = 0.030  # Linkerd's default RTT estimate for an endpoint never measured (seconds)
DEFAULT_DECAY = 10.0  # Linkerd's peak-EWMA decay time constant (seconds)
MAX_LATENCY = 3600.0  # any observation above this is clamped: nothing real takes an hour
STALL_MIN = 0.05  # seconds without an answer before a stall counts (EndpointStats.censor_stall)
STALL_EJECT = 1.0  # seconds of a stall (and 10x the estimate) that eject a hung endpoint
STALL_EJECTION = 5.0  # seconds a hung endpoint stays ejected (each time: never doubled)
STALL_EJECT_UNMEASURED = 2.0  # STALL_EJECT for an endpoint that never answered
ANSWER_DECAY = 10.0  # seconds: how fast EndpointStats.answer_latency forgets a slow answer
PROBE_FRESH = 2.0  # seconds a probe answer counts as what the endpoint is like now
OWN_QUIET = 1.0  # seconds without an own outcome after which probes inform the latency estimate
# A long answer (EndpointStats.long_answer): at least LONG_AFTER seconds and LONG_FACTOR x the
# median standing latency (a 10th percentile of answers) of the upstream's endpoints, at an
# endpoint whose own standing latency is within LONG_QUICK x that, overtaken (the upstream
# answered a request sent after it first): a long poll or a watch, the request's nature
# rather than the endpoint's speed, when the others give them at a like rate (the least share
# of long answers, over LONG_RECENT s, among the others with LONG_MIN_ANSWERS, at least
# LONG_MIN_SHARE, and this endpoint's within LONG_RATIO x that plus LONG_MARGIN; while young,
# LONG_YOUNG_COUNT of them from more than half of the others: RegretMatchingPolicy._matched).
LONG_AFTER = 1.0
LONG_FACTOR = 50.0
LONG_QUICK = 10.0
LONG_RECENT = 30.0
LONG_MIN_SHARE = 0.02
LONG_MIN_ANSWERS = 10.0  # answers (weighted by age) an endpoint's share needs to count
LONG_YOUNG_COUNT = 3.0  # long answers elsewhere that match one while shares are young
LONG_RATIO = 1.5
LONG_MARGIN = 0.05
LONG_HOLD = 5.0  # seconds a long answer no other endpoint matched yet waits to be learned
LONG_HELD_MAX = 16  # such answers held per endpoint, at most (beyond: learned at once)
STANDING_QUANTILE = 0.1
STANDING_STEP = 0.3  # the standing latency's step down in log space per faster answer
# the standing latency's factors down (a faster answer) and up (a slower one): at rest where
# a STANDING_QUANTILE share of answers is faster
_STANDING_DOWN = math.exp(-STANDING_STEP)
_STANDING_UP = math.exp(STANDING_STEP * STANDING_QUANTILE / (1.0 - STANDING_QUANTILE))


def _decay_weight(dt: float, tau: float) -> float:
    """exp(-dt/tau), robust to dt <= 0 (no decay) and tau <= 0 (no memory)."""
    if dt <= 0.0:
        return 1.0
    if tau <= 0.0:
        return 0.0
    return math.exp(-dt / tau)


@dataclass(slots=True)
class Ewma:
    """Time-weighted EWMA: each sample pulls the average by ``1 - exp(-dt/tau)``, clamped to
    ``[min_step, max_step]``.

    The first sample sets the value. ``tau`` is the time constant in seconds. The clamp keeps
    both extremes honest: a burst of same-instant samples still moves the average (at least
    ``min_step`` each), and a lone sample after a long silence cannot replace it (at most
    ``max_step``) — an endpoint probed once every few seconds, whose latencies are bimodal (a
    bad pod slow on half its requests), would otherwise look healthy after one lucky answer.
    """

    tau: float
    value: float | None = None
    updated_at: float = 0.0
    min_step: float = 1.0 / 16.0
    max_step: float = 1.0 / 3.0

    def update(self, sample: float, now: float) -> float:
        # (per answer: the decay weight and the clamp inline, no min/max calls)
        value, dt = self.value, now - self.updated_at
        if value is None:
            value = sample
        else:
            if dt <= 0.0:
                step = 0.0
            else:
                tau = self.tau
                step = 1.0 - math.exp(-dt / tau) if tau > 0.0 else 1.0
            if step < self.min_step:
                step = self.min_step
            elif step > self.max_step:
                step = self.max_step
            value = value * (1.0 - step) + sample * step
        self.value = value
        if dt > 0.0:
            self.updated_at = now
        return value


@dataclass(slots=True)
class PeakEwma:
    """Peak-sensitive EWMA of round-trip time, as in Linkerd2-proxy / tower ``PeakEwma``
    (tower ``tower/src/load/peak_ewma.rs``, after Finagle's ``PeakEwma``).

    The estimate starts at the default RTT with its clock started at ``updated_at``, the
    instant the endpoint was created (tower's ``RttEstimate::new`` stamps ``Instant::now()``),
    so an endpoint never measured decays from the moment it appears: a newly added pod gets
    cheaper than its loaded peers within seconds and is tried, as under Linkerd.

    ``update``: a sample above the estimate replaces it (the "peak"); a sample below is
    averaged in with weight ``1 - exp(-dt/decay)``, ``dt`` since the last update (or since
    creation). ``value(now)`` decays the estimate towards zero while no sample arrives, as
    tower's ``load()`` does by updating with a zero RTT. Here reads are pure (nothing is
    written back): the decay towards zero is the same, exponentials compose; only the weight a
    later faster sample gets differs (tower's clock restarts at every read, ours at updates).
    """

    updated_at: float  # the last update, or the endpoint's creation (seconds, caller's clock)
    decay: float = DEFAULT_DECAY
    estimate: float = DEFAULT_RTT

    def update(self, rtt: float, now: float) -> None:
        if rtt > self.estimate:
            self.estimate = rtt
        else:
            w = _decay_weight(now - self.updated_at, self.decay)
            self.estimate = self.estimate * w + rtt * (1.0 - w)
        if now > self.updated_at:
            self.updated_at = now

    def value(self, now: float) -> float:
        # estimate x _decay_weight(now - updated_at, decay), inline: read several times a
        # request (each endpoint's cost at a pick)
        dt = now - self.updated_at
        if dt <= 0.0:
            return self.estimate
        return self.estimate * (math.exp(-dt / self.decay) if self.decay > 0.0 else 0.0)

    def cost(self, now: float, pending: int) -> float:
        """Linkerd's load: RTT estimate x (pending requests + 1)."""
        return self.value(now) * (pending + 1)


@dataclass(slots=True)
class EndpointStats:
    """Measurements of one endpoint, fed by outcomes and read by policies."""

    endpoint: str
    latency: Ewma
    peak: PeakEwma
    failure_penalty: float
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    congestion: float = 0.0
    ejected_until: float = -math.inf
    ejections: int = 0
    # ejections since the endpoint was added, for failures and for hanging (never reset:
    # the metrics and the log read them; ``ejections``/``stall_ejections`` count in a row)
    failure_ejections_total: int = 0
    hang_ejections_total: int = 0
    # A failure of a request sent before ``fresh_from`` is what the last ejection was for
    # (finish()): it is set when an ejection begins, and moved to the sending of the first
    # request that succeeds after it (``readmitting`` until then), which starts the latency
    # estimates afresh.
    fresh_from: float = -math.inf
    readmitting: bool = False
    # After an ejection for failures (``ejected_for_failures``: the last ejection's kind), a
    # probation request (sent once the ejection was over: what failed while it was out
    # is ignored, as what was sent before it) that failed before any success:
    # the pod is out again at once, as Linkerd's failure accrual sends it back after a
    # failed probation request, instead of spending ``eject_after_failures`` more requests
    # one a tick (a stranger counted five failed calls at the end of each ejection). An
    # error answer, or no answer in under ``quick_failure`` (a reset or refused connection;
    # STALL_EJECT, or half the request timeout if that is shorter): ``probation_failed``,
    # out with the next doubling backoff. No answer in longer (it timed out):
    # ``probation_hung``, out as a hung pod is, for STALL_EJECTION, doubled from the fourth
    # such ejection in a row (``hung_probations``: 5, 5, 5, 10, then 20 s): a hung pod's
    # timeouts in a row ended in the failures' doubling backoff, the fifth often of a
    # request sent before the pod healed, and kept a pod healed at 20 s out past the end of
    # a 40 s run (tests/integration/test_bench.py, a CI run of 2026-12-07); never doubled, a
    # pod dead for good cost a failed request every 7 s (a review's finding). Neither after an
    # ejection for hanging, nor for a refusal for load (``shed``): a busy pod's sidecar
    # turning the request away is no failure in a row.
    probation_failed: bool = False
    probation_hung: bool = False
    hung_probations: int = 0
    # whether its last outcome was a failure (of a request sent since its last ejection
    # began, refusals for load apart): a last resort (every endpoint ejected) goes first to
    # those whose last request did not fail
    failed_last: bool = False
    ejected_for_failures: bool = False
    quick_failure: float = STALL_EJECT
    last_outcome_at: float = -math.inf
    # requests sent here since its last outcome, and when the second of them was sent
    # (inf: fewer than two since)
    sent_since_outcome: int = 0
    waiting_since: float = math.inf
    # when the third of them was sent (inf: fewer): a stall that turns requests away and
    # ejects must hold one request more than the two long polls a healthy pod may hold
    confirmed_since: float = math.inf
    stall_counted: float = 0.0  # the stall censor_stall counted at this tick (0: none)
    # The latencies of the answers it gave, as a peak EWMA decaying over ANSWER_DECAY (None
    # before the first): what a stall is measured against (answer_latency()). Not the latency
    # estimate, which also takes lower bounds (stalls, rescued and hedged requests, a probe
    # answer's window that folds in what its app holds): measured against those, a hung pod's
    # stall grew its own yardstick and it was never judged hung again. A peak, not a mean:
    # a service whose answers include long polls has their length as its yardstick, however
    # many quick answers come between (a review's finding: with a mean, three long polls
    # held in a row ejected healthy pods over and over).
    answers: PeakEwma | None = None
    # The mean cost of its own outcomes alone: whole answers, and failures at the penalty
    # (an EWMA with the latency estimate's time constant; None before the first): no stall,
    # rescue or hedge bound, no long answer, no success without an answer; a probe answer's
    # mean stands for it while this caller's own outcomes are quiet, as for the estimate
    # (observe_probe). What judges a pod bad beside the others (RegretMatchingPolicy._good):
    # the estimate would not do, for a healthy pod holding long polls carries their stalls
    # and rescues in it.
    outcome_mean: Ewma | None = None
    # the mean of its own outcomes in the last tick (inf: none came): a quick one from a pod
    # whose estimate is still high asks for another look (RegretMatchingPolicy._confirmation_due)
    tick_own_mean: float = math.inf
    last_sent: float = -math.inf  # when a request (not a declared long one) was last sent
    # ticks in a row whose own outcomes were quick while it was held back, and the sum of
    # their means (RegretMatchingPolicy._confirmation_due)
    quick_run: int = 0
    quick_run_sum: float = 0.0
    trusted_at: float = -math.inf  # its last trust (trust_quick_run), until a slow tick
    trust_raises: int = 0  # how many of its trusts a slow tick broke soon after (in a row)
    trust_broken_at: float = -math.inf  # when the last of them was broken
    failed_at: float = -math.inf  # its last failure (of a request sent since its last ejection)
    # when a call to it last ran out its caller's deadline (_MeasuredPolicy.missed_deadline)
    deadline_missed_at: float = -math.inf
    # hang ejections in a row (none for 20 s: back to 0; RegretMatchingPolicy._live): each
    # doubles the stall the next one needs (at most 16x, past the 15 s request timeout), so
    # that what a pod slow rather than hung, or serving long polls not yet seen, is sent is
    # at last let answer and teach its yardstick: what it held at each ejection was rescued
    # (sidecar/rescue.py), and nothing would teach it otherwise (a review's finding: a 3 s
    # pod was ejected every 6.5 s for good, long-poll pods one after the other)
    stall_ejections: int = 0
    # its answers and the long ones among them, each weighted by the age of its sending
    # (decaying over LONG_RECENT s: long_share), and its last long answer
    long_count: float = 0.0
    answer_count: float = 0.0
    counted_at: float = -math.inf
    long_at: float = -math.inf
    # long answers no other endpoint matched yet: (when, latency), learned after LONG_HOLD
    # unless one does meanwhile (RegretMatchingPolicy.tick)
    held_long: list[tuple[float, float]] = field(default_factory=list)
    # A low quantile (STANDING_QUANTILE) of its answers' latencies, tracked in log space:
    # the yardstick of a long answer, which long answers themselves barely move (None: none)
    standing: float | None = None
    # The last verified probe answer, when it came, and this caller's in-flight count then.
    probe: ProbeReport | None = None
    probed_at: float = -math.inf
    own_at_probe: int = 0
    # declared long requests in flight here (start(long=True)): counted apart from in_flight,
    # for they take none of the pod's capacity and are no stall (finish_declared)
    long_in_flight: int = 0
    # when the declared long request sent here as its probation request after an ejection
    # was sent, while it is out (-inf: none): no other probation request goes meanwhile
    # (RegretMatchingPolicy._probation_due), though no stall counts it
    long_probation_sent: float = -math.inf
    # Accumulators for the current tick (consumed by regret matching, then reset).
    tick_count: int = 0
    tick_cost_sum: float = 0.0
    # the tick's own outcomes (answers, failures), folded into outcome_mean at the tick:
    # two additions on the request path instead of an EWMA step
    own_count: int = 0
    own_cost_sum: float = 0.0

    @classmethod
    def new(cls, endpoint: str, *, now: float, tau: float, decay: float,
            failure_penalty: float, default_rtt: float = DEFAULT_RTT,
            request_timeout: float = math.inf) -> EndpointStats:
        """Stats of an endpoint created at ``now`` (the peak EWMA's decay clock starts then)."""
        stats = cls(endpoint, Ewma(tau), PeakEwma(now, decay, default_rtt), failure_penalty)
        stats.quick_failure = min(STALL_EJECT, 0.5 * request_timeout)
        return stats

    def charged_latency(self, latency: float, ok: bool) -> float:
        """The cost an outcome is charged: its latency, or at least the penalty on failure."""
        if not math.isfinite(latency) or latency < 0.0:
            latency = self.failure_penalty
        latency = min(latency, MAX_LATENCY)
        return latency if ok else max(latency, self.failure_penalty)

    def start(self, now: float = -math.inf, long: bool = False) -> None:
        if long:  # a declared long request: see finish_declared
            self.long_in_flight += 1
            self.last_sent = now  # (a request all the same: RegretMatchingPolicy's floor)
            return
        self.sent_since_outcome += 1
        self.last_sent = now
        if self.sent_since_outcome == 2:
            self.waiting_since = now
        elif self.sent_since_outcome == 3:
            self.confirmed_since = now
        self.in_flight += 1

    def restart_stall(self) -> None:
        """Only what is sent from now on can stall (an answer came, or an ejection began)."""
        self.sent_since_outcome = 0
        self.waiting_since = self.confirmed_since = math.inf

    def trust_quick_run(self, now: float) -> None:
        """Its quick run's mean becomes its estimates (the mean EWMA, the peak, the mean of
        its own outcomes), as a re-admission starts them afresh."""
        self.trusted_at = now
        mean = self.quick_run_sum / max(1, self.quick_run)
        if self.latency.value is not None:
            self.latency.value = min(self.latency.value, mean)
        if self.outcome_mean is not None and self.outcome_mean.value is not None:
            self.outcome_mean.value = min(self.outcome_mean.value, mean)
        self.peak.estimate = min(self.peak.estimate, mean)
        self.quick_run, self.quick_run_sum = 0, 0.0

    def answered(self, now: float) -> None:
        """An answer head came (an HTTP/2 call's, whose outcome comes at its end): only what
        is sent from now on can stall. A pod serving long streams answered them; counted as
        unanswered until they ended, two of them made it look hung (a helper's finding)."""
        self.restart_stall()

    def stalled_for(self, now: float) -> float:
        """How long the endpoint has left unanswered two requests sent to it since its last
        outcome: the age of the second of them; 0 with fewer. An endpoint that accepts
        requests and never answers (a hung pod) shows no latency until they time out; this
        is a lower bound on what they cost (censored observations, still running), which the
        policy's tick takes as the endpoint's latency where it says more than the estimate.
        One request alone is no stall, however long (a long poll, a stream: nothing tells it
        from a hang), and neither is a request sent before the last outcome."""
        if self.in_flight <= 0 or self.waiting_since == math.inf:
            return 0.0
        return max(0.0, now - self.waiting_since)

    def answer_latency(self, now: float) -> float | None:
        """What its answers took (:attr:`answers`: their peak, decaying), None before any."""
        return None if self.answers is None else self.answers.value(now)

    def failing(self, after: int) -> bool:
        """Whether it failed enough to be ejected: ``after`` times in a row, or its probation
        request after an ejection for failures failed quickly (:attr:`probation_failed`);
        one that failed slowly ejects it as hung (:attr:`probation_hung`)."""
        return self.consecutive_failures >= after or self.probation_failed

    def stalling(self, now: float) -> bool:
        """Whether the endpoint holds three requests sent since its last answer and the third
        has waited over :data:`STALL_MIN` and twice what its answers take
        (:meth:`answer_latency`, 0 while it has none): then a pick sends it nothing more.
        Three, not the two of :meth:`stalled_for`: a healthy pod may hold two long polls,
        and while it is turned away from, nothing it would answer at once could show it
        healthy (a review's finding: with two long polls sent back to back, a healthy pod
        was turned away from, then ejected). A pod hung from
        its start, never measured, is turned away from as well (:meth:`hung`, which ejects,
        needs an estimate, its own or the other pods', and waits longer without its own)."""
        if self.confirmed_since == math.inf or self.in_flight <= 0:
            return False
        stall = now - self.confirmed_since
        return stall > STALL_MIN and stall > 2.0 * (self.answer_latency(now) or 0.0)

    def hung(self, now: float, others: float | None = None) -> bool:
        """Whether the endpoint's stall (three requests, as :meth:`stalling`) has lasted over
        :data:`STALL_EJECT`, ten times what its answers take (:meth:`answer_latency`) and
        ten times ``others`` (the best any of the upstream's endpoints does now), or,
        with no answer yet, over :data:`STALL_EJECT_UNMEASURED` and ten times ``others``;
        each hang ejection in a row doubles that (:attr:`stall_ejections`, at most 16x). A
        pod that accepts requests and answers none: a slow pod never waits that long (one
        slower than that is ejected a few times, each needing twice the stall, then let
        answer), a service of long polls has their length as its yardstick, and when every
        pod stalls (a shared database slows down) ``others`` counts what each pod has left
        unanswered (RegretMatchingPolicy._live) and rises with it: none is hung, and nothing
        is re-sent to pods as slow as it (a review's finding: rescues added 12 % to the load
        of a slowed-down service). With nothing known anywhere, nothing is
        hung. A pod never measured may be slow rather than hung (1.5 s where the others take
        3 ms, in the hedging test), hence the longer wait; meanwhile :meth:`stalling` keeps
        requests away from it all the same."""
        if self.confirmed_since == math.inf or self.in_flight <= 0:
            return False
        known = self.answer_latency(now)
        least = STALL_EJECT
        if known is None:
            known, least = others, STALL_EJECT_UNMEASURED
        if known is None:
            return False
        bound = max(least, 10.0 * known, 10.0 * (others or 0.0))
        return now - self.confirmed_since > bound * float(2 ** min(self.stall_ejections, 4))

    def censor_stall(self, now: float) -> float:
        """At a policy tick: when the endpoint has been stalled (:meth:`stalled_for`) longer
        than :data:`STALL_MIN` and twice its latency estimate, the stall counts as one
        observation of this tick (a lower bound on its pending requests' latency, as a
        hedge's loser counts: censored), so that regret matching sees a hung pod before its
        requests time out. Returns the stall (0 when not counted)."""
        if self.in_flight <= 0 or self.waiting_since == math.inf:  # (every tick: most
            self.stall_counted = 0.0  # endpoints hold nothing unanswered)
            return 0.0
        stall = self.stalled_for(now)
        known = self.latency.value or 0.0
        if stall <= STALL_MIN or stall <= 2.0 * known:
            self.stall_counted = 0.0
            return 0.0
        stall = self.stall_counted = min(stall, MAX_LATENCY)
        self.tick_count += 1
        self.tick_cost_sum += stall
        return stall

    def finish(self, latency: float, ok: bool, now: float,
               congestion: float | None = None, censored: bool = False,
               void: bool = False, sent_at: float | None = None,
               answered: bool = True, shed: bool = False) -> float:
        """Record one finished request; returns the cost charged.

        ``censored``: the request was cancelled after ``latency`` seconds (it lost a hedge
        race, :mod:`mesh.hedging`), so its true latency is at least that. Such a lower bound
        is no failure, and it is learned only where it says more than the estimate already
        does (above the mean EWMA): it can make an endpoint look slower, never faster.
        ``void``: the attempt says nothing about the endpoint (:class:`mesh.policy.Outcome`):
        it only leaves the in-flight count, and nothing is charged. ``sent_at``: when the
        request was sent, if not ``now - latency``. ``answered``: a response head came (no
        answer: a success of a kind that says nothing of how fast it answers). ``shed``: a
        failure that counts in the cost but not in the failures in a row that eject
        (:class:`mesh.policy.Outcome`)."""
        in_flight = self.in_flight - 1
        self.in_flight = in_flight = in_flight if in_flight > 0 else 0
        # (with nothing left in flight only what is sent from now on can stall: the paths
        # that return early say so here, the rest at their end)
        if void:
            if in_flight == 0:
                self.restart_stall()
            return 0.0
        cost = self.charged_latency(latency, ok)
        self.requests += 1
        if censored:
            if in_flight == 0:
                self.restart_stall()
            known = self.latency.value
            if known is None or cost > known:
                self.latency.update(cost, now)
                self.peak.update(cost, now)
                self.tick_count += 1
                self.tick_cost_sum += cost
            return cost
        if sent_at is not None and math.isfinite(sent_at):
            sent = sent_at
        else:
            sent = now - latency if 0.0 <= latency <= MAX_LATENCY else now
        if sent >= self.fresh_from:  # (what was sent before an ejection tells nothing now)
            self.failed_last = not ok and not shed
        if not ok and (sent < self.fresh_from or sent < self.ejected_until):
            # What the last ejection was for: requests sent to a hung pod time out long after
            # it was ejected (15 s by default) and after it may have healed; counted, they
            # would eject it again for twice as long, or undo its re-admission. Nor what a
            # last resort sent it while it was out (every pod ejected, or a retry with every
            # other tried): counted, they ejected it again when its ejection ended, healed or
            # not, without a probation request (a stranger's finding: healthy pods out for
            # 40 s); its probation request decides, or a success meanwhile (below).
            self.failures += 1
            if in_flight == 0:
                self.restart_stall()
            return cost
        if ok and sent < self.fresh_from:
            # A late answer of a request sent before the last ejection: what it was for (a
            # pod paused, by SIGSTOP or a long GC, answers what it held seconds late). Learned
            # as latency, it held the re-admitted pod at the floor for 30 s while its new
            # answers took 4 ms (a stranger's finding). It still teaches a hang's yardstick
            # (``answers``): a pod slow rather than hung shows so by such answers.
            if answered:
                self._learn_answer(cost, now)
            self.last_outcome_at = max(self.last_outcome_at, now)
            self.restart_stall()
            return cost
        if ok:
            self.consecutive_failures = 0
        else:
            self.failures += 1
            self.failed_at = now
            # shed counts once the endpoint was ejected for something else: its probation
            # requests refused for load would otherwise be sent one a tick for good
            self.consecutive_failures += not shed or self.readmitting
            if self.readmitting and self.ejected_for_failures and not shed:
                if answered or latency < self.quick_failure:
                    self.probation_failed = True
                else:
                    self.probation_hung = True
        if ok and answered and self.readmitting and sent >= self.fresh_from:
            # Re-admitted: the penalties that ejected it describe the failing pod, which the
            # ejection has answered; kept, they would hold a healed pod at the exploration
            # floor for tens of seconds while its few answers averaged them away. Envoy's
            # outlier detection and Linkerd's failure accrual likewise return a pod whole
            # after its ejection or probation request; the anti-herd ramp governs how fast
            # traffic comes back. What was sent before this request is history from now on.
            self.readmitting, self.fresh_from = False, sent
            self.quick_run, self.quick_run_sum = 0, 0.0
            self.probation_failed = self.probation_hung = False
            self.hung_probations = 0
            # answered while still ejected (a last resort sent it a request): it is back
            self.ejected_until = min(self.ejected_until, now)
            self.latency.value = None
            self.answers = self.outcome_mean = None
            self.own_count, self.own_cost_sum = 0, 0.0
            self.peak.estimate = cost
        if ok and answered:
            self._learn_answer(cost, now)
        if answered or not ok:
            self.own_count += 1
            self.own_cost_sum += cost
        self.latency.update(cost, now)
        self.peak.update(cost, now)
        if now > self.last_outcome_at:
            self.last_outcome_at = now
        self.restart_stall()  # it answers: only what is sent from now on can stall
        if congestion is not None and math.isfinite(congestion):
            self.congestion = 0.5 * self.congestion + 0.5 * min(1.0, max(0.0, congestion))
        self.tick_count += 1
        self.tick_cost_sum += cost
        return cost

    def long_answer(self, latency: float, now: float, standing: float | None,
                    overtaken: bool, sent: float | None = None) -> bool:
        """An answer came after ``latency`` s: whether it is *long*: at least
        :data:`LONG_AFTER` and :data:`LONG_FACTOR` x ``standing`` (the median standing
        latency of the upstream's endpoints), at an endpoint whose own standing latency is
        within :data:`LONG_QUICK` x that (its quick requests are as quick as the others': a
        pod slow at everything is learned as slow), and ``overtaken`` (the upstream answered
        a request sent after it first: a pod or service that got slower all at once
        overtakes nobody). The standing latency (:attr:`standing`) is a low quantile of the
        answers, which long answers barely move (the latency estimate would not do: with
        it the first long poll learned made every later one look ordinary); it learns from
        every call. A long answer counts in :meth:`long_share`. The inbound side parks the
        same requests outside its concurrency limit (:mod:`mesh.admission`)."""
        own = self.standing
        finite = math.isfinite(latency) and latency > 0.0
        long = (finite and overtaken and standing is not None and own is not None
                and latency >= LONG_AFTER and latency >= LONG_FACTOR * standing
                and own <= LONG_QUICK * standing)
        if finite:
            # counted as of its sending: a pod that is sent less now (it was ejected, or
            # shifted off) does not look longer for its old polls coming back
            self._decay(now)
            at = sent if sent is not None and math.isfinite(sent) else now - latency
            weight = math.exp((at - now if at < now else 0.0) / LONG_RECENT)
            self.answer_count += weight
            if long:
                self.long_count += weight
                self.long_at = max(self.long_at, now)
            # stochastic quantile tracking: down by STANDING_STEP (not past the answer) on a
            # faster answer, up by q / (1 - q) of that on a slower one: at rest where a
            # q-share is faster; while it stands at a second or more (its first answers were
            # long polls), a tenfold faster answer is taken at once
            if own is None or (own >= LONG_AFTER and latency * LONG_QUICK < own):
                self.standing = latency
            elif latency < own:
                self.standing = max(latency, own * _STANDING_DOWN)
            else:
                self.standing = own * _STANDING_UP
        return long

    def doing_now(self, now: float) -> float | None:
        """What it does now, as a hang is judged against the best of an upstream's endpoints
        (RegretMatchingPolicy._live; None before its first latency): its estimate, or what it
        has left unanswered if that is longer (:meth:`stalled_for`), or the peak of its
        answers, long ones included (which the estimate leaves out), weighted by its
        :meth:`long_share` (what they added to the estimate when it learned them)."""
        v = self.latency.value
        if v is None:
            return None
        share = self.long_share(now)
        # (the answers' peak is read only where it counts)
        return max(v, self.stalled_for(now),
                   share * (self.answer_latency(now) or 0.0) if share else 0.0)

    def long_share(self, now: float) -> float:
        """The share of its answers that were long, each weighted by the age of its sending
        (decaying over :data:`LONG_RECENT` s)."""
        self._decay(now)
        return self.long_count / max(1.0, self.answer_count)

    def _decay(self, now: float) -> None:
        if now > self.counted_at:
            if math.isfinite(self.counted_at):
                keep = math.exp((self.counted_at - now) / LONG_RECENT)
                self.long_count *= keep
                self.answer_count *= keep
            self.counted_at = now

    def _learn_answer(self, cost: float, now: float) -> None:
        """An answer took ``cost``: the yardstick of a hang (:attr:`answers`) learns it."""
        if self.answers is None:
            self.answers = PeakEwma(now, ANSWER_DECAY, cost)
        else:
            self.answers.update(cost, now)

    def finish_long(self, latency: float, now: float) -> None:
        """Record a long answer (:meth:`long_answer`): a success that teaches the latency
        estimates nothing, unless it is learned after all (:meth:`learn`): a long poll's
        length is not the pod's speed (learned, it moved traffic between healthy pods for
        good); the yardstick of a stall (:attr:`answers`) takes it, so that a service of
        long polls is not judged hung."""
        self.in_flight = max(0, self.in_flight - 1)
        self.requests += 1
        self.consecutive_failures, self.failed_last = 0, False
        cost = min(latency, MAX_LATENCY)
        self._learn_answer(cost, now)
        self.last_outcome_at = max(self.last_outcome_at, now)
        self.restart_stall()

    def finish_declared(self, ok: bool, now: float, void: bool = False,
                        sent_at: float = math.nan, shed: bool = False) -> None:
        """The end of a declared long request (:class:`mesh.policy.Outcome` ``long``: a
        long poll or watch its upstream's ``long_paths`` name). An answer, however long,
        teaches nothing of the endpoint's speed, nor is it the yardstick of a stall (that of
        the quick requests stays theirs) or a re-admission; it only shows the endpoint
        answers (``consecutive_failures`` back to 0). A failure is one as any other, charged
        the failure penalty, not the time the request was held (:meth:`finish`; one sent,
        at ``sent_at``, before the endpoint's last ejection began is what that ejection was
        for, as there)."""
        self.long_in_flight = max(0, self.long_in_flight - 1)
        if abs(sent_at - self.long_probation_sent) < 1e-6:  # the probation request ended:
            self.long_probation_sent = -math.inf  # the next may go
        if void:
            return
        if ok:
            self.requests += 1
            self.consecutive_failures, self.failed_last = 0, False
            return
        self.in_flight += 1  # finish() takes one out: the failure is charged as any other
        self.finish(0.0, False, now, sent_at=sent_at, answered=False, shed=shed)

    def hold_long(self, latency: float, now: float) -> None:
        """A long answer (:meth:`long_answer`) the other endpoints have not matched yet, in the
        first :data:`LONG_HOLD` s after the upstream's first answer of a second: held
        (:meth:`learn_held`) for the time the other pods' first long polls take to come back
        after a start; past :data:`LONG_HELD_MAX` held, the oldest is learned at once."""
        self.held_long.append((now, min(latency, MAX_LATENCY)))
        if len(self.held_long) > LONG_HELD_MAX:
            _, oldest = self.held_long.pop(0)
            self.learn(oldest, now)

    def learn_held(self, now: float, matched: bool) -> None:
        """The held long answers: forgotten if the other endpoints match them now
        (``matched``: the request's nature), else learned as latencies once
        :data:`LONG_HOLD` old (a pod slow at a share of its requests)."""
        if matched:
            self.held_long.clear()
            return
        while self.held_long and now - self.held_long[0][0] >= LONG_HOLD:
            _, latency = self.held_long.pop(0)
            self.learn(latency, now)

    def learn(self, latency: float, now: float) -> None:
        """A latency observed apart from :meth:`finish` (a long answer learned after all)."""
        self.latency.update(latency, now)
        self.peak.update(latency, now)
        self.tick_count += 1
        self.tick_cost_sum += latency

    def observe_probe(self, report: ProbeReport, now: float) -> None:
        """A verified probe answer. While this caller's own requests measure the endpoint
        (an outcome within :data:`OWN_QUIET`), they stay the latency estimate and the answer
        adds only the callee's load; otherwise the answer's window mean (already an average
        over the responder's window) becomes the estimate, and its congestion level too."""
        # (the callee counts every request at its app, this caller's declared long ones too)
        self.probe, self.probed_at = report, now
        self.own_at_probe = self.in_flight + self.long_in_flight
        if now - self.last_outcome_at < OWN_QUIET:
            return
        if report.has_latency:
            self.latency.value = mean = min(report.mean, MAX_LATENCY)
            self.latency.updated_at = max(self.latency.updated_at, now)
            # and for what judges it bad: a pod that healed while this caller sent it
            # nothing was judged by its outcomes from before for good, and never took the
            # share that would have brought it back (a recovery run: 0 % for 30 s)
            if self.outcome_mean is None:
                self.outcome_mean = Ewma(self.latency.tau)
            self.outcome_mean.value = mean
            self.outcome_mean.updated_at = max(self.outcome_mean.updated_at, now)
            self.own_count, self.own_cost_sum = 0, 0.0
        if math.isfinite(report.congestion):
            self.congestion = min(1.0, max(0.0, report.congestion))

    def probe_covered(self, now: float) -> bool:
        """Whether a fresh probe answer with latency evidence stands for this endpoint (so
        no user request needs to be spent exploring it)."""
        p = self.probe
        return (p is not None and now - self.probed_at <= PROBE_FRESH and p.has_latency
                and not p.draining)

    def draining(self, now: float) -> bool:
        """Whether a fresh probe answer says the endpoint is draining."""
        return self.probe is not None and self.probe.draining \
            and now - self.probed_at <= PROBE_FRESH

    def others_in_flight(self, now: float) -> int:
        """Requests other callers have at the endpoint, as the last fresh probe answer
        reported them (its in-flight count less this caller's own at the time); 0 without
        one."""
        p = self.probe
        if p is None or now - self.probed_at > PROBE_FRESH:
            return 0
        return max(0, p.in_flight - self.own_at_probe)

    def finish_cost(self, now: float) -> float:
        """Where a request should finish first: Linkerd's peak-EWMA RTT x (requests ahead
        of it + 1), counting this caller's in-flight requests and, as Prequal does, the
        callee's reported requests in flight from other callers. While its last request
        failed, the RTT is at least the failure penalty: a pod refusing connections answers
        fastest of all, and must not look like the place to finish first."""
        rtt = self.peak.value(now)
        if self.consecutive_failures:
            rtt = max(rtt, self.failure_penalty)
        return rtt * (self.in_flight + self.others_in_flight(now) + 1)

    def latency_estimate(self, fallback: float) -> float:
        """Expected latency of the next request here (mean EWMA; ``fallback`` if never seen),
        inflated by the upstream's piggybacked congestion level (C3-style feedback)."""
        base = fallback if self.latency.value is None else self.latency.value
        return base * (1.0 + self.congestion)

    def take_tick(self, now: float) -> tuple[int, float]:
        """Return (requests, mean cost) observed since the last tick, and reset; the tick's
        own outcomes go into :attr:`outcome_mean` (their mean, one step at ``now``)."""
        n, total = self.tick_count, self.tick_cost_sum
        self.tick_count, self.tick_cost_sum = 0, 0.0
        if self.own_count:
            if self.outcome_mean is None:
                self.outcome_mean = Ewma(self.latency.tau)
            self.tick_own_mean = self.own_cost_sum / self.own_count
            self.outcome_mean.update(self.tick_own_mean, now)
            self.own_count, self.own_cost_sum = 0, 0.0
        else:
            self.tick_own_mean = math.inf
        return n, (total / n if n else 0.0)


LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 2.0, 5.0,
)
"""Upper bounds (seconds) of the latency buckets of an :class:`EpochWindow`, and of the
sidecar's latency histogram: 1 ms .. 5 s, the proxy's own overhead at the bottom, the seed's
bad pod (500 ms) mid-way."""


@dataclass(slots=True)
class EpochWindow:
    """What one endpoint did in one epoch: requests, failures, and the latency distribution of
    the answered ones, in fixed buckets (bounded memory whatever the request rate).

    A request counts as answered when a response head arrived, whatever its status; failures
    (``ok`` False) include answered 5xx. Quantiles are read as the upper bound of the bucket
    that holds them, as a Prometheus histogram would give them.
    """

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    requests: int = 0
    failures: int = 0
    answered: int = 0
    latency_sum: float = 0.0
    counts: list[int] = field(default_factory=list)  # per bound, then one above them all

    def observe(self, latency: float, ok: bool, answered: bool) -> None:
        """One finished request (``latency`` in seconds from sending it)."""
        self.requests += 1
        if not ok:
            self.failures += 1
        if not answered or not math.isfinite(latency):
            return
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)
        self.counts[bisect.bisect_left(self.bounds, latency)] += 1
        self.answered += 1
        self.latency_sum += latency

    def mean(self) -> float | None:
        """Mean latency of the answered requests; None if none was answered."""
        return self.latency_sum / self.answered if self.answered else None

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding quantile ``q`` of the answered latencies; None if
        none was answered or it lies above the last bound."""
        if not self.answered:
            return None
        cumulative = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            cumulative += count
            if cumulative >= q * self.answered:
                return bound
        return None


class EpochWindows:
    """One upstream's :class:`EpochWindow` per endpoint, taken (and restarted) once an epoch."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self._windows: dict[str, EpochWindow] = {}

    def observe(self, endpoint: str, latency: float, ok: bool, answered: bool) -> None:
        window = self._windows.get(endpoint)
        if window is None:
            window = self._windows[endpoint] = EpochWindow(self.bounds)
        window.observe(latency, ok, answered)

    def take(self) -> dict[str, EpochWindow]:
        """The windows since the previous take (endpoints with no request are absent)."""
        taken, self._windows = self._windows, {}
        return taken
