"""signaler.system_optimum: the convex optimum (equal marginal costs, overload not an error),
its rounding to whole tokens and the exchange polish to the integer optimum."""

from __future__ import annotations

import numpy as np
import pytest

from signaler.latency_model import LatencyModel
from signaler.routing_game import (
    configuration_costs,
    enumerate_configurations,
    latency_table,
)
from signaler.system_optimum import polish_by_exchange, round_to_tokens, solve_system_optimum
from tests.signaling_samples import ASYMMETRIC


def test_system_optimum_equalises_marginal_costs() -> None:
    models = (LatencyModel(d=0.01, mu=30.0), LatencyModel(d=0.0, mu=10.0))
    solution = solve_system_optimum(models, 1000, 0.02)  # demand 20, fine-grained tokens
    flows = solution.configurations[0] * 0.02
    marginals = [m.marginal_cost(x) for m, x in zip(models, flows, strict=True)]
    assert marginals[0] == pytest.approx(marginals[1], rel=0.01)
    assert solution.status == "optimal"
    assert all(x <= m.knee_load for m, x in zip(models, flows, strict=True))


def test_system_optimum_over_capacity_is_overloaded_not_an_error() -> None:
    models = (LatencyModel(d=0.01, mu=10.0), LatencyModel(d=0.01, mu=5.0))
    solution = solve_system_optimum(models, 30, 1.0)  # demand 30 > capacity 15
    assert solution.status == "overloaded"
    assert solution.configurations[0].sum() == 30
    # Spread so both are past the knee: neither endpoint takes everything.
    assert np.all(solution.configurations[0] > 0)


def test_exchange_polish_reaches_the_integer_optimum_from_a_bad_start() -> None:
    lam = 0.8 * sum(m.mu for m in ASYMMETRIC) / 12
    table = latency_table(ASYMMETRIC, 13, lam)
    polished = polish_by_exchange(np.array([12, 0, 0]), table)
    configurations = enumerate_configurations(12, 3)
    costs = configuration_costs(configurations, table)
    assert configuration_costs(polished[None, :], table)[0] == pytest.approx(costs.min())


def test_round_to_tokens_keeps_total_and_proportions() -> None:
    assert round_to_tokens(np.array([1.5, 1.5, 1.0]), 4).tolist() == [2, 1, 1]
    assert round_to_tokens(np.array([0.2, 0.3, 0.5]), 10).tolist() == [2, 3, 5]
    with pytest.raises(ValueError):
        round_to_tokens(np.array([np.nan, 1.0]), 3)
