"""What the signaler knows about one upstream, and the plan it draws from that each epoch.

Owns: :class:`UpstreamView` (the latest regret summary of each sidecar, a bounded history of
(load, latency) observations per endpoint, latency models fitted from it, and the CE gap read
from the sidecars' regrets) and :func:`make_plan` (solve the correlated-equilibrium program,
sample one configuration, deal its tokens to the sidecars as private weights). Pure: no Redis,
no asyncio, no clock (``now`` is passed in), no global RNG (a ``numpy.random.Generator`` is).

The rules, each a safety rail of the plan (why each is there and what was tried instead:
docs/signaling.md, "How the plan is made"; the herding runs behind them: docs/benchmarks.md):

1. Observations. Each epoch the fresh summaries give one observation per endpoint: load = the
   sum over sidecars of rate x share there; latency = the request-weighted mean plus
   ``failure_penalty`` x the failure rate. ``d + 1/(mu - load)`` (:mod:`signaler.latency_model`)
   is fitted over the last ``history`` observations with the previous fit as prior; an endpoint
   never observed borrows the others' median model. An endpoint that no request reached in
   more than ``forget_epochs`` epochs in which others were observed is forgotten (history and
   fit) and planned as one never observed: what was learned of it is that old, and nothing
   newer will come while the plan keeps it out (the sidecars' probes, not requests, explore
   it). Each
   sidecar still holds the plan against its own evidence (:mod:`mesh.policies`, a
   recommendation contradicted by fresh outcomes or probe answers is overruled), and its
   ramp governs how fast traffic comes back. Each time it is forgotten again without having
   been observed for ``forget_epochs`` epochs in a row since (used, not just looked at), the
   wait doubles (at most 16x): a pod still slow, whose callers have no probes to hold it
   back, is tried less and less often. When an endpoint's latest observations (at least
   :data:`CHANGED_EPOCHS`, with :data:`CHANGED_REQUESTS` requests) are each
   :data:`CHANGED_FACTOR` times faster than its fit at their loads, it changed (a pod that
   healed): the history before them is dropped and the fit starts again from them.
2. Trust region (:meth:`UpstreamView.capacity_cap`, :func:`capped`). ``mu`` is capped at
   ``capacity_headroom`` x the busiest load seen (at least an even share of the demand), and
   never below ``x + 1/l`` for that busiest observation (load ``x``, latency ``l``), so the cap
   never contradicts it. The capped curve keeps the fit's latency at the busiest load and
   lowers ``d`` instead.
3. A queue that was seen bounds the capacity, and wins over rule 2
   (:meth:`UpstreamView.queueing_bound`): ``d`` is at most the lowest latency in the history,
   ``l_min``, so an observation at ``QUEUED`` x the median latency over ``QUEUED_REQUESTS``
   requests or more allows at most ``mu = x + 1/(l - l_min)``.
4. Pooling (:func:`pool_indifferent`). Endpoints whose fitted latency at their current load is
   within ``max(indifference_abs, indifference x fastest)`` of their group's fastest member
   share one model (mean ``d``, smallest ``mu``): the sidecars' own indifference margin
   (:class:`mesh.regret.RoutingRegret`'s ``tolerance``/``tolerance_abs``, an epsilon-CE). With
   symmetric, strictly convex costs the even split over a group is the cheapest configuration.
5. The program: the best correlated equilibrium over token configurations
   (:class:`signaler.lp.CorrelatedEquilibriumLP`; Papadimitriou & Roughgarden, JACM 2008),
   past its size guard by column generation (:mod:`signaler.column_generation`): still a CE.
6. Stability (:func:`keep_previous`, :func:`still_apportions`, :func:`in_support`). The previous
   distribution is kept while, under the new models, its CE gap is at most ``stability`` x a
   token's mean latency and its cost at most ``1 + stability`` x the new optimum; the sidecars'
   token counts are kept while they still round their demand quotas; the configuration is
   re-drawn with probability ``refresh`` per epoch, else kept while in the support (a lazy
   chain whose stationary law is the distribution); the deal is steady
   (:func:`signaler.tokens.steady_deal`), and every token is still told endpoint ``j`` with
   probability ``c_j / n``.
7. The CE gap: the largest positive conditional regret D(j, k) over fresh summaries. D(j, k) is
   the sidecar's correlated-equilibrium constraint evaluated at its empirical play (Hart &
   Mas-Colell 2000, Econometrica 68(5)), so it is a live distance from a CE.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from operator import attrgetter

import numpy as np

from signaler.latency_model import LatencyModel, fit_latency_model
from signaler.lp import DEFAULT_MAX_CONFIGURATIONS, CorrelatedEquilibriumLP
from signaler.routing_game import ce_gap, configuration_costs, latency_table
from signaler.solution import CESolution
from signaler.tokens import quantise_demand, sample_configuration, steady_deal
from wire.summary import RegretSummary

DEFAULT_HISTORY = 60
#: Epochs without an observation of an endpoint (while others are observed) after which its
#: history and fit are forgotten (rule 1); doubled for each time it was forgotten again since
#: it was last used, up to 2**MAX_FORGET_DOUBLINGS times.
DEFAULT_FORGET_EPOCHS = 10
MAX_FORGET_DOUBLINGS = 4
#: Observations in a row, each this many times faster than the fit, after which the history
#: before them is dropped (rule 1: the endpoint changed, say a pod healed).
CHANGED_EPOCHS = 5
CHANGED_REQUESTS = 20
CHANGED_FACTOR = 3.0
DEFAULT_FAILURE_PENALTY = 1.0
DEFAULT_CAPACITY_HEADROOM = 1.5
DEFAULT_STABILITY = 0.02
#: An observation shows a queue when its latency is at least QUEUED times the endpoint's median
#: in the history, over at least QUEUED_REQUESTS requests (UpstreamView.queueing_bound).
QUEUED = 2.0
QUEUED_REQUESTS = 20
DEFAULT_REFRESH = 0.25
#: The sidecars' indifference margin (mesh.regret.RoutingRegret's tolerance, tolerance_abs).
DEFAULT_INDIFFERENCE = 0.10
DEFAULT_INDIFFERENCE_ABS = 0.001
#: Model of an endpoint before anything is known about the fleet (5 ms, 1000 req/s).
FALLBACK_MODEL = LatencyModel(d=0.005, mu=1000.0)


class NoDemand(Exception):
    """Nothing to plan: no fresh summary reports traffic (not an error, nothing is published)."""


#: Clashes within the freshness window that make a sidecar id shared
#: (:meth:`UpstreamView.shared_ids`): two writers clash every epoch; a sidecar restarted
#: within an epoch, a clock stepped back, or a round retried after a Redis timeout that had
#: appended its summary, once each
SHARED_ID_CLASHES = 3


def two_writers(a: RegretSummary, b: RegretSummary) -> bool:
    """Whether two summaries of one sidecar id cannot both come from one process. A sidecar
    publishes once an epoch, numbered by its own clock (``wall // epoch``), at least an
    epoch apart: two sent at different times in the same epoch, or in epochs ordered against
    their sending times, had two writers (the same entry read twice has one ``sent_at``)."""
    if a.sent_at == b.sent_at:
        return False
    return a.epoch == b.epoch or (a.epoch < b.epoch) != (a.sent_at < b.sent_at)


@dataclass(frozen=True, slots=True)
class Observation:
    load: float
    latency: float
    weight: float


@dataclass(slots=True)
class UpstreamView:
    """The signaler's knowledge of one upstream (see the module docstring)."""

    upstream: str
    freshness: float
    history: int = DEFAULT_HISTORY
    failure_penalty: float = DEFAULT_FAILURE_PENALTY
    #: epochs with observations, none of an endpoint, after which it is forgotten (rule 1)
    forget_epochs: int = DEFAULT_FORGET_EPOCHS
    latest: dict[str, RegretSummary] = field(default_factory=dict)
    observations: dict[str, deque[Observation]] = field(default_factory=dict)
    models: dict[str, LatencyModel] = field(default_factory=dict)
    _dirty: bool = False
    #: each kept summary's largest positive off-diagonal regret (computed once, on offer)
    _gaps: dict[str, float] = field(default_factory=dict)
    #: (now, number of changes to ``latest``) -> the fresh summaries then (one sort per epoch)
    _fresh: tuple[float, int, list[RegretSummary]] | None = None
    _changes: int = 0
    #: for each endpoint with a history: epochs in a row (with observations) it was missing
    #: from (< 0: -epochs in a row it was in); times it was forgotten since it was last used
    _missed: dict[str, int] = field(default_factory=dict)
    _forgotten: dict[str, int] = field(default_factory=dict)
    #: for each sidecar id, when (the later ``sent_at``) two of its summaries could not have
    #: come from one process (:func:`two_writers`): the newest few
    _clashes: dict[str, deque[float]] = field(default_factory=dict)

    def offer(self, summary: RegretSummary) -> bool:
        """Keep ``summary`` if it is the sidecar's newest; True if it was kept."""
        if summary.upstream != self.upstream:
            raise ValueError(f"summary for {summary.upstream!r} offered to {self.upstream!r}")
        current = self.latest.get(summary.sidecar)
        if current is not None and two_writers(current, summary):
            clashes = self._clashes.get(summary.sidecar)
            if clashes is None:
                clashes = self._clashes[summary.sidecar] = deque(maxlen=SHARED_ID_CLASHES)
            clashes.append(max(current.sent_at, summary.sent_at))
        if current is not None and (summary.sent_at, summary.epoch) <= (
            current.sent_at, current.epoch
        ):
            return False
        self.latest[summary.sidecar] = summary
        self._gaps[summary.sidecar] = _largest_regret(summary.regret)
        self._dirty = True
        self._changes += 1
        return True

    def shared_ids(self, now: float) -> list[str]:
        """Sidecar ids under which two processes publish: ids with
        :data:`SHARED_ID_CLASHES` clashes (:func:`two_writers`) within ``freshness`` seconds
        of ``now``. A clash now and then is a sidecar restarted within an epoch, or a clock
        stepped back; two sidecars under one id clash every epoch (freshness is several
        epochs). Older clashes are forgotten here."""
        shared: list[str] = []
        for sidecar, clashes in list(self._clashes.items()):
            while clashes and now - clashes[0] > self.freshness:
                clashes.popleft()
            if not clashes:
                del self._clashes[sidecar]
            elif len(clashes) >= SHARED_ID_CLASHES:
                shared.append(sidecar)
        return sorted(shared)

    def fresh(self, now: float) -> list[RegretSummary]:
        """Summaries sent within ``freshness`` seconds of ``now``, by sidecar id; older ones
        are forgotten (a sidecar that stopped reporting is no longer planned for)."""
        cached = self._fresh
        if cached is not None and cached[0] == now and cached[1] == self._changes:
            return list(cached[2])
        for sidecar, summary in list(self.latest.items()):
            if now - summary.sent_at > self.freshness:
                del self.latest[sidecar]
                del self._gaps[sidecar]
                self._changes += 1
        out = [self.latest[s] for s in sorted(self.latest)]
        self._fresh = (now, self._changes, out)
        return list(out)

    def endpoints(self, now: float) -> tuple[str, ...]:
        """The union of the fresh summaries' endpoints, in first-seen order."""
        seen: dict[str, None] = {}
        for endpoints in dict.fromkeys(summary.endpoints for summary in self.fresh(now)):
            for endpoint in endpoints:
                seen.setdefault(endpoint, None)
        return tuple(seen)

    def observe(self, now: float) -> None:
        """Fold the summaries received since the last call into one observation per endpoint
        and refit the models of the endpoints that got one.

        The sums run over arrays, one per group of sidecars that report the same endpoint list
        (usually one group: every caller of a service sees the same pods)."""
        if not self._dirty:
            return
        self._dirty = False
        load: dict[str, float] = {}
        latency_sum: dict[str, float] = {}
        count: dict[str, float] = {}
        for endpoints, members in by_endpoints(self.fresh(now)).items():
            requests, failures, means = columns(  # None -> nan
                members, ("requests", "failures", "latency_mean")).transpose(1, 0, 2)
            demand = np.array([s.demand for s in members], dtype=float)
            totals = requests.sum(axis=1)
            used = (requests > 0) & ~np.isnan(means) & (totals > 0)[:, None]
            safe = np.where(used, requests, 1.0)
            charged = np.where(used, means + self.failure_penalty * failures / safe, 0.0)
            share = np.where(used, requests / np.where(totals > 0, totals, 1.0)[:, None], 0.0)
            loads = (demand[:, None] * share).sum(axis=0)
            sums = (charged * np.where(used, requests, 0.0)).sum(axis=0)
            counts = np.where(used, requests, 0.0).sum(axis=0)
            for j in np.flatnonzero(used.any(axis=0)).tolist():
                endpoint = endpoints[j]
                load[endpoint] = load.get(endpoint, 0.0) + float(loads[j])
                latency_sum[endpoint] = latency_sum.get(endpoint, 0.0) + float(sums[j])
                count[endpoint] = count.get(endpoint, 0.0) + float(counts[j])
        for endpoint, weight in count.items():
            series = self.observations.setdefault(endpoint, deque(maxlen=self.history))
            series.append(Observation(load[endpoint], latency_sum[endpoint] / weight, weight))
            self._if_it_changed(endpoint, series)
            self._refit(endpoint)
        if count:
            self._forget_unobserved(count, now)

    def _if_it_changed(self, endpoint: str, series: deque[Observation]) -> None:
        """Rule 1: when the latest observations of ``endpoint``, at least
        :data:`CHANGED_EPOCHS` of them holding :data:`CHANGED_REQUESTS` requests or more,
        were each :data:`CHANGED_FACTOR` times faster than its fit says it is at their
        loads, it is not the endpoint its fit describes (a pod that healed): only they are
        kept, and the fit starts from them without the old one as its prior. (The requests: a
        pod slow on half of its requests, reached a request or two an epoch, has a run of
        fast epochs now and then.) The fit, not the old observations, is the yardstick: a
        fit skewed by a queue's drain (its backlog charged at the lower load that followed)
        is dropped too, with the bound that drain set, which starved the pod (a review
        found no other case in the herding setting, and the simulator's herding runs the
        same before and after)."""
        model = self.models.get(endpoint)
        if model is None or len(series) <= CHANGED_EPOCHS:
            return
        taken, requests = 0, 0.0
        for o in reversed(series):
            if o.latency * CHANGED_FACTOR >= float(model.latency(o.load)):
                return
            taken += 1
            requests += o.weight
            if taken >= CHANGED_EPOCHS and requests >= CHANGED_REQUESTS:
                break
        else:
            return  # the whole history is that fast: nothing older to drop
        if taken < len(series):
            recent = list(itertools.islice(series, len(series) - taken, None))
            series.clear()
            series.extend(recent)
            del self.models[endpoint]

    def _forget_unobserved(self, observed: Mapping[str, float], now: float) -> None:
        """An epoch with observations (of the endpoints in ``observed``): forget the endpoints
        missing from more than ``forget_epochs`` of them in a row, doubled for each time they
        were forgotten since they were last used (rule 1)."""
        missed, forgotten = self._missed, self._forgotten
        for endpoint in list(self.observations):
            if endpoint in observed:
                run = missed[endpoint] = min(missed.get(endpoint, 0), 0) - 1
                if -run >= self.forget_epochs:
                    forgotten.pop(endpoint, None)  # used: the next wait starts short again
                continue
            run = missed[endpoint] = max(missed.get(endpoint, 0), 0) + 1
            times = forgotten.get(endpoint, 0)
            if run > self.forget_epochs << min(times, MAX_FORGET_DOUBLINGS):
                del self.observations[endpoint], missed[endpoint]
                self.models.pop(endpoint, None)
                forgotten[endpoint] = times + 1
        if len(forgotten) > 64:  # bounded: those no sidecar lists any more go
            listed = set(self.endpoints(now))
            for endpoint in [e for e in forgotten if e not in listed]:
                del forgotten[endpoint]

    def _refit(self, endpoint: str) -> None:
        series = self.observations[endpoint]
        # A fit that fails keeps the previous model (or the fallback) rather than fail the epoch.
        with contextlib.suppress(ValueError):
            self.models[endpoint] = fit_latency_model(
                [o.load for o in series],
                [o.latency for o in series],
                weights=[o.weight for o in series],
                prior=self.models.get(endpoint),
            )

    def model_for(self, endpoint: str) -> LatencyModel:
        """The fitted model, or the median of the known ones, or :data:`FALLBACK_MODEL`."""
        model = self.models.get(endpoint)
        if model is not None:
            return model
        known = list(self.models.values())
        if not known:
            return FALLBACK_MODEL
        return LatencyModel(
            d=float(np.median([m.d for m in known])), mu=float(np.median([m.mu for m in known]))
        )

    def current_load(self, endpoint: str, default: float) -> float:
        """The load (req/s) of ``endpoint``'s latest observation, ``default`` if never seen."""
        series = self.observations.get(endpoint)
        return series[-1].load if series else default

    def peak_load(self, endpoint: str) -> float:
        """The largest load (req/s) ``endpoint`` was observed under in the history (0 if none)."""
        return max((o.load for o in self.observations.get(endpoint, ())), default=0.0)

    def capacity_cap(self, endpoint: str, even_share: float, headroom: float) -> float:
        """The largest capacity a plan may assume for ``endpoint`` (rule 2 of the module):
        ``headroom`` x max(busiest load seen, ``even_share``), but never below what the busiest
        observation implies (``load + 1/latency``) -- unless a queue was seen
        (:meth:`queueing_bound`), which caps it whatever else was observed."""
        series = self.observations.get(endpoint)
        if not series:
            return headroom * even_share
        busiest = max(series, key=lambda o: o.load)
        implied = busiest.load + 1.0 / max(busiest.latency, 1e-6)
        return min(max(headroom * max(busiest.load, even_share), implied),
                   self.queueing_bound(endpoint))

    def queueing_bound(self, endpoint: str) -> float:
        """The capacity the queues seen in the history allow ``endpoint`` at most (inf if it
        never queued).

        Under the model every latency is at least ``d``, so ``d`` is at most the lowest latency
        in the history, ``l_min``; an observation of latency ``l`` at load ``x`` then says
        ``mu = x + 1/(l - d) <= x + 1/(l - l_min)``. Only observations that clearly show a
        queue count -- latency at least ``QUEUED`` times the endpoint's median latency in the
        history, over at least ``QUEUED_REQUESTS`` requests -- so the noise of a pod with long,
        variable service times (a mean of 20 requests of an 80 ms exponential service varies
        by +-18 ms) bounds nothing.
        """
        series = self.observations.get(endpoint)
        if not series:
            return math.inf
        floor = min(o.latency for o in series)
        typical = float(np.median([o.latency for o in series]))
        return min((o.load + 1.0 / (o.latency - floor) for o in series
                    if o.latency >= QUEUED * typical and o.latency > floor
                    and o.weight >= QUEUED_REQUESTS), default=math.inf)

    def regret_gap(self, now: float) -> float:
        """The largest positive conditional regret D(j, k), j != k, over fresh summaries."""
        gaps = self._gaps
        return max((gaps[s.sidecar] for s in self.fresh(now)), default=0.0)


def by_endpoints(summaries: Sequence[RegretSummary]) -> dict[tuple[str, ...], list[RegretSummary]]:
    """``summaries`` grouped by endpoint list, in order (usually one group: every caller of a
    service sees the same pods), for sums over arrays of one shape."""
    groups: dict[tuple[str, ...], list[RegretSummary]] = {}
    for summary in summaries:
        groups.setdefault(summary.endpoints, []).append(summary)
    return groups


def columns(members: Sequence[RegretSummary], names: Sequence[str]) -> np.ndarray:
    """Per-endpoint fields of summaries over the same endpoint list as one float array
    (members x fields x endpoints; None -> nan), converted flat in one pass over the
    summaries (numpy reads a flat list several times faster than nested tuples)."""
    get = attrgetter(*names)
    rows = map(get, members) if len(names) > 1 else ((get(s),) for s in members)
    return np.array(list(chain.from_iterable(chain.from_iterable(rows))),
                    dtype=float).reshape(len(members), len(names), -1)


def _largest_regret(regret: Sequence[Sequence[float]]) -> float:
    """The largest positive off-diagonal entry of a regret matrix (0 if none).

    Read once per summary kept: the largest entry of all is found in C, and only when it
    also stands on the diagonal (a sidecar's D(j, j) is 0, so rarely) are the rows walked."""
    if not regret or not all(regret):
        return 0.0
    top = max(map(max, regret))
    if top <= 0.0:
        return 0.0
    if all(row[j] != top for j, row in enumerate(regret)):
        return top
    gap = 0.0
    for j, row in enumerate(regret):
        for k, value in enumerate(row):
            if j != k and value > gap:
                gap = value
    return gap


@dataclass(frozen=True, slots=True)
class Plan:
    """One epoch's plan for one upstream: the solution, the sampled configuration, and each
    sidecar's private weights over its own endpoints."""

    upstream: str
    endpoints: tuple[str, ...]
    models: tuple[LatencyModel, ...]
    solution: CESolution
    configuration: tuple[int, ...]
    tokens: Mapping[str, int]
    weights: Mapping[str, Mapping[str, float]]
    sidecar_endpoints: Mapping[str, tuple[str, ...]]
    kept_distribution: bool = False
    kept_deal: bool = False
    #: Each sidecar's tokens per endpoint index (into ``endpoints``): the deal, private to it.
    deal: Mapping[str, Mapping[int, int]] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """The solver outcome as a protocol status token (``optimal``, ``system-optimum``...)."""
        if self.solution.method == "system-optimum" and self.solution.status == "optimal":
            return "system-optimum"
        return self.solution.status  # optimal, optimal_inaccurate, trivial, overloaded


def capped(model: LatencyModel, mu_cap: float, anchor: float = 0.0) -> LatencyModel:
    """``model`` with its capacity lowered to ``mu_cap`` if above it, still passing through its
    own latency at the load ``anchor`` (the busiest load the endpoint was seen under).

    Lowering ``mu`` alone would add ``1/(mu_cap - anchor) - 1/(mu - anchor)`` of queueing at a
    load where none was measured: an endpoint seen flat at 42 ms under 50 req/s, capped at
    82 req/s with its ``d`` kept, would be priced at 73 ms where it answers in 42, and the plan
    would push its tokens onto the others. So the fixed delay gives way instead:
    ``d' = latency(anchor) - 1/(mu_cap - anchor)`` (at least 0), and the capped curve agrees
    with the fit where the fit was measured and only climbs faster beyond it.
    """
    if model.mu <= mu_cap:
        return model
    anchor = min(max(anchor, 0.0), model.knee * mu_cap)
    d = float(model.latency(anchor)) - 1.0 / (mu_cap - anchor)
    return LatencyModel(d=max(d, 0.0), mu=mu_cap, knee=model.knee)


def pool_indifferent(
    models: Sequence[LatencyModel],
    latencies: Sequence[float],
    indifference: float = DEFAULT_INDIFFERENCE,
    indifference_abs: float = DEFAULT_INDIFFERENCE_ABS,
) -> tuple[LatencyModel, ...]:
    """``models`` with the endpoints that are equally good within the sidecars' margin sharing
    one model (rule 4 of the module): grouped greedily by ``latencies`` (each endpoint's
    fitted latency at its current load), each group anchored at its fastest member and holding
    those within ``max(indifference_abs, indifference x fastest latency)`` of it; a group's
    common model has its mean ``d`` and its smallest ``mu``. Endpoints alone in their group
    keep their model."""
    if len(models) != len(latencies):
        raise ValueError(f"{len(models)} models but {len(latencies)} latencies")
    if indifference < 0 or indifference_abs < 0:
        raise ValueError("indifference margins must be >= 0")
    latency = [float(x) for x in latencies]
    order = sorted(range(len(models)), key=lambda j: (latency[j], j))
    pooled = list(models)
    start = 0
    while start < len(order):
        fastest = latency[order[start]]
        margin = max(indifference_abs, indifference * fastest)
        end = start + 1
        while end < len(order) and latency[order[end]] - fastest <= margin:
            end += 1
        group = order[start:end]
        if len(group) > 1:
            common = LatencyModel(
                d=math.fsum(models[j].d for j in group) / len(group),
                mu=min(models[j].mu for j in group),
                knee=models[group[0]].knee,
            )
            for j in group:
                pooled[j] = common
        start = end
    return tuple(pooled)


def _normalised(weights: Sequence[float]) -> list[float]:
    total = math.fsum(weights)
    out = [w / total for w in weights]
    # Put the last rounding error on the largest weight so the sum is 1 to the last bit.
    largest = max(range(len(out)), key=out.__getitem__)
    out[largest] += 1.0 - math.fsum(out)
    return [min(max(w, 0.0), 1.0) for w in out]


def sidecar_weights(
    own_endpoints: Sequence[str],
    share: Mapping[int, float],
    index: Mapping[str, int],
    marginal: np.ndarray,
) -> list[float]:
    """A sidecar's weights over its own endpoints from its dealt ``share`` (endpoint index ->
    fraction); falls back to the plan's marginal when the share misses all its endpoints."""
    raw = [share.get(index[e], 0.0) if e in index else 0.0 for e in own_endpoints]
    if math.fsum(raw) <= 0:
        raw = [float(marginal[index[e]]) if e in index else 0.0 for e in own_endpoints]
    if math.fsum(raw) <= 0:
        raw = [1.0] * len(own_endpoints)
    return _normalised(raw)


def keep_previous(
    previous: CESolution,
    fresh: CESolution,
    models: Sequence[LatencyModel],
    token_load: float,
    stability: float,
) -> CESolution | None:
    """``previous`` re-priced under ``models`` if it is still a good plan (rule 6 of the
    module), else None."""
    if previous.n_tokens != fresh.n_tokens or previous.n_endpoints != fresh.n_endpoints:
        return None
    n = fresh.n_tokens
    if n == 0:
        return None
    table = latency_table(models, n + 1, token_load)
    cost = float(previous.probabilities @ configuration_costs(previous.configurations, table))
    gap = ce_gap(previous.configurations, previous.probabilities, table)
    if cost > fresh.objective * (1.0 + stability) or gap > stability * fresh.objective / n:
        return None
    return dataclasses.replace(
        previous, objective=cost, ce_gap=gap, status=fresh.status, method=fresh.method,
        solve_seconds=fresh.solve_seconds, n_variables=fresh.n_variables,
        n_constraints=fresh.n_constraints,
    )


def still_apportions(previous: Mapping[str, int], rates: Mapping[str, float], n: int) -> bool:
    """Whether ``previous`` token counts are still a valid apportionment of ``n`` tokens to
    ``rates``: the same sidecars, the right total, every count within one token of its quota,
    and at least one token for every sidecar with demand."""
    total = math.fsum(rates.values())
    if set(previous) != set(rates) or sum(previous.values()) != n or total <= 0:
        return False
    for sidecar, rate in rates.items():
        count = previous[sidecar]
        if (rate > 0) != (count > 0) or abs(count - rate / total * n) >= 1.0:
            return False
    return True


def in_support(solution: CESolution, configuration: Sequence[int]) -> bool:
    """Whether ``configuration`` has positive probability in ``solution``."""
    rows = np.all(solution.configurations == np.asarray(configuration), axis=1)
    return bool(rows.any() and solution.probabilities[rows].sum() > 0)


def make_plan(
    view: UpstreamView,
    now: float,
    n_tokens: int,
    rng: np.random.Generator,
    *,
    previous: Plan | None = None,
    max_configurations: int = DEFAULT_MAX_CONFIGURATIONS,
    capacity_headroom: float = DEFAULT_CAPACITY_HEADROOM,
    stability: float = DEFAULT_STABILITY,
    refresh: float = DEFAULT_REFRESH,
    indifference: float = DEFAULT_INDIFFERENCE,
    indifference_abs: float = DEFAULT_INDIFFERENCE_ABS,
) -> Plan:
    """Solve this epoch's program for ``view`` and deal a sampled configuration.

    The fresh sidecars' demands (requests/s) are quantised into ``n_tokens`` tokens (more when
    more sidecars have demand, so each gets one); each token carries the total demand divided by
    the tokens; each capacity is capped at ``capacity_headroom`` times the largest load the
    endpoint was seen under, or an even share of the demand; endpoints within the
    ``indifference`` margin of each other share one model (:func:`pool_indifferent`); the deal
    moves as few of each sidecar's tokens as the sampled configuration forces (rule 6 of the
    module).

    Raises :class:`NoDemand` when no fresh sidecar sends traffic, and lets
    :class:`~signaler.solution.SolverError` propagate (the caller keeps its previous plan).
    """
    if n_tokens < 1:
        raise ValueError("n_tokens must be >= 1")
    view.observe(now)
    fresh = view.fresh(now)
    endpoints = view.endpoints(now)
    rates = {s.sidecar: s.demand for s in fresh}
    total = math.fsum(rates.values())
    if not fresh or not endpoints or total <= 0:
        raise NoDemand(f"no fresh summary with demand for {view.upstream!r}")
    active = sum(1 for r in rates.values() if r > 0)
    n = max(n_tokens, active)
    tokens = quantise_demand(rates, n)
    if previous is not None and still_apportions(previous.tokens, rates, n):
        tokens = dict(previous.tokens)
    even_share = total / len(endpoints)
    fitted = [view.model_for(e) for e in endpoints]
    models = pool_indifferent(
        [capped(m, view.capacity_cap(e, even_share, capacity_headroom), view.peak_load(e))
         for e, m in zip(endpoints, fitted, strict=True)],
        [float(m.latency(view.current_load(e, even_share)))
         for e, m in zip(endpoints, fitted, strict=True)],
        indifference, indifference_abs,
    )
    token_load = total / n
    solution = CorrelatedEquilibriumLP(
        models, n, token_load, max_configurations=max_configurations
    ).solve()
    same_game = previous is not None and previous.endpoints == endpoints
    kept = None
    if same_game and previous is not None:
        kept = keep_previous(previous.solution, solution, models, token_load, stability)
    solution = kept or solution
    counts = tuple(int(c) for c in sample_configuration(solution, rng))
    if (same_game and previous is not None and rng.random() >= refresh
            and in_support(solution, previous.configuration)):
        counts = previous.configuration
    own = {s.sidecar: s.endpoints for s in fresh}
    index = {e: i for i, e in enumerate(endpoints)}
    held: dict[str, dict[int, int]] = {}
    if previous is not None:
        # Carry each sidecar's holdings over by endpoint name (the endpoint set may change).
        for sidecar, holding in previous.deal.items():
            held[sidecar] = {
                index[previous.endpoints[j]]: c for j, c in holding.items()
                if 0 <= j < len(previous.endpoints) and previous.endpoints[j] in index
            }
    deal = steady_deal(np.array(counts, dtype=np.int64), tokens, held, rng)
    kept_deal = (
        previous is not None and same_game and own == dict(previous.sidecar_endpoints)
        and deal == {s: dict(h) for s, h in previous.deal.items()}
    )
    marginal = solution.marginal()
    weights: dict[str, dict[str, float]] = {}
    # many sidecars hold the same endpoints and the same tokens: each distinct pair once
    known: dict[tuple[tuple[str, ...], tuple[tuple[int, int], ...]], dict[str, float]] = {}
    for summary in fresh:
        holding = deal.get(summary.sidecar, {})
        key = (summary.endpoints, tuple(sorted(holding.items())))
        mine = known.get(key)
        if mine is None:
            count = sum(holding.values())
            share = {j: c / count for j, c in holding.items()} if count else {}
            ws = sidecar_weights(summary.endpoints, share, index, marginal)
            mine = known[key] = dict(zip(summary.endpoints, ws, strict=True))
        weights[summary.sidecar] = dict(mine)
    return Plan(
        upstream=view.upstream,
        endpoints=endpoints,
        models=models,
        solution=solution,
        configuration=counts,
        tokens=tokens,
        weights=weights,
        sidecar_endpoints=own,
        kept_distribution=kept is not None,
        kept_deal=kept_deal,
        deal=deal,
    )
