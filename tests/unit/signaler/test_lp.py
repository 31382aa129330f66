"""signaler.lp: configuration LP vs naive joint LP, CE verification, a textbook game where a
CE beats every Nash equilibrium, the size guard, and degenerate inputs."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signaler.latency_model import LatencyModel
from signaler.lp import (
    CESolution,
    CorrelatedEquilibriumLP,
    NoCapacityError,
    SolverError,
    ce_max_gain,
    naive_joint_lp,
    solve_normal_form_ce,
    solve_with_highs,
)
from signaler.routing_game import (
    ce_gap,
    configuration_costs,
    enumerate_configurations,
    greedy_nash,
    greedy_system_optimum,
    latency_table,
    pure_nash_mask,
)
from tests.signaling_samples import ASYMMETRIC


def _assert_is_ce(solution: CESolution, models: tuple[LatencyModel, ...], lam: float) -> None:
    """Recompute the CE gap independently of CESolution and check it is (numerically) zero."""
    n = solution.n_tokens
    table = latency_table(models, n + 1, lam)
    assert ce_gap(solution.configurations, solution.probabilities, table) <= 1e-6
    assert solution.ce_gap <= 1e-6
    assert solution.probabilities.sum() == pytest.approx(1.0)
    assert np.all(solution.probabilities >= 0)
    assert np.all(solution.configurations.sum(axis=1) == n)


@pytest.mark.parametrize(("n", "utilisation"), [(4, 0.6), (6, 0.6), (6, 0.85)])
def test_configuration_lp_matches_naive_joint_lp(n: int, utilisation: float) -> None:
    lam = utilisation * sum(m.mu for m in ASYMMETRIC) / n
    configuration = CorrelatedEquilibriumLP(ASYMMETRIC, n, lam).solve()
    naive = naive_joint_lp(ASYMMETRIC, n, lam)
    assert configuration.method == "configuration-lp"
    assert naive.method == "joint-profile-lp"
    assert naive.n_variables == 3**n
    assert configuration.n_variables == enumerate_configurations(n, 3).shape[0]
    assert configuration.n_constraints == 3 * 2 + 1
    assert configuration.objective == pytest.approx(naive.objective, rel=1e-6)
    _assert_is_ce(configuration, ASYMMETRIC, lam)
    assert naive.ce_gap <= 1e-6


@pytest.mark.parametrize("n", [3, 8, 20])
def test_best_ce_is_between_system_optimum_and_best_pure_nash(n: int) -> None:
    lam = 0.8 * sum(m.mu for m in ASYMMETRIC) / n
    solution = CorrelatedEquilibriumLP(ASYMMETRIC, n, lam).solve()
    _assert_is_ce(solution, ASYMMETRIC, lam)
    configurations = enumerate_configurations(n, 3)
    table = latency_table(ASYMMETRIC, n + 1, lam)
    costs = configuration_costs(configurations, table)
    nash = pure_nash_mask(configurations, table)
    assert nash.any()  # congestion games have pure equilibria (Rosenthal 1973)
    # Every pure NE is a CE, so the best CE is no worse than the best pure NE ...
    assert solution.objective <= costs[nash].min() + 1e-9
    # ... and no distribution beats the best single configuration.
    assert solution.objective >= costs.min() - 1e-9
    optimum = greedy_system_optimum(table, n)
    assert configuration_costs(optimum[None, :], table)[0] == pytest.approx(costs.min())
    greedy = greedy_nash(table, n)
    assert pure_nash_mask(greedy[None, :], table)[0]


@pytest.mark.parametrize(("n", "utilisation"), [(6, 0.5), (4, 0.85)])
def test_private_signals_beat_every_pure_nash_equilibrium(n: int, utilisation: float) -> None:
    lam = utilisation * sum(m.mu for m in ASYMMETRIC) / n
    solution = CorrelatedEquilibriumLP(ASYMMETRIC, n, lam).solve()
    configurations = enumerate_configurations(n, 3)
    table = latency_table(ASYMMETRIC, n + 1, lam)
    nash_costs = configuration_costs(configurations, table)[pure_nash_mask(configurations, table)]
    assert solution.probabilities.size >= 2  # the mediator randomises ...
    assert solution.objective < 0.95 * nash_costs.min()  # ... and that buys >5 % latency
    _assert_is_ce(solution, ASYMMETRIC, lam)


@settings(max_examples=25, deadline=None)
@given(
    capacities=st.lists(st.floats(1.0, 20.0), min_size=2, max_size=4),
    delays=st.lists(st.floats(0.0, 0.05), min_size=4, max_size=4),
    n=st.integers(1, 7),
    utilisation=st.floats(0.1, 1.2),
)
def test_every_lp_solution_is_a_ce_between_optimum_and_nash(
    capacities: list[float], delays: list[float], n: int, utilisation: float
) -> None:
    models = tuple(LatencyModel(d=d, mu=mu) for d, mu in zip(delays, capacities, strict=False))
    lam = utilisation * sum(capacities) / n
    solution = CorrelatedEquilibriumLP(models, n, lam).solve()
    _assert_is_ce(solution, models, lam)
    configurations = enumerate_configurations(n, len(models))
    table = latency_table(models, n + 1, lam)
    costs = configuration_costs(configurations, table)
    nash = pure_nash_mask(configurations, table)
    scale = max(1.0, float(costs.max()))
    assert costs.min() - 1e-9 * scale <= solution.objective <= costs[nash].min() + 1e-7 * scale


def test_epsilon_relaxation_never_costs_more() -> None:
    lam = 0.85 * sum(m.mu for m in ASYMMETRIC) / 10
    exact = CorrelatedEquilibriumLP(ASYMMETRIC, 10, lam).solve()
    relaxed = CorrelatedEquilibriumLP(ASYMMETRIC, 10, lam, epsilon=0.05).solve()
    assert relaxed.objective <= exact.objective + 1e-9
    assert relaxed.ce_gap <= 0.05 + 1e-6


CHICKEN_ROW = np.array([[6.0, 2.0], [7.0, 0.0]])  # actions: 0 = yield (C), 1 = dare (D)


def test_chicken_best_ce_beats_every_nash_equilibrium() -> None:
    payoffs = [CHICKEN_ROW, CHICKEN_ROW.T]
    ce = solve_normal_form_ce(payoffs)
    # Known answer: P(C,C) = 1/2, P(C,D) = P(D,C) = 1/4, total payoff 10.5.
    assert ce.total_payoff == pytest.approx(10.5, abs=1e-7)
    assert ce.distribution == pytest.approx(np.array([[0.5, 0.25], [0.25, 0.0]]), abs=1e-7)
    assert ce.max_gain <= 1e-9
    # Nash equilibria by hand: the pure ones (D,C), (C,D) total 9; the mixed one has each
    # player yield with q where 6q + 2(1-q) = 7q  =>  q = 2/3, payoff 14/3 each, total 28/3.
    pure_totals = [7 + 2, 2 + 7]
    q = 2 / 3
    mixed = np.outer([q, 1 - q], [q, 1 - q])
    mixed_total = float(np.sum(mixed * (payoffs[0] + payoffs[1])))
    assert mixed_total == pytest.approx(28 / 3)
    assert ce_max_gain(payoffs, mixed) <= 1e-12  # it is an equilibrium ...
    assert ce.total_payoff > max([*pure_totals, mixed_total]) + 1  # ... and the CE beats it


def test_ce_max_gain_detects_a_non_equilibrium() -> None:
    payoffs = [CHICKEN_ROW, CHICKEN_ROW.T]
    both_yield = np.array([[1.0, 0.0], [0.0, 0.0]])
    assert ce_max_gain(payoffs, both_yield) == pytest.approx(1.0)  # 7 - 6 by daring


def test_normal_form_three_player_game() -> None:
    # Three players each pick one of two roads; a road's cost is its number of users.
    profiles = np.indices((2, 2, 2))
    loads = [np.sum(profiles == road, axis=0) for road in (0, 1)]
    payoffs = [-np.choose(profiles[i], loads) for i in range(3)]
    ce = solve_normal_form_ce(payoffs)
    assert ce.max_gain <= 1e-9
    assert ce.total_payoff == pytest.approx(-5.0)  # a 2-1 split: 2*2 + 1


def test_normal_form_rejects_malformed_games() -> None:
    with pytest.raises(ValueError):
        solve_normal_form_ce([np.zeros((2, 2))])
    with pytest.raises(ValueError):
        solve_normal_form_ce([np.zeros((2, 2)), np.full((2, 2), np.nan)])


def test_size_guard_solves_64x4_by_lp_and_16x8_by_column_generation() -> None:
    four = tuple(LatencyModel(d=0.002 * (1 + j % 3), mu=50.0 * (1 + j)) for j in range(4))
    lam4 = 0.7 * sum(m.mu for m in four) / 64
    big = CorrelatedEquilibriumLP(four, 64, lam4, max_configurations=100_000).solve()
    assert big.method == "configuration-lp"
    assert big.n_variables == 47_905
    _assert_is_ce(big, four, lam4)
    # by default, past 5,000 configurations: the same optimum by column generation
    generated4 = CorrelatedEquilibriumLP(four, 64, lam4).solve()
    assert generated4.method == "column-generation"
    assert generated4.status == "optimal"
    assert generated4.objective == pytest.approx(big.objective, rel=1e-7)
    _assert_is_ce(generated4, four, lam4)

    eight = tuple(LatencyModel(d=0.002 * (1 + j % 3), mu=50.0 * (1 + j % 4)) for j in range(8))
    lam8 = 0.7 * sum(m.mu for m in eight) / 16
    guarded = CorrelatedEquilibriumLP(eight, 16, lam8)
    assert guarded.n_configurations == 245_157
    generated = guarded.solve()
    # past the guard: still a CE, proven best by pricing all 245,157 configurations
    assert generated.method == "column-generation"
    assert generated.status == "optimal"
    assert generated.n_tokens == 16
    _assert_is_ce(generated, eight, lam8)
    table = latency_table(eight, 17, lam8)
    best = configuration_costs(greedy_system_optimum(table, 16)[None, :], table)[0]
    assert generated.objective >= best - 1e-12

    # the old fallback, on request: the rounded-and-polished convex optimum, the exact integer
    # optimum, which is not an equilibrium
    fallback = CorrelatedEquilibriumLP(eight, 16, lam8, column_generation=False).solve()
    assert fallback.method == "system-optimum"
    assert fallback.configurations.shape == (1, 8)
    assert fallback.probabilities.tolist() == [1.0]
    assert fallback.objective == pytest.approx(best, rel=1e-12)


def test_single_endpoint_is_trivial() -> None:
    solution = CorrelatedEquilibriumLP((LatencyModel(d=0.01, mu=10.0),), 7, 1.0).solve()
    assert solution.status == "trivial"
    assert solution.configurations.tolist() == [[7]]
    assert solution.objective == pytest.approx(7 * (0.01 + 1 / 3))
    assert solution.ce_gap == 0.0


def test_no_demand_gives_the_empty_configuration() -> None:
    solution = CorrelatedEquilibriumLP(ASYMMETRIC, 0, 1.0).solve()
    assert solution.configurations.tolist() == [[0, 0, 0]]
    assert solution.objective == 0.0
    assert solution.ce_gap == 0.0


def test_failing_endpoint_gets_no_tokens() -> None:
    models = (*ASYMMETRIC, LatencyModel(d=0.0, mu=1e-7))
    lam = 0.6 * sum(m.mu for m in ASYMMETRIC) / 6
    solution = CorrelatedEquilibriumLP(models, 6, lam).solve()
    assert np.all(solution.configurations[:, 3] == 0)
    healthy = CorrelatedEquilibriumLP(ASYMMETRIC, 6, lam).solve()
    assert solution.objective == pytest.approx(healthy.objective, rel=1e-6)
    _assert_is_ce(solution, models, lam)


def test_all_endpoints_failing_is_a_clear_error() -> None:
    models = (LatencyModel(d=0.0, mu=1e-9), LatencyModel(d=0.0, mu=2e-9))
    lp = CorrelatedEquilibriumLP(models, 8, 1.0)
    with pytest.raises(NoCapacityError, match="failing"):
        lp.solve()
    assert issubclass(NoCapacityError, SolverError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_tokens": -1},
        {"token_load": float("nan")},
        {"token_load": -1.0},
        {"epsilon": -0.1},
        {"models": ()},
        {"n_tokens": 2.5},
    ],
)
def test_invalid_lp_inputs_are_rejected(kwargs: dict[str, object]) -> None:
    arguments: dict[str, object] = {"models": ASYMMETRIC, "n_tokens": 4, "token_load": 1.0}
    arguments.update(kwargs)
    with pytest.raises(ValueError):
        CorrelatedEquilibriumLP(**arguments)  # type: ignore[arg-type]


def test_infeasible_or_unbounded_programs_raise_solver_error() -> None:
    x = cp.Variable(2, nonneg=True)
    infeasible = cp.Problem(cp.Minimize(cp.sum(x)), [cp.sum(x) == 1, x[0] + x[1] <= 0.5])
    with pytest.raises(SolverError, match="toy LP: HiGHS ended with status 'infeasible'"):
        solve_with_highs(infeasible, "toy LP")
    unbounded = cp.Problem(cp.Maximize(cp.sum(x)), [x[0] >= 1])
    with pytest.raises(SolverError, match="unbounded"):
        solve_with_highs(unbounded, "toy LP")
