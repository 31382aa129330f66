"""The signaler's dashboard frame: the mesh-wide view of every upstream it holds.

Owns turning what the service already keeps -- the latest regret summary of each sidecar
(:class:`signaler.planner.UpstreamView`), the last plan and the leadership per upstream
(:class:`signaler.service.UpstreamStatus`) -- into the frame :mod:`dashboard` draws, once a
second, on the event loop. It reads copies only (a solve may be running in a worker thread) and
never writes to the service, Redis or the planner.

Per upstream, from the fresh summaries (those the planner would use):

* an endpoint's **load** is the sum over sidecars of demand x its share of that sidecar's
  requests (the planner's observation), its **share** that load over the total; its latency
  **p50** the request-weighted mean of the sidecars' p50s, its **p99** the largest sidecar p99
  (a bound, not a merged quantile), its **estimate** the planned curve at its current load; its
  **regret** the largest conditional regret D(j, k) any sidecar reports for it (the sidecars'
  quantiles are the upper bounds of their fixed latency buckets, :mod:`mesh.estimators`, so
  p50 and p99 move in steps);
* the **Nash gap** is the Wardrop gap of the shares under the measured mean latencies
  (:func:`mesh.nash.wardrop_gap`), the **CE gap** the largest positive D(j, k) over sidecars
  (the one the planner reads), the plan's CE gap the program's own;
* a sidecar **follows** when the weights it reports are within :data:`FOLLOW_DISTANCE` (total
  variation) of one of the last recommendations it was dealt; otherwise it routes by its own
  learning (a fallback, or a recommendation it rejected). The frame counts them all
  (``sidecars_total``, ``sidecars_following``) and lists at most :data:`SIDECARS_SHOWN`: those
  that do not follow first, then the largest demands (a page cannot show a thousand rows, and
  the five minutes of frames the feed keeps stay small);
* the **distance from the system optimum** is the cost ``sum_j x_j l_j(x_j)`` of the loads
  played over the cost of Beckmann's optimum on the same planned curves at the same total
  demand (Beckmann, McGuire & Winsten 1956; computed exactly over :data:`OPTIMUM_TOKENS`
  tokens, :func:`optimum_counts`), and likewise for the plan
  (its expected cost over the optimum with its own tokens).

Policing is not in the signaling plane (inbound sidecars report it on their own dashboards),
so the signaler's frame says so in ``note`` and lists none.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from mesh.nash import wardrop_gap
from signaler.latency_model import LatencyModel
from signaler.planner import Plan, by_endpoints, columns
from signaler.routing_game import configuration_costs, latency_table
from wire.summary import RegretSummary

if TYPE_CHECKING:
    from signaler.service import SignalerService

FOLLOW_DISTANCE = 0.1
"""Total variation between reported and recommended weights under which a sidecar follows."""
OPTIMUM_TOKENS = 256
"""Tokens the demand is split into to price the system optimum (error well under 1 %)."""
PLANS_KEPT = 3
"""Recent plans per upstream a sidecar's weights are compared with (its summary lags one)."""
NOTE = "policing is reported by inbound sidecars on their own /dashboard"
SIDECARS_SHOWN = 50
"""Sidecars listed per upstream in a frame (all are counted)."""
Deals = dict[tuple[str, ...], dict[str, tuple[float, ...]]]
"""A plan's deals by endpoint list: list -> sidecar -> weights in the list's order."""
_NEAR = 1e-9
"""How near :data:`FOLLOW_DISTANCE` a distance summed by numpy is summed again exactly."""


def _opt(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def optimum_counts(table: np.ndarray, n_tokens: int) -> np.ndarray:
    """The integer configuration of least total latency over ``table`` (``latency_table``).

    The same answer as :func:`signaler.routing_game.greedy_system_optimum`, vectorised: every
    ``c l(c)`` is convex, so each endpoint's marginal costs ``(c+1) l(c+1) - c l(c)`` increase
    and the optimum takes the ``n`` smallest marginal costs over all endpoints.
    """
    k = table.shape[0]
    if n_tokens <= 0:
        return np.zeros(k, dtype=np.int64)
    c = np.arange(n_tokens + 1, dtype=float)
    total = c[None, :] * table[:, : n_tokens + 1]
    marginal = np.diff(total, axis=1).ravel()
    chosen = np.argpartition(marginal, n_tokens - 1)[:n_tokens]
    return np.bincount(chosen // n_tokens, minlength=k).astype(np.int64)


def optimum_cost(models: Sequence[LatencyModel], demand: float,
                 tokens: int = OPTIMUM_TOKENS) -> float:
    """The smallest total latency ``sum_j x_j l_j(x_j)`` (req/s x s) of ``demand`` over
    ``models``, over splits into ``tokens`` equal parts (exact for that grid)."""
    if demand <= 0 or not models:
        return 0.0
    lam = demand / tokens
    table = latency_table(models, tokens, lam)
    counts = optimum_counts(table, tokens)
    return lam * float(configuration_costs(counts[None, :], table)[0])


def played_cost(models: Sequence[LatencyModel], loads: Sequence[float]) -> float:
    """``sum_j x_j l_j(x_j)`` of the loads ``x`` on ``models`` (req/s x s)."""
    return math.fsum(x * float(m.latency(x)) for m, x in zip(models, loads, strict=True) if x > 0)


def plan_over_optimum(plan: Plan, demand: float) -> float | None:
    """The plan's expected cost over the integer optimum with the same tokens and curves, both
    priced at ``demand`` (req/s; the plan's own distribution re-priced, so a demand that moved
    since the solve does not skew the ratio)."""
    solution = plan.solution
    n = solution.n_tokens
    if n <= 0 or not plan.models or demand <= 0:
        return None
    table = latency_table(plan.models, n + 1, demand / n)
    cost = float(solution.probabilities @ configuration_costs(solution.configurations, table))
    best = float(configuration_costs(optimum_counts(table, n)[None, :], table)[0])
    return _opt(cost / best) if best > 0 else None


def total_variation(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    keys = set(a) | set(b)
    return 0.5 * math.fsum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in keys)


class SignalerDashboard:
    """Builds the signaler's frames from a :class:`~signaler.service.SignalerService`."""

    def __init__(self, service: SignalerService) -> None:
        self.service = service
        self._plans: dict[str, deque[tuple[Plan, Deals]]] = {}

    def __call__(self) -> dict[str, Any]:
        started = time.thread_time()
        service = self.service
        now = service.clock()
        names = sorted(set(service.status) | set(service.views))
        for gone in set(self._plans) - set(names):  # an upstream the service forgot
            del self._plans[gone]
        upstreams = [self.upstream(name, now) for name in names]
        service.metrics.cpu_seconds.labels("dashboard").inc(time.thread_time() - started)
        return {"source": "signaler", "id": service.config.signer, "note": NOTE,
                "redis": service.health.redis_ok, "epoch": service.epoch_number,
                "upstreams": upstreams, "policing": []}

    def _recent_plans(self, name: str, plan: Plan | None) -> list[tuple[Plan, Deals]]:
        """The last :data:`PLANS_KEPT` plans of ``name``, each with its deals by list."""
        kept = self._plans.setdefault(name, deque(maxlen=PLANS_KEPT))
        if plan is not None and (not kept or kept[-1][0] is not plan):
            kept.append((plan, dealt_by_list(plan)))
        return list(kept)

    def upstream(self, name: str, now: float) -> dict[str, Any]:
        service = self.service
        status = service.status.get(name)
        plan = status.plan if status is not None else None
        view = service.views.get(name)
        latest = dict(view.latest) if view is not None else {}  # a copy: a solve may run
        freshness = view.freshness if view is not None else 0.0
        fresh = [latest[s] for s in sorted(latest) if now - latest[s].sent_at <= freshness]
        plans = self._recent_plans(name, plan)
        endpoints = list(plan.endpoints) if plan is not None else []
        groups = by_endpoints(fresh)
        for own in groups:  # in the order of the summaries, as each list first appears
            endpoints += [e for e in own if e not in endpoints]
        agg = _aggregate(fresh, endpoints, groups)
        total = math.fsum(agg["load"])
        shares = [x / total if total > 0 else 0.0 for x in agg["load"]]
        models = _models(plan, view.models if view is not None else {}, endpoints)
        rows = []
        for j, endpoint in enumerate(endpoints):
            model = models[j]
            tokens = None
            if plan is not None and endpoint in plan.endpoints:
                tokens = int(plan.configuration[plan.endpoints.index(endpoint)])
            rows.append({
                "endpoint": endpoint, "share": shares[j], "regret": agg["regret"][j],
                "latency": {
                    "estimate": None if model is None else _opt(float(
                        model.latency(agg["load"][j]))),
                    "p50": agg["p50"][j], "p99": agg["p99"][j],
                },
                "requests": agg["requests"][j], "failures": agg["failures"][j],
                "tokens": tokens,
            })
        costs = np.array([np.nan if m is None else m for m in agg["mean"]], dtype=float)
        nash = wardrop_gap(np.array(shares), np.where(np.isnan(costs), np.inf, costs)) \
            if total > 0 else None
        out: dict[str, Any] = {
            "name": name,
            "leader": bool(status.leader) if status is not None else None,
            "endpoints": rows,
            "nash_gap": nash,
            # the largest positive D(j, k) over the fresh summaries: the worst endpoint's
            "ce_gap": max((x for x in agg["regret"] if x is not None), default=0.0)
            if fresh else None,
            "plan_ce_gap": plan.solution.ce_gap if plan is not None else None,
            **_sidecars(fresh, [p for p, _ in plans], [d for _, d in plans], groups),
            "plan": None,
        }
        if plan is not None:
            solution = plan.solution
            ratio = None
            if all(m is not None for m in models) and total > 0:
                curves = [m for m in models if m is not None]
                best = optimum_cost(curves, total)
                ratio = _opt(played_cost(curves, agg["load"]) / best) if best > 0 else None
            out["plan"] = {
                "solver": solution.method, "status": plan.status,
                "tokens": solution.n_tokens, "solve_seconds": solution.solve_seconds,
                "expected_latency": (solution.objective / solution.n_tokens
                                     if solution.n_tokens else None),
                "played_over_optimum": ratio, "plan_over_optimum": plan_over_optimum(plan, total),
                "kept": plan.kept_distribution,
            }
        return out


def _models(plan: Plan | None, fitted: Mapping[str, LatencyModel],
            endpoints: Sequence[str]) -> list[LatencyModel | None]:
    """The curves the plan priced (after capping and pooling); the raw fit for others."""
    priced = dict(zip(plan.endpoints, plan.models, strict=True)) if plan is not None else {}
    fits = dict(fitted)
    return [priced.get(e) or fits.get(e) for e in endpoints]


def _aggregate(fresh: Sequence[RegretSummary], endpoints: Sequence[str],
               groups: Mapping[tuple[str, ...], Sequence[RegretSummary]] | None = None,
               ) -> dict[str, list[Any]]:
    """The per-endpoint rows of the module docstring, over arrays: one pass per group of
    sidecars that report the same endpoint list (a frame at 1,000 sidecars costs a few
    milliseconds, not a Python loop per sidecar and endpoint). The sums equal a loop over the
    sidecars up to the order of the additions (a last-bit difference in a load or a mean)."""
    k = len(endpoints)
    index = {e: j for j, e in enumerate(endpoints)}
    load = np.zeros(k)
    requests = np.zeros(k, dtype=np.int64)
    failures = np.zeros(k, dtype=np.int64)
    lat_sum = np.zeros(k)
    p50_sum = np.zeros(k)
    p50_n = np.zeros(k, dtype=np.int64)
    p99 = np.full(k, np.nan)
    regret = np.full(k, np.nan)
    for own, members in (by_endpoints(fresh) if groups is None else groups).items():
        cols = np.array([index[e] for e in own], dtype=np.int64)  # distinct within a summary
        # counts are exact in a float far beyond MAX_COUNT
        vectors = columns(members, ("requests", "failures", "latency_mean", "latency_p50",
                                    "latency_p99"))
        n = vectors[:, 0].astype(np.int64)
        requests[cols] += n.sum(axis=0)
        failures[cols] += vectors[:, 1].astype(np.int64).sum(axis=0)
        d = np.array(list(chain.from_iterable(chain.from_iterable([s.regret for s in members]))),
                     dtype=float).reshape(len(members), len(own), len(own))
        d[:, np.arange(len(own)), np.arange(len(own))] = 0.0  # D(j, j) is not a regret
        worst = np.maximum(d.max(axis=2), 0.0).max(axis=0)
        regret[cols] = np.fmax(regret[cols], worst)
        totals = n.sum(axis=1)
        used = (n > 0) & (totals > 0)[:, None]
        demand = np.array([s.demand for s in members], dtype=float)
        load[cols] += np.where(used, demand[:, None] * n / np.maximum(totals, 1)[:, None],
                               0.0).sum(axis=0)
        mean = vectors[:, 2]
        lat_sum[cols] += np.where(used & ~np.isnan(mean), mean * n, 0.0).sum(axis=0)
        median = vectors[:, 3]
        measured = used & ~np.isnan(median)
        p50_sum[cols] += np.where(measured, median * n, 0.0).sum(axis=0)
        p50_n[cols] += np.where(measured, n, 0).sum(axis=0)
        high = np.where(used, vectors[:, 4], np.nan)
        if (~np.isnan(high)).any():
            p99[cols] = np.fmax(p99[cols], np.nanmax(high, axis=0, initial=-np.inf))
    p99[np.isinf(p99)] = np.nan
    return {
        "load": load.tolist(), "requests": requests.tolist(), "failures": failures.tolist(),
        "p99": _nones(p99), "regret": _nones(regret),
        "mean": [float(lat_sum[j] / requests[j]) if requests[j] else None for j in range(k)],
        "p50": [float(p50_sum[j] / p50_n[j]) if p50_n[j] else None for j in range(k)],
    }


def _nones(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(x) else x for x in values.tolist()]


def dealt_by_list(plan: Plan) -> Deals:
    """A plan's deals by the endpoint list each was dealt over: sidecar -> its weights in that
    list's order (made once per plan: a plan is compared with the sidecars' weights in the
    next :data:`PLANS_KEPT` frames)."""
    out: Deals = {}
    for sidecar, weights in plan.weights.items():
        out.setdefault(tuple(weights), {})[sidecar] = tuple(weights.values())
    return out


def _sidecars(fresh: Sequence[RegretSummary], plans: Sequence[Plan],
              deals: Sequence[Deals] | None = None,
              groups: Mapping[tuple[str, ...], Sequence[RegretSummary]] | None = None,
              ) -> dict[str, Any]:
    """The sidecars' entries of an upstream's frame: every one counted, at most
    :data:`SIDECARS_SHOWN` listed (those not following first, then by demand, then by id).

    A sidecar's distance is the total variation between the weights it reports and the
    nearest of the weights it was dealt by ``plans`` (``deals``: their :func:`dealt_by_list`,
    if already made), taken over arrays per group of sidecars with the same endpoint list (a
    deal over other endpoints, after the list changed, is compared by name). Summed by numpy
    (within a few units in the last place of :func:`total_variation`); a distance that close
    to :data:`FOLLOW_DISTANCE` is summed again exactly, so following is judged as
    :func:`total_variation` judges it."""
    if deals is None:
        deals = [dealt_by_list(plan) for plan in plans]
    ids: list[str] = []
    demands: list[float] = []
    distances: list[float | None] = []
    position = {s.sidecar: i for i, s in enumerate(fresh)}
    for own, members in (by_endpoints(fresh) if groups is None else groups).items():
        reported = columns(members, ("weights",))[:, 0]
        best = np.full(len(members), np.inf)
        missing = (math.nan,) * len(own)
        for plan, by_list in zip(plans, deals, strict=True):
            same = by_list.get(own, {})
            found = [same.get(s.sidecar) for s in members]
            rows = cast(list[tuple[float, ...]], found)
            if None in found:  # not dealt, or dealt over the sidecar's previous list
                rows = [missing if row is None else row for row in found]
                for i, s in enumerate(members):
                    weights = plan.weights.get(s.sidecar) if found[i] is None else None
                    if weights is not None:
                        best[i] = min(best[i], total_variation(
                            dict(zip(own, s.weights, strict=True)), weights))
            matrix = np.array(list(chain.from_iterable(rows)), dtype=float)
            best = np.fmin(best, 0.5 * np.abs(reported - matrix.reshape(reported.shape))
                           .sum(axis=1))
        for i in np.flatnonzero(np.abs(best - FOLLOW_DISTANCE) <= _NEAR).tolist():
            s = members[i]
            reported_i = dict(zip(own, s.weights, strict=True))
            best[i] = min(total_variation(reported_i, plan.weights[s.sidecar])
                          for plan in plans if s.sidecar in plan.weights)
        ids += [s.sidecar for s in members]
        demands += [s.demand for s in members]
        distances += [None if math.isinf(x) else x for x in best.tolist()]
    following = [None if x is None else x <= FOLLOW_DISTANCE for x in distances]
    if len(ids) > SIDECARS_SHOWN:
        order = sorted(range(len(ids)),
                       key=lambda i: (following[i] is True, -demands[i], ids[i]))
        del order[SIDECARS_SHOWN:]
    else:  # the order of ``fresh``
        order = sorted(range(len(ids)), key=lambda i: position[ids[i]])
    entries = [{"id": ids[i], "demand": demands[i], "distance": distances[i],
                "following": following[i]} for i in order]
    return {"sidecars": entries, "sidecars_total": len(ids),
            "sidecars_following": sum(1 for f in following if f)}
