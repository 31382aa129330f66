"""Hedged exploration (mesh.hedging): which requests, which picks, which backup, what delay."""

from __future__ import annotations

import random

import pytest

from mesh.estimators import EndpointStats
from mesh.hedging import HedgePlan, Hedger, RecentLatencies, may_hedge, plan_hedges
from mesh.policies import RegretMatchingPolicy, make_policy
from mesh.policy import Outcome
from mesh.profiles import get_profile

ENDPOINTS = ["a", "b", "c"]


def test_only_idempotent_methods_without_a_body_may_be_hedged() -> None:
    for method in ("GET", "HEAD", "OPTIONS", "PUT", "DELETE"):
        assert may_hedge(method, has_body=False)
        assert not may_hedge(method, has_body=True)  # never a request with a body
    for method in ("POST", "PATCH", "CONNECT", "TRACE", "get"):
        assert not may_hedge(method, has_body=False)


def test_an_endpoint_held_only_by_the_floor_is_hedged_with_the_best_ones_p90() -> None:
    # floor 0.005: c at 0.005 (<= 1.5 floors) is explored; a (20 ms) is better than b (30 ms)
    plans = plan_hedges(ENDPOINTS, [0.4975, 0.4975, 0.005], 0.005, [False, False, False],
                        [0.020, 0.030, 0.250], [0.031, 0.045, 0.510].__getitem__)
    assert plans == {"c": HedgePlan("a", 0.031)}


def test_a_weight_above_one_and_a_half_floors_is_a_choice_not_exploration() -> None:
    plans = plan_hedges(ENDPOINTS, [0.49, 0.49, 0.0076], 0.005, [False] * 3,
                        [0.020, 0.030, 0.250], [0.031, 0.045, 0.510].__getitem__)
    assert plans == {}
    at_bound = plan_hedges(ENDPOINTS, [0.4925, 0.4925, 0.0075], 0.005, [False] * 3,
                           [0.020, 0.030, 0.250], [0.031, 0.045, 0.510].__getitem__)
    assert at_bound == {"c": HedgePlan("a", 0.031)}


def test_probe_covered_and_weightless_endpoints_get_no_plan() -> None:
    weights = [0.99, 0.005, 0.005]
    plans = plan_hedges(ENDPOINTS, weights, 0.005, [False, True, False],
                        [0.020, 0.500, 0.500], [0.031, None, None].__getitem__)
    assert plans == {"c": HedgePlan("a", 0.031)}  # b answers probes: never explored by users
    assert plan_hedges(ENDPOINTS, [1.0, 0.0, 0.0], 0.005, [False] * 3,
                       [0.020, 0.5, 0.5], [0.031, None, None].__getitem__) == {}


def test_no_delay_known_no_used_endpoint_or_no_floor_means_no_hedge() -> None:
    # the best endpoint has too few recent samples for a p90: nothing to hedge with
    assert plan_hedges(ENDPOINTS, [0.4975, 0.4975, 0.005], 0.005, [False] * 3,
                       [0.020, 0.030, 0.250], [None, 0.045, 0.510].__getitem__) == {}
    # every weight at the floor (a one-floor fleet does not exist, but stay safe)
    assert plan_hedges(["a", "b"], [0.005, 0.005], 0.005, [False] * 2,
                       [0.02, 0.02], [0.03, 0.03].__getitem__) == {}
    assert plan_hedges(ENDPOINTS, [0.4975, 0.4975, 0.005], 0.0, [False] * 3,
                       [0.020, 0.030, 0.250], [0.031, 0.045, 0.510].__getitem__) == {}


def test_the_delay_has_a_floor_and_ties_pick_the_first_best() -> None:
    plans = plan_hedges(ENDPOINTS, [0.4975, 0.4975, 0.005], 0.005, [False] * 3,
                        [0.020, 0.020, 0.250], [0.0, 0.0, 0.510].__getitem__)
    assert plans == {"c": HedgePlan("a", 0.001)}


def test_recent_latencies_give_a_nearest_rank_p90_once_there_are_enough() -> None:
    recent = RecentLatencies(span=5.0, min_samples=8)
    for i in range(7):
        recent.add("a", 0.1 * i, 0.010 + 0.001 * i)
    assert recent.p90("a", 1.0) is None  # 7 < 8 samples
    for i in range(7, 10):
        recent.add("a", 0.1 * i, 0.010 + 0.001 * i)
    # 10 samples 10..19 ms: the 9th smallest (ceil(0.9 * 10)) is 18 ms
    assert recent.p90("a", 1.0) == pytest.approx(0.018)
    assert recent.p90("b", 1.0) is None
    recent.forget(["b"])
    assert recent.p90("a", 1.0) is None


def test_a_censored_observation_can_raise_an_estimate_never_lower_it() -> None:
    s = EndpointStats.new("c", now=0.0, tau=2.0, decay=10.0, failure_penalty=1.0)
    s.start()
    s.finish(0.500, True, 0.0)
    assert s.latency.value == pytest.approx(0.500)
    s.start()
    s.finish(0.030, True, 1.0, censored=True)  # "at least 30 ms": no news against 500 ms
    assert s.latency.value == pytest.approx(0.500) and s.in_flight == 0
    assert s.failures == 0 and s.consecutive_failures == 0
    fast = EndpointStats.new("a", now=0.0, tau=2.0, decay=10.0, failure_penalty=1.0)
    fast.start()
    fast.finish(0.010, True, 0.0)
    fast.start()
    fast.finish(0.040, True, 1.0, censored=True)  # "at least 40 ms" against 10 ms: slower
    assert fast.latency.value is not None and fast.latency.value > 0.010
    assert fast.tick_count == 2 and fast.failures == 0


# ------------------------------------------------------------------ the policy, end to end

LATENCY = {"a": 0.010, "b": 0.012, "c": 0.500}


def test_the_policy_hedges_its_floor_picks_of_an_unprobed_slow_endpoint() -> None:
    policy = make_policy("equilibrium", get_profile("balanced"))
    assert isinstance(policy, RegretMatchingPolicy) and isinstance(policy, Hedger)
    policy.set_endpoints(list(LATENCY), 0.0)
    rng = random.Random(7)
    t, next_tick = 0.0, 0.0
    while t < 15.0:
        if t >= next_tick:
            policy.tick(t)
            next_tick += 0.5
        e = policy.pick(rng, t)
        assert e is not None
        policy.on_start(e, t)
        policy.on_outcome(Outcome(e, LATENCY[e], True, t))
        t = round(t + 0.005, 3)
    policy.tick(t)
    weights = policy.snapshot().weights
    assert 0.0 < weights["c"] <= 1.5 * 0.005  # held only by the floor
    plan = policy.hedge_plan("c")
    assert plan is not None and plan.backup == "a" and plan.delay == pytest.approx(0.010)
    assert policy.hedge_plan("a") is None and policy.hedge_plan("b") is None
    # the baselines never hedge
    assert not isinstance(make_policy("peak-ewma", get_profile("balanced")), Hedger)
