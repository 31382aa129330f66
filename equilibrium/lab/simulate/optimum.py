"""The true latency curves of the simulated pods, their Wardrop equilibrium and social optimum.

Owns :func:`expected_latency` (a pod's mean latency at an arrival rate: the Erlang C mean wait
of an M/M/c queue plus the mean service, or the constant of a pod without a queue; the bad
pod's mean extra delay on top) and :func:`benchmarks` (for a total demand split over the
pods: the Wardrop equilibrium -- every used pod equally fast, what selfish routing reaches
(Wardrop 1952) --, the social optimum -- every used pod at the same marginal cost
``l(x) + x l'(x)`` (Beckmann, McGuire & Winsten 1956) --, and the price of anarchy, the ratio
of their mean latencies (Roughgarden & Tardos, JACM 2002)). Lognormal service times use the
M/G/c approximation ``W ~ W(M/M/c) (1 + cs^2) / 2`` (Lee & Longton 1959); Pareto service
times (infinite variance) have none, and neither does a mix of queue-less and queueing pods:
those return None. Pure: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from equilibrium.lab.simulate.pods import LOGNORMAL_SIGMA, PodSpec


def erlang_c(servers: int, offered: float) -> float:
    """Probability that an arrival waits in an M/M/c queue with ``offered`` = lambda / mu < c."""
    term, total = 1.0, 1.0
    for k in range(1, servers):
        term *= offered / k
        total += term
    last = term * offered / servers  # a^c / c!
    rho = offered / servers
    tail = last / (1.0 - rho)
    return tail / (total + tail)


def expected_latency(spec: PodSpec, rate: float) -> float:
    """Mean time at the pod (queue + service + bad delay) at ``rate`` requests/s; inf at or
    beyond its capacity."""
    extra = spec.bad_fraction * spec.bad_delay if spec.bad else 0.0
    if spec.servers is None:
        return spec.service_time + extra
    mu, c = spec.service_rate, spec.servers
    if rate >= c * mu:
        return math.inf
    wait = erlang_c(c, rate / mu) / (c * mu - rate) if rate > 0 else 0.0
    if spec.distribution == "lognormal":
        wait *= (1.0 + math.expm1(LOGNORMAL_SIGMA**2)) / 2.0
    elif spec.distribution == "constant":
        wait *= 0.5
    return wait + 1.0 / mu + extra


def _marginal(spec: PodSpec, x: float) -> float:
    h = max(1e-9, 1e-6 * x)
    lo = max(0.0, x - h)
    return expected_latency(spec, x) + x * (
        expected_latency(spec, x + h) - expected_latency(spec, lo)) / (x + h - lo)


def _flow_at(cost: Any, spec: PodSpec, level: float) -> float:
    """The largest load whose cost is at most ``level`` (cost increasing in load)."""
    cap = spec.capacity() * (1.0 - 1e-9)
    if cost(spec, 0.0) >= level:
        return 0.0
    lo, hi = 0.0, cap
    for _ in range(100):
        mid = (lo + hi) / 2.0
        if cost(spec, mid) <= level:
            lo = mid
        else:
            hi = mid
    return lo


def _split(cost: Any, pods: Sequence[PodSpec], demand: float) -> list[float]:
    """Loads with equal ``cost`` on every used pod, summing to ``demand`` (< the capacity).
    Identical pods get identical loads, so each distinct pod is solved once."""
    kinds = list(dict.fromkeys(pods))
    count = [sum(1 for p in pods if p == kind) for kind in kinds]

    def total(level: float) -> float:
        return sum(n * _flow_at(cost, kind, level) for kind, n in zip(kinds, count, strict=True))

    lo, hi = 0.0, 1.0
    while total(hi) < demand and hi < 1e6:
        hi *= 2.0
    for _ in range(80):
        mid = (lo + hi) / 2.0
        if total(mid) < demand:
            lo = mid
        else:
            hi = mid
    # A pod whose curve is flat at the level (or starts there) takes any load between its
    # flows just below and just above it: the residual demand is spread over those ranges.
    below = {kind: _flow_at(cost, kind, lo) for kind in kinds}
    above = {kind: _flow_at(cost, kind, hi) for kind in kinds}
    base = sum(n * below[k] for k, n in zip(kinds, count, strict=True))
    slack = sum(n * (above[k] - below[k]) for k, n in zip(kinds, count, strict=True))
    fill = min(1.0, max(0.0, (demand - base) / slack)) if slack > 0 else 0.0
    return [below[p] + fill * (above[p] - below[p]) for p in pods]


def mean_latency(pods: Sequence[PodSpec], flows: Sequence[float]) -> float:
    demand = sum(flows)
    return sum(f * expected_latency(p, f) for p, f in zip(pods, flows, strict=True)
               if f > 0) / demand


def benchmarks(pods: Sequence[PodSpec], demand: float, fixed: float) -> dict[str, Any] | None:
    """Wardrop equilibrium, social optimum and price of anarchy for ``demand`` requests/s over
    ``pods``; ``fixed`` (network and proxy time) is added to every mean latency. None where the
    curves have no closed form here (see the module docstring)."""
    if not pods or demand <= 0:
        return None
    if all(p.servers is None for p in pods):
        best = min(expected_latency(p, 0.0) for p in pods)
        return {"wardrop_mean": best + fixed, "optimum_mean": best + fixed,
                "price_of_anarchy": 1.0, "optimum_shares": _even_on_best(pods, best),
                "wardrop_shares": _even_on_best(pods, best)}
    if any(p.servers is None or p.distribution == "pareto" for p in pods):
        return None
    if demand >= sum(p.capacity() for p in pods):
        return None
    wardrop = _split(expected_latency, pods, demand)
    optimum = _split(_marginal, pods, demand)
    w, o = mean_latency(pods, wardrop) + fixed, mean_latency(pods, optimum) + fixed
    return {"wardrop_mean": w, "optimum_mean": o, "price_of_anarchy": w / o,
            "optimum_shares": [f / demand for f in optimum],
            "wardrop_shares": [f / demand for f in wardrop]}


def _even_on_best(pods: Sequence[PodSpec], best: float) -> list[float]:
    on = [expected_latency(p, 0.0) <= best + 1e-12 for p in pods]
    return [1.0 / sum(on) if b else 0.0 for b in on]
