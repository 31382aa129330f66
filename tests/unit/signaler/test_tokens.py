"""signaler.tokens: demand quantisation, sampling a configuration, dealing private weights,
and the steady deal that moves only the surplus."""

from __future__ import annotations

import math

import numpy as np
import pytest

from signaler.latency_model import LatencyModel
from signaler.lp import CorrelatedEquilibriumLP
from signaler.tokens import assign_tokens, quantise_demand, sample_configuration, steady_deal

MODELS = (
    LatencyModel(d=0.010, mu=10.0),
    LatencyModel(d=0.020, mu=6.0),
    LatencyModel(d=0.005, mu=4.0),
)


def test_quantise_is_proportional_when_quotas_are_whole() -> None:
    assert quantise_demand({"a": 10.0, "b": 30.0, "c": 60.0}, 10) == {"a": 1, "b": 3, "c": 6}


def test_quantise_uses_largest_remainders() -> None:
    # Quotas 2.5, 3.5, 6.0 (sum 12): one leftover token goes to the larger remainder, tie by id.
    assert quantise_demand({"a": 2.5, "b": 3.5, "c": 6.0}, 12) == {"a": 3, "b": 3, "c": 6}


def test_quantise_gives_every_sidecar_with_demand_a_token() -> None:
    tokens = quantise_demand({"tiny": 0.01, "huge": 1000.0, "idle": 0.0, "small": 0.5}, 8)
    assert tokens == {"tiny": 1, "huge": 6, "idle": 0, "small": 1}
    assert sum(tokens.values()) == 8


def test_quantise_all_idle_gives_no_tokens() -> None:
    assert quantise_demand({"a": 0.0, "b": 0}, 16) == {"a": 0, "b": 0}


@pytest.mark.parametrize("seed", range(20))
def test_quantise_invariants_on_random_rates(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rates = {f"s{i}": float(rng.exponential()) for i in range(int(rng.integers(1, 12)))}
    total = int(rng.integers(len(rates), 64))
    tokens = quantise_demand(rates, total)
    assert sum(tokens.values()) == total
    assert all(tokens[s] >= 1 for s in rates)
    quota_total = sum(rates.values())
    for sidecar, rate in rates.items():
        # Never further than one token (plus the tokens the floor-of-one rule moved) from quota.
        assert abs(tokens[sidecar] - rate / quota_total * total) < 1 + len(rates)


@pytest.mark.parametrize(
    ("rates", "total"),
    [
        ({"a": math.nan}, 4),
        ({"a": -1.0}, 4),
        ({"a": math.inf}, 4),
        ({"a": 1.0, "b": 1.0, "c": 1.0}, 2),
        ({"a": 1.0}, -1),
    ],
)
def test_quantise_rejects_bad_input(rates: dict[str, float], total: int) -> None:
    with pytest.raises(ValueError):
        quantise_demand(rates, total)


def test_assign_hands_each_sidecar_its_own_weights() -> None:
    rng = np.random.default_rng(1)
    counts = np.array([3, 0, 2])
    weights = assign_tokens(counts, {"a": 2, "b": 3}, rng)
    assert set(weights) == {"a", "b"}
    for sidecar, share in weights.items():
        assert sum(share.values()) == pytest.approx(1.0)
        assert 1 not in share  # no token was on endpoint 1
        assert all(v > 0 for v in share.values())
        demand = {"a": 2, "b": 3}[sidecar]
        assert all(math.isclose(v * demand, round(v * demand)) for v in share.values())
    # Together the shares rebuild the configuration.
    rebuilt = np.zeros(3)
    for sidecar, share in weights.items():
        for endpoint, weight in share.items():
            rebuilt[endpoint] += weight * {"a": 2, "b": 3}[sidecar]
    assert rebuilt == pytest.approx(counts)


def test_assign_gives_idle_sidecars_the_overall_mix() -> None:
    weights = assign_tokens(np.array([1, 3]), {"busy": 4, "idle": 0}, np.random.default_rng(0))
    assert weights["idle"] == {0: 0.25, 1: 0.75}
    assert weights["busy"] == {0: 0.25, 1: 0.75}


def test_assign_rejects_mismatched_demands() -> None:
    with pytest.raises(ValueError, match="add up"):
        assign_tokens(np.array([2, 2]), {"a": 3}, np.random.default_rng(0))
    with pytest.raises(ValueError):
        assign_tokens(np.array([2, -1]), {"a": 1}, np.random.default_rng(0))
    with pytest.raises(ValueError):
        assign_tokens(np.array([2, 2]), {"a": -4, "b": 8}, np.random.default_rng(0))


def test_sampling_and_dealing_reproduce_the_lp_marginals() -> None:
    n = 6
    lam = 0.5 * sum(m.mu for m in MODELS) / n
    solution = CorrelatedEquilibriumLP(MODELS, n, lam).solve()
    assert solution.probabilities.size >= 2  # a genuinely randomised recommendation
    rng = np.random.default_rng(42)
    demands = {"a": 1, "b": 2, "c": 3}
    draws = 4000
    configuration_total = np.zeros(3)
    per_sidecar = {s: np.zeros(3) for s in demands}
    for _ in range(draws):
        counts = sample_configuration(solution, rng)
        assert counts.sum() == n
        configuration_total += counts
        for sidecar, share in assign_tokens(counts, demands, rng).items():
            assert sum(share.values()) == pytest.approx(1.0)
            for endpoint, weight in share.items():
                per_sidecar[sidecar][endpoint] += weight
    lp_marginal = solution.marginal() / n  # one token's chance of each endpoint
    assert configuration_total / (draws * n) == pytest.approx(lp_marginal, abs=0.02)
    # Shuffled dealing: every sidecar, whatever its size, sees the same per-token marginal.
    for sidecar in demands:
        assert per_sidecar[sidecar] / draws == pytest.approx(lp_marginal, abs=0.03)


def test_sampling_is_reproducible_with_the_same_seed() -> None:
    solution = CorrelatedEquilibriumLP(MODELS, 6, 2.0).solve()
    first = [sample_configuration(solution, np.random.default_rng(5)).tolist() for _ in range(3)]
    again = [sample_configuration(solution, np.random.default_rng(5)).tolist() for _ in range(3)]
    assert first == again


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
