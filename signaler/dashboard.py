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
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from mesh.nash import wardrop_gap
from signaler.latency_model import LatencyModel
from signaler.planner import Plan
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
        self._plans: dict[str, deque[Plan]] = {}

    def __call__(self) -> dict[str, Any]:
        service = self.service
        now = service.clock()
        names = sorted(set(service.status) | set(service.views))
        for gone in set(self._plans) - set(names):  # an upstream the service forgot
            del self._plans[gone]
        upstreams = [self.upstream(name, now) for name in names]
        return {"source": "signaler", "id": service.config.signer, "note": NOTE,
                "redis": service.health.redis_ok, "epoch": service.epoch_number,
                "upstreams": upstreams, "policing": []}

    def _recent_plans(self, name: str, plan: Plan | None) -> list[Plan]:
        kept = self._plans.setdefault(name, deque(maxlen=PLANS_KEPT))
        if plan is not None and (not kept or kept[-1] is not plan):
            kept.append(plan)
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
        for summary in fresh:
            endpoints += [e for e in summary.endpoints if e not in endpoints]
        agg = _aggregate(fresh, endpoints)
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
            "ce_gap": _ce_gap(fresh) if fresh else None,
            "plan_ce_gap": plan.solution.ce_gap if plan is not None else None,
            **_sidecars(fresh, plans),
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


def _aggregate(fresh: Sequence[RegretSummary], endpoints: Sequence[str]) -> dict[str, list[Any]]:
    k = len(endpoints)
    index = {e: j for j, e in enumerate(endpoints)}
    load = [0.0] * k
    requests = [0] * k
    failures = [0] * k
    lat_sum = [0.0] * k
    p50_sum = [0.0] * k
    p50_n = [0] * k
    p99: list[float | None] = [None] * k
    regret: list[float | None] = [None] * k
    for s in fresh:
        total = sum(s.requests)
        for i, endpoint in enumerate(s.endpoints):
            j = index[endpoint]
            n = s.requests[i]
            requests[j] += n
            failures[j] += s.failures[i]
            row = [v for kk, v in enumerate(s.regret[i]) if kk != i] if i < len(s.regret) else []
            worst = max([0.0, *row])
            regret[j] = worst if regret[j] is None else max(regret[j] or 0.0, worst)
            if n <= 0 or total <= 0:
                continue
            load[j] += s.demand * n / total
            if s.latency_mean[i] is not None:
                lat_sum[j] += float(s.latency_mean[i] or 0.0) * n
            if s.latency_p50[i] is not None:
                p50_sum[j] += float(s.latency_p50[i] or 0.0) * n
                p50_n[j] += n
            high = s.latency_p99[i]
            if high is not None:
                p99[j] = high if p99[j] is None else max(p99[j] or 0.0, high)
    return {
        "load": load, "requests": requests, "failures": failures, "p99": p99,
        "regret": regret,
        "mean": [lat_sum[j] / requests[j] if requests[j] else None for j in range(k)],
        "p50": [p50_sum[j] / p50_n[j] if p50_n[j] else None for j in range(k)],
    }


def _ce_gap(fresh: Sequence[RegretSummary]) -> float:
    gap = 0.0
    for s in fresh:
        for j, row in enumerate(s.regret):
            for k, value in enumerate(row):
                if j != k and value > gap:
                    gap = value
    return gap


def _sidecars(fresh: Sequence[RegretSummary], plans: Sequence[Plan]) -> dict[str, Any]:
    """The sidecars' entries of an upstream's frame: every one counted, at most
    :data:`SIDECARS_SHOWN` listed (those not following first, then by demand, then by id)."""
    entries = [_sidecar(s, plans) for s in fresh]
    following = sum(1 for e in entries if e["following"])
    if len(entries) > SIDECARS_SHOWN:
        entries.sort(key=lambda e: (e["following"] is True, -e["demand"], e["id"]))
        del entries[SIDECARS_SHOWN:]
    return {"sidecars": entries, "sidecars_total": len(fresh),
            "sidecars_following": following}


def _sidecar(s: RegretSummary, plans: Sequence[Plan]) -> dict[str, Any]:
    reported = dict(zip(s.endpoints, s.weights, strict=True))
    dealt = [p.weights[s.sidecar] for p in plans if s.sidecar in p.weights]
    distance = min((total_variation(reported, w) for w in dealt), default=None)
    return {
        "id": s.sidecar, "demand": s.demand, "distance": distance,
        "following": None if distance is None else distance <= FOLLOW_DISTANCE,
    }
