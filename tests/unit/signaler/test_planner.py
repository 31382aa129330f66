"""The signaler's plans on a demo-like fleet: alike pods share the tokens (indifference pooling)
and each sidecar's tokens stay put across epochs (steady deal)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np
import pytest

from signaler.latency_model import LatencyModel
from signaler.planner import Plan, UpstreamView, make_plan, pool_indifferent
from signaler.tokens import steady_deal
from wire.summary import RegretSummary

NOW = 1_764_183_600.0
PODS = tuple(f"http://127.0.0.1:{9100 + i}" for i in range(5))  # PODS[4] is the bad one
SIDECARS = ("client-1", "client-2", "client-3")
TOKENS = 16


def report(view: UpstreamView, t: int, weights: Mapping[str, tuple[float, ...]],
           rng: np.random.Generator) -> None:
    """One epoch of the demo: 3 sidecars x 50 req/s; the good pods answer in ~3 ms with noise
    of a few tenths of a ms that differs from pod to pod, the bad one in ~250 ms."""
    for sidecar in SIDECARS:
        w = weights[sidecar]
        requests = tuple(max(round(50 * x), 0) for x in w)
        good = tuple(0.003 + rng.normal(0.0, 0.0003) for _ in range(4))
        latency = (*(max(x, 0.0015) for x in good), 0.25 + rng.normal(0.0, 0.01))
        view.offer(RegretSummary(
            sidecar=sidecar, upstream="demo", epoch=t, sent_at=NOW + t, endpoints=PODS,
            requests=requests, failures=(0,) * 5, latency_mean=latency,
            latency_p50=latency, latency_p99=tuple(2 * x for x in latency),
            in_flight=(0,) * 5, demand=50.0, weights=w, regret=((0.0,) * 5,) * 5,
        ))


def run(epochs: int, seed: int, **options: float) -> list[Plan]:
    view = UpstreamView("demo", freshness=5.0)
    noise, rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    weights = {s: tuple(np.random.default_rng(i).dirichlet(np.ones(5)))
               for i, s in enumerate(SIDECARS)}
    plans: list[Plan] = []
    previous: Plan | None = None
    for t in range(epochs):
        report(view, t, weights, noise)
        previous = make_plan(view, NOW + t, TOKENS, rng, previous=previous, **options)
        plans.append(previous)
        weights = {s: tuple(previous.weights[s][e] for e in PODS) for s in SIDECARS}
    return plans


def test_identical_noisy_pods_get_equal_tokens_and_the_bad_one_none() -> None:
    for plan in run(12, seed=3)[2:]:
        marginal = plan.solution.marginal()  # expected tokens per endpoint
        assert marginal[4] < 0.01
        assert marginal[:4] == pytest.approx([TOKENS / 4] * 4, abs=1.0)


def test_without_the_margin_the_noise_crowds_the_tokens() -> None:
    # the same fleet planned with no indifference margin: the LP chases the noise in d
    crowded = [p.solution.marginal() for p in run(12, seed=3, indifference=0.0,
                                                   indifference_abs=0.0)[2:]]
    assert any(max(m[:4]) - min(m[:4]) >= 2.0 for m in crowded)


def test_pooling_groups_only_within_the_margin() -> None:
    models = [LatencyModel(0.0030, 5000.0), LatencyModel(0.0036, 400.0),
              LatencyModel(0.0028, 900.0), LatencyModel(0.250, 50.0),
              LatencyModel(0.0045, 900.0), LatencyModel(0.0052, 900.0)]
    latencies = [0.0030, 0.0037, 0.0029, 0.260, 0.0046, 0.0053]
    pooled = pool_indifferent(models, latencies)
    # the three within 1 ms of the fastest (2.9 ms) share the mean d and the smallest mu
    assert pooled[0] == pooled[1] == pooled[2]
    assert pooled[0].d == pytest.approx((0.0030 + 0.0036 + 0.0028) / 3)
    assert pooled[0].mu == 400.0
    # 4.6 ms is within 1 ms of 3.7 ms but 1.7 ms slower than the fastest: no chaining; it
    # starts the next group with 5.3 ms; the bad endpoint stays alone
    assert pooled[4] == pooled[5] != pooled[0]
    assert pooled[3] == models[3]
    assert pool_indifferent(models, latencies, 0.0, 0.0) == tuple(models)
    with pytest.raises(ValueError, match="latencies"):
        pool_indifferent(models, [0.003])


def moved(before: Plan, after: Plan) -> int:
    """Tokens that changed endpoint between two deals (the sidecars' counts being equal)."""
    return sum(max(before.deal[s].get(j, 0) - after.deal[s].get(j, 0), 0)
               for s in before.deal for j in range(len(before.endpoints)))


def test_a_sidecars_tokens_move_only_as_much_as_the_configuration() -> None:
    plans = run(10, seed=7, refresh=1.0, stability=0.0)  # re-drawn and re-solved every epoch
    for before, after in itertools.pairwise(plans):
        assert dict(after.tokens) == dict(before.tokens)
        change = sum(max(a - b, 0) for a, b in zip(after.configuration, before.configuration,
                                                    strict=True))
        assert moved(before, after) == change
        if change == 0:
            assert after.kept_deal and after.weights == before.weights
        for sidecar, holding in after.deal.items():  # weights are the sidecar's own tokens
            share = after.weights[sidecar]
            count = sum(holding.values())
            assert [share[e] for e in PODS] == pytest.approx(
                [holding.get(j, 0) / count for j in range(5)])


def test_steady_deal_moves_only_the_surplus() -> None:
    rng = np.random.default_rng(0)
    previous = {"a": {0: 2, 1: 1}, "b": {1: 2, 2: 1}, "c": {0: 1, 2: 1}}
    same = steady_deal([3, 3, 2], {"a": 3, "b": 3, "c": 2}, previous, rng)
    assert same == previous
    # one token leaves endpoint 0 for endpoint 1: exactly one token of a or c moves
    after = steady_deal([2, 4, 2], {"a": 3, "b": 3, "c": 2}, previous, rng)
    assert after["b"] == previous["b"]
    changed = [s for s in "ac" if after[s] != previous[s]]
    assert len(changed) == 1
    s = changed[0]
    assert after[s].get(0, 0) == previous[s][0] - 1
    assert after[s].get(1, 0) == previous[s].get(1, 0) + 1
    # a sidecar whose count shrinks gives tokens back, a new one is dealt fresh ones
    grown = steady_deal([2, 4, 2, 0], {"a": 2, "b": 3, "c": 2, "d": 1}, previous, rng)
    assert sum(grown["a"].values()) == 2 and sum(grown["d"].values()) == 1
    assert grown["b"] == previous["b"]
    with pytest.raises(ValueError, match="demands add up"):
        steady_deal([1, 1], {"a": 3}, {}, rng)


def test_steady_deal_keeps_each_token_told_j_with_probability_c_j_over_n() -> None:
    # a uniform first deal, then a re-deal to another configuration: sidecar a (2 of 8 tokens)
    # is still told endpoint j with probability c_j / n, whatever it held before
    rng = np.random.default_rng(11)
    demands = {"a": 2, "b": 3, "c": 3}
    new = np.array([1, 2, 5])
    total = np.zeros(3)
    trials = 3000
    for _ in range(trials):
        first = steady_deal([4, 4, 0], demands, {}, rng)
        second = steady_deal(new, demands, first, rng)
        for j, c in second["a"].items():
            total[j] += c
    assert total / trials == pytest.approx(2 * new / new.sum(), abs=0.05)
