"""signaler.column_generation: the CE past the configuration LP's size guard.

The checks: the generated plan is the configuration LP's optimum where that LP can be solved
(exhaustive pricing proves it), a correlated equilibrium to 1e-6 relative at 50 endpoints, never
worse than the pure Nash configuration it starts from and never better than the system optimum;
the reduced costs it prices with are HiGHS's own; a warm start gives the same plan.
"""

from __future__ import annotations

import numpy as np
import pytest

from signaler.column_generation import (
    _Master,
    move_deltas,
    reduced_costs,
    solve_by_column_generation,
)
from signaler.latency_model import LatencyModel
from signaler.lp import CorrelatedEquilibriumLP
from signaler.routing_game import (
    ce_gap,
    configuration_costs,
    enumerate_configurations,
    greedy_nash,
    greedy_system_optimum,
    latency_table,
)


def fleet(k: int, seed: int) -> tuple[LatencyModel, ...]:
    rng = np.random.default_rng(seed)
    return tuple(
        LatencyModel(d=float(rng.uniform(0.001, 0.02)), mu=float(rng.uniform(20, 200)))
        for _ in range(k)
    )


@pytest.mark.parametrize(("n", "k", "seed", "utilisation"),
                         [(32, 4, 2, 0.97), (12, 6, 3, 0.95), (10, 5, 9, 0.9)])
def test_exhaustive_pricing_reaches_the_configuration_lp_optimum(
    n: int, k: int, seed: int, utilisation: float
) -> None:
    models = fleet(k, seed)
    lam = utilisation * sum(m.mu for m in models) / n
    reference = CorrelatedEquilibriumLP(models, n, lam, max_configurations=100_000).solve()
    assert reference.method == "configuration-lp"
    generated = solve_by_column_generation(models, n, lam, warm_start=False, time_budget=30)
    assert generated.status == "optimal"
    assert generated.objective == pytest.approx(reference.objective, rel=1e-7)
    assert generated.ce_gap <= 1e-9 * generated.objective


def test_some_case_needs_more_than_the_nash_column() -> None:
    """The search is exercised: here the best CE mixes configurations and beats pure Nash."""
    models = fleet(6, 3)
    lam = 0.95 * sum(m.mu for m in models) / 12
    generated = solve_by_column_generation(models, 12, lam, warm_start=False)
    table = latency_table(models, 13, lam)
    nash = configuration_costs(greedy_nash(table, 12)[None, :], table)[0]
    assert len(generated.probabilities) >= 2
    assert generated.objective < nash - 1e-6


@pytest.mark.parametrize(("k", "seed"), [(20, 6), (50, 7)])
def test_fifty_endpoints_give_a_verified_ce_between_optimum_and_nash(k: int, seed: int) -> None:
    models = fleet(k, seed)
    n = 32
    lam = 0.95 * sum(m.mu for m in models) / n
    solution = CorrelatedEquilibriumLP(models, n, lam).solve()
    assert solution.method == "column-generation"
    table = latency_table(models, n + 1, lam)
    # the gap, recomputed here on the curves without any pooling, relative to the objective
    assert ce_gap(solution.configurations, solution.probabilities, table) <= (
        1e-6 * solution.objective)
    assert np.all(solution.configurations.sum(axis=1) == n)
    optimum = configuration_costs(greedy_system_optimum(table, n)[None, :], table)[0]
    nash = configuration_costs(greedy_nash(table, n)[None, :], table)[0]
    assert optimum - 1e-12 <= solution.objective <= nash + 1e-12


def test_reduced_costs_are_highs_own() -> None:
    """The pricing formula agrees with HiGHS's column duals on the master's columns."""
    models = fleet(4, 5)
    n = 6
    lam = 0.9 * sum(m.mu for m in models) / n
    table = latency_table(models, n + 1, lam)
    master = _Master(table, n, 0.0)
    every = enumerate_configurations(n, 4)
    master.add(np.concatenate([greedy_nash(table, n)[None, :], every[::7]]))
    master.solve()
    y0, w = master.duals()
    highs_reduced = np.asarray(master.highs.getSolution().col_dual, dtype=float)
    ours = reduced_costs(np.array(master.columns), table, n, y0, w)
    assert ours == pytest.approx(highs_reduced, abs=1e-9)


def test_warm_start_gives_the_same_plan() -> None:
    models = fleet(50, 11)
    n = 32
    lam = 0.9 * sum(m.mu for m in models) / n
    first = solve_by_column_generation(models, n, lam, seed=1)
    again = solve_by_column_generation(models, n, lam, seed=1)
    assert again.objective <= first.objective + 1e-9
    assert again.ce_gap <= 1e-6 * again.objective


def test_failing_endpoints_get_no_tokens() -> None:
    models = (*fleet(9, 4), LatencyModel(d=0.01, mu=1e-9))
    n = 16
    lam = 0.8 * sum(m.mu for m in models) / n
    solution = CorrelatedEquilibriumLP(models, n, lam).solve()
    assert solution.method == "column-generation"
    assert np.all(solution.configurations[:, -1] == 0)
    assert solution.ce_gap <= 1e-6 * solution.objective


def test_move_deltas_match_recomputed_reduced_costs() -> None:
    """The O(k^2) move deltas of the local search are the reduced costs' own differences."""
    rng = np.random.default_rng(3)
    models = fleet(7, 2)
    n = 9
    table = latency_table(models, n + 1, 0.8 * sum(m.mu for m in models) / n)
    for _ in range(20):
        c = np.bincount(rng.integers(0, 7, size=n), minlength=7)
        w = rng.uniform(0, 2, size=(7, 7)) * (rng.random((7, 7)) < 0.5)
        np.fill_diagonal(w, 0.0)
        y0 = float(rng.normal())
        deltas = move_deltas(c, table, n, w)
        base = reduced_costs(c[None, :], table, n, y0, w)[0]
        for a in range(7):
            for b in range(7):
                if a == b or c[a] == 0:
                    assert deltas[a, b] == np.inf
                    continue
                moved = c.copy()
                moved[a] -= 1
                moved[b] += 1
                expected = reduced_costs(moved[None, :], table, n, y0, w)[0] - base
                assert deltas[a, b] == pytest.approx(expected, abs=1e-9)
