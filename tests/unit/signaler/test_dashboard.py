"""signaler.dashboard: the mesh-wide frame from the summaries and the plan the service holds.

A real service over the in-memory signal store, fed summaries and run for real epochs (the
solver included); the frame is checked against the summaries and the plan it was built from.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from signaler.dashboard import (
    FOLLOW_DISTANCE,
    SIDECARS_SHOWN,
    SignalerDashboard,
    _aggregate,
    _sidecars,
    optimum_cost,
    played_cost,
    total_variation,
)
from signaler.latency_model import LatencyModel
from signaler.service import SignalerConfig, SignalerService
from tests.signaling_samples import EPS, KEY, NOW, summary
from wire.memory_store import MemorySignalStore
from wire.store import StreamEntry
from wire.summary import RegretSummary, sign_summary


def planned_service() -> SignalerService:
    svc = SignalerService(SignalerConfig(redis_url="redis://127.0.0.1:1", signer="sig-a",
                                         key=KEY, epoch=1.0, tokens=8, seed=1),
                          store=MemorySignalStore(lambda: NOW), clock=lambda: NOW)
    svc._set_leader("orders", 3)
    assert svc.apply_entry("orders", sign_summary(summary("sc-1"), KEY))
    assert svc.apply_entry("orders", sign_summary(summary(
        "sc-2", demand=30.0, weights=(0.1, 0.1, 0.8), requests=(10, 10, 80)), KEY))
    return svc


async def test_the_frame_aggregates_the_fresh_summaries_and_shows_the_plan() -> None:
    svc = planned_service()
    await svc._plan_and_publish("orders")
    plan = svc.status["orders"].plan
    assert plan is not None
    frame = SignalerDashboard(svc)()
    assert frame["source"] == "signaler" and frame["id"] == "sig-a"
    [up] = frame["upstreams"]
    assert up["name"] == "orders" and up["leader"] is True
    rows = {r["endpoint"]: r for r in up["endpoints"]}
    assert list(rows) == list(plan.endpoints)
    # load = demand x the sidecar's share of requests: sc-1 50 x (.4,.4,.2), sc-2 30 x (.1,.1,.8)
    loads = [50 * 0.4 + 30 * 0.1, 50 * 0.4 + 30 * 0.1, 50 * 0.2 + 30 * 0.8]
    for endpoint, load in zip(EPS, loads, strict=True):
        assert rows[endpoint]["share"] == pytest.approx(load / sum(loads))
    assert rows[EPS[2]]["requests"] == 100 and rows[EPS[2]]["failures"] == 0
    assert rows[EPS[2]]["latency"]["p99"] == 0.600  # the largest sidecar p99
    assert rows[EPS[0]]["latency"]["p50"] == pytest.approx((0.009 * 40 + 0.009 * 10) / 50)
    assert rows[EPS[2]]["regret"] == pytest.approx(0.29)  # the largest D(j, k) for it
    assert {r["endpoint"]: r["tokens"] for r in up["endpoints"]} == dict(
        zip(plan.endpoints, plan.configuration, strict=True))
    assert up["ce_gap"] == pytest.approx(0.29)
    assert up["nash_gap"] > 0  # a third of the traffic on a 300 ms endpoint
    assert up["plan"]["solver"] == plan.solution.method
    assert up["plan"]["tokens"] == plan.solution.n_tokens
    assert up["plan"]["expected_latency"] == pytest.approx(
        plan.solution.objective / plan.solution.n_tokens)
    # the loads played put a third of the traffic on the slow pod: far from the optimum
    assert up["plan"]["played_over_optimum"] > 1.5
    assert 1.0 - 1e-9 <= up["plan"]["plan_over_optimum"] < up["plan"]["played_over_optimum"]
    # neither sidecar reports the weights it was dealt (it has not received them yet)
    by_id = {s["id"]: s for s in up["sidecars"]}
    assert set(by_id) == {"sc-1", "sc-2"}
    assert all(s["following"] is False and s["distance"] > 0.1 for s in by_id.values())


async def sc1_following() -> SignalerService:
    """The planned service after one plan was published and sc-1 reported routing by its
    deal (sc-2 still reports its own weights)."""
    svc = planned_service()
    await svc._plan_and_publish("orders")
    plan = svc.status["orders"].plan
    assert plan is not None
    dealt = plan.weights["sc-1"]
    assert svc.apply_entry("orders", sign_summary(summary(
        "sc-1", sent_at=NOW + 0.5, epoch=101, weights=tuple(dealt[e] for e in EPS)), KEY))
    return svc


async def test_a_sidecar_that_routes_by_its_deal_follows() -> None:
    svc = await sc1_following()
    dashboard = SignalerDashboard(svc)
    [up] = dashboard()["upstreams"]
    by_id = {s["id"]: s for s in up["sidecars"]}
    assert by_id["sc-1"]["following"] is True and by_id["sc-1"]["distance"] < 1e-9
    assert by_id["sc-2"]["following"] is False


def test_a_standby_and_an_unplanned_upstream_have_no_plan() -> None:
    svc = planned_service()
    svc._set_leader("payments", None)
    [orders, payments] = SignalerDashboard(svc)()["upstreams"]
    assert orders["plan"] is None and orders["endpoints"] and orders["nash_gap"] is not None
    assert payments == {**payments, "leader": False, "plan": None, "endpoints": [],
                        "sidecars": [], "ce_gap": None}


def test_stale_summaries_are_left_out_and_the_view_is_not_changed() -> None:
    svc = planned_service()
    svc.clock = lambda: NOW + 60.0
    [up] = SignalerDashboard(svc)()["upstreams"]
    assert up["sidecars"] == [] and up["endpoints"] == []
    assert set(svc.views["orders"].latest) == {"sc-1", "sc-2"}  # read, never pruned


def test_optimum_cost_is_the_equal_marginal_split_and_no_split_beats_it() -> None:
    models = [LatencyModel(d=0.01, mu=100.0), LatencyModel(d=0.01, mu=100.0)]
    best = optimum_cost(models, 60.0)
    assert best == pytest.approx(played_cost(models, [30.0, 30.0]))
    for split in (0.0, 10.0, 20.0, 25.0):
        assert played_cost(models, [split, 60.0 - split]) >= best - 1e-12
    uneven = [LatencyModel(d=0.01, mu=100.0), LatencyModel(d=0.2, mu=100.0)]
    assert optimum_cost(uneven, 60.0) < played_cost(uneven, [30.0, 30.0])
    assert optimum_cost(models, 0.0) == 0.0


def test_total_variation() -> None:
    assert total_variation({"a": 1.0}, {"b": 1.0}) == 1.0
    assert math.isclose(total_variation({"a": 0.5, "b": 0.5}, {"a": 0.6, "b": 0.4}), 0.1)


@pytest.mark.parametrize("n", [1, 7, 16, 64])
def test_optimum_counts_is_the_greedy_system_optimum(n: int) -> None:
    from signaler.dashboard import optimum_counts
    from signaler.routing_game import configuration_costs, greedy_system_optimum, latency_table

    models = [LatencyModel(d=0.01, mu=40.0), LatencyModel(d=0.002, mu=25.0),
              LatencyModel(d=0.3, mu=100.0), LatencyModel(d=0.01, mu=1e-3)]
    table = latency_table(models, n + 1, 60.0 / n)
    mine, greedy = optimum_counts(table, n), greedy_system_optimum(table, n)
    assert mine.sum() == n
    cost = configuration_costs(np.stack([mine, greedy]), table)
    assert cost[0] == pytest.approx(cost[1], rel=1e-12)


async def test_many_sidecars_are_all_counted_and_the_ones_to_look_at_listed() -> None:
    """Past SIDECARS_SHOWN sidecars the frame lists those that do not follow their deal
    first, largest demand first, and counts them all."""
    svc = await sc1_following()
    extra = SIDECARS_SHOWN + 5
    for i in range(extra):
        assert svc.apply_entry("orders", sign_summary(summary(
            f"own-{i:02d}", demand=1.0 + 0.5 * i), KEY))
    [up] = SignalerDashboard(svc)()["upstreams"]
    assert up["sidecars_total"] == extra + 2 and up["sidecars_following"] == 1
    listed = [s["id"] for s in up["sidecars"]]
    assert len(listed) == SIDECARS_SHOWN and "sc-1" not in listed  # it follows: not listed
    demands = [s["demand"] for s in up["sidecars"]]
    assert demands == sorted(demands, reverse=True) and demands[0] == 30.0  # sc-2, then own-*
    assert listed[1:] == [f"own-{i:02d}" for i in range(extra - 1, extra - SIDECARS_SHOWN, -1)]


# ------------------------------------------------------------- the arrays against the loops


def reference_aggregate(fresh: list[RegretSummary], endpoints: list[str]) -> dict[str, list]:
    """The frame's endpoint rows summed one sidecar and one endpoint at a time."""
    k = len(endpoints)
    index = {e: j for j, e in enumerate(endpoints)}
    out: dict[str, list] = {"load": [0.0] * k, "requests": [0] * k, "failures": [0] * k,
                            "p99": [None] * k, "regret": [None] * k}
    lat, p50, p50_n = [0.0] * k, [0.0] * k, [0] * k
    for s in fresh:
        total = sum(s.requests)
        for i, endpoint in enumerate(s.endpoints):
            j, n = index[endpoint], s.requests[i]
            out["requests"][j] += n
            out["failures"][j] += s.failures[i]
            worst = max([0.0, *(v for c, v in enumerate(s.regret[i]) if c != i)])
            out["regret"][j] = worst if out["regret"][j] is None else max(out["regret"][j],
                                                                          worst)
            if n <= 0 or total <= 0:
                continue
            out["load"][j] += s.demand * n / total
            if s.latency_mean[i] is not None:
                lat[j] += s.latency_mean[i] * n
            if s.latency_p50[i] is not None:
                p50[j] += s.latency_p50[i] * n
                p50_n[j] += n
            high = s.latency_p99[i]
            if high is not None:
                out["p99"][j] = high if out["p99"][j] is None else max(out["p99"][j], high)
    out["mean"] = [lat[j] / out["requests"][j] if out["requests"][j] else None
                   for j in range(k)]
    out["p50"] = [p50[j] / p50_n[j] if p50_n[j] else None for j in range(k)]
    return out


def random_summary(rng: random.Random, i: int, pool: tuple[str, ...]) -> RegretSummary:
    own = tuple(rng.sample(pool, rng.randint(1, len(pool))))
    k = len(own)
    requests = tuple(rng.choice([0, 0, 1, 7, 40]) for _ in own)
    lat = [None if n == 0 and rng.random() < 0.7 else rng.uniform(0.001, 0.4) for n in requests]
    weights = [rng.random() + 0.01 for _ in own]
    return RegretSummary(
        sidecar=f"sc-{i:03d}", upstream="orders", epoch=1, sent_at=NOW, endpoints=own,
        requests=requests, failures=tuple(rng.randint(0, n) for n in requests),
        latency_mean=tuple(lat), latency_p50=tuple(None if x is None else x / 2 for x in lat),
        latency_p99=tuple(lat), in_flight=(0,) * k, demand=rng.choice([0.0, 3.0, 80.0]),
        weights=tuple(w / sum(weights) for w in weights),
        regret=tuple(tuple(rng.uniform(-0.3, 0.3) for _ in own) for _ in own),
    )


@pytest.mark.parametrize("seed", range(30))
def test_the_array_sums_equal_the_per_sidecar_sums(seed: int) -> None:
    """Summaries over different endpoint lists, idle endpoints, missing latencies."""
    rng = random.Random(seed)
    pool = tuple(f"http://10.0.0.{j}:80" for j in range(1, 7))
    fresh = [random_summary(rng, i, pool) for i in range(rng.randint(1, 40))]
    endpoints = list(dict.fromkeys(e for s in fresh for e in s.endpoints))
    got, want = _aggregate(fresh, endpoints), reference_aggregate(fresh, endpoints)
    assert got.keys() == want.keys()
    for name, values in want.items():
        assert [v is None for v in got[name]] == [v is None for v in values], name
        assert [0.0 if v is None else v for v in got[name]] == pytest.approx(
            [0.0 if v is None else v for v in values], rel=1e-9, abs=1e-12), name


@pytest.mark.parametrize("seed", range(20))
def test_the_follow_distance_is_the_nearest_deal_by_name(seed: int) -> None:
    rng = random.Random(seed)
    pool = tuple(f"http://10.0.0.{j}:80" for j in range(1, 5))
    fresh = [random_summary(rng, i, pool) for i in range(rng.randint(1, 70))]
    plans = []
    for _ in range(rng.randint(0, 3)):
        weights = {}
        for s in fresh:
            if rng.random() < 0.8:  # dealt over its own list, or over a list that changed
                own = s.endpoints if rng.random() < 0.7 else tuple(rng.sample(pool, 2))
                raw = [rng.random() for _ in own]
                weights[s.sidecar] = {e: w / sum(raw) for e, w in zip(own, raw, strict=True)}
        plans.append(SimpleNamespace(weights=weights))
    got = _sidecars(fresh, plans)  # type: ignore[arg-type]
    distance = {}
    for s in fresh:
        dealt = [p.weights[s.sidecar] for p in plans if s.sidecar in p.weights]
        reported = dict(zip(s.endpoints, s.weights, strict=True))
        distance[s.sidecar] = min((total_variation(reported, w) for w in dealt), default=None)
    assert got["sidecars_total"] == len(fresh)
    assert got["sidecars_following"] == sum(
        1 for d in distance.values() if d is not None and d <= FOLLOW_DISTANCE)
    for entry in got["sidecars"]:
        want = distance[entry["id"]]
        assert (entry["distance"] is None) == (want is None)
        # summed by numpy: equal up to the last bits (following is judged exactly, above)
        if want is not None:
            assert entry["distance"] == pytest.approx(want, rel=1e-12, abs=1e-15)
        assert entry["following"] == (None if want is None else want <= FOLLOW_DISTANCE)
    if len(fresh) <= SIDECARS_SHOWN:
        assert [e["id"] for e in got["sidecars"]] == [s.sidecar for s in fresh]


def test_a_distance_at_the_follow_threshold_is_judged_by_the_exact_sum() -> None:
    """Weights whose total variation from the deal is FOLLOW_DISTANCE up to rounding: the
    distance reported is total_variation's own, to the last bit, and so is the judgement."""
    pool = tuple(f"http://10.0.0.{j}:80" for j in range(1, 5))
    cases = []
    for i, (a, b) in enumerate([(0.3, 0.2), (0.7, 0.6), (0.15, 0.05), (0.45, 0.35)]):
        rest = (1.0 - a) / 3
        reported = (a, rest, rest, rest)
        dealt = {pool[0]: b, pool[1]: rest + (a - b) / 3, pool[2]: rest + (a - b) / 3,
                 pool[3]: 1.0 - b - 2 * (rest + (a - b) / 3)}
        cases.append((replace(summary_over(pool, f"sc-{i}"), weights=reported), dealt))
    plans = [SimpleNamespace(weights={s.sidecar: d for s, d in cases})]
    frame = _sidecars([s for s, _ in cases], plans)  # type: ignore[arg-type]
    got = {e["id"]: e for e in frame["sidecars"]}
    for s, dealt in cases:
        want = total_variation(dict(zip(s.endpoints, s.weights, strict=True)), dealt)
        assert abs(want - FOLLOW_DISTANCE) < 1e-9  # the case is at the threshold
        assert got[s.sidecar]["distance"] == want
        assert got[s.sidecar]["following"] == (want <= FOLLOW_DISTANCE)


def summary_over(pool: tuple[str, ...], sidecar: str) -> RegretSummary:
    k = len(pool)
    return RegretSummary(
        sidecar=sidecar, upstream="orders", epoch=1, sent_at=NOW, endpoints=pool,
        requests=(10,) * k, failures=(0,) * k, latency_mean=(0.01,) * k,
        latency_p50=(0.01,) * k, latency_p99=(0.02,) * k, in_flight=(0,) * k, demand=5.0,
        weights=(1.0 / k,) * k, regret=((0.0,) * k,) * k,
    )


async def test_each_part_of_the_work_counts_its_cpu_time() -> None:
    """``equilibrium_signaler_cpu_seconds_total{phase}``: verifying the summaries, planning
    (in the planning thread), signing and the dashboard's frame each add their thread time."""
    svc = SignalerService(SignalerConfig(redis_url="redis://127.0.0.1:1", signer="sig-a",
                                         key=KEY, epoch=1.0, tokens=8, seed=1,
                                         upstreams=("orders",)),
                          store=MemorySignalStore(lambda: NOW), clock=lambda: NOW)
    await svc.run_epoch()  # takes the lease of the upstream it is configured for
    assert svc.status["orders"].leader

    def spent(phase: str) -> float:
        value = svc.metrics.registry.get_sample_value(
            "equilibrium_signaler_cpu_seconds_total", {"phase": phase})
        assert value is not None
        return value

    before = spent("verify")
    await svc._apply_and_ack("orders", [StreamEntry("1-0", sign_summary(summary("sc-3"), KEY))])
    assert spent("verify") > before
    await svc._plan_and_publish("orders")
    assert svc.status["orders"].published == 1
    assert spent("verify") > 0 and spent("plan") > 0 and spent("sign") > 0
    assert spent("dashboard") == 0.0
    SignalerDashboard(svc)()
    assert spent("dashboard") > 0
