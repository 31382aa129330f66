"""Regret matching against equilibria computable by hand (Hart & Mas-Colell 2000)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.regret import (
    UNIFORM_CHECK_FROM,
    RegretMatcher,
    RoutingRegret,
    stationary_strategy,
    switching_matrix,
    unconditional_strategy,
)

# Rock-paper-scissors, row player's payoff; the column player's is the negative.
RPS = np.array([[0, -1, 1], [1, 0, -1], [-1, 1, 0]], dtype=float)


def play(game_row: np.ndarray, game_col: np.ndarray, mode: str, rounds: int, seed: int):
    rng = random.Random(seed)
    k_row, k_col = game_row.shape
    bound = float(max(np.abs(game_row).max(), np.abs(game_col).max()))
    a = RegretMatcher(k_row, mode=mode, payoff_bound=bound)  # type: ignore[arg-type]
    b = RegretMatcher(k_col, mode=mode, payoff_bound=bound)  # type: ignore[arg-type]
    joint = np.zeros((k_row, k_col))
    for _ in range(rounds):
        i, j = a.choose(rng), b.choose(rng)
        a.observe(i, game_row[:, j])
        b.observe(j, game_col[i, :])
        joint[i, j] += 1
    return a, b, joint / rounds


def ce_violation(joint: np.ndarray, game_row: np.ndarray, game_col: np.ndarray) -> float:
    """Largest gain either player gets by a swap j -> k under the joint distribution."""
    worst = 0.0
    k_row, k_col = joint.shape
    for j in range(k_row):
        for k in range(k_row):
            worst = max(worst, float(joint[j] @ (game_row[k] - game_row[j])))
    for j in range(k_col):
        for k in range(k_col):
            worst = max(worst, float(joint[:, j] @ (game_col[:, k] - game_col[:, j])))
    return worst


def test_rock_paper_scissors_averages_one_third() -> None:
    a, b, _ = play(RPS, -RPS, "unconditional", 20000, seed=3)
    assert np.allclose(a.counts / a.t, 1 / 3, atol=0.03)
    assert np.allclose(b.counts / b.t, 1 / 3, atol=0.03)


def test_rock_paper_scissors_conditional_procedure_approaches_the_unique_ce() -> None:
    # The procedure's inertia (mu > 2M(m-1)) makes it slow; the CE violation shrinks with t.
    for seed in (1, 2):
        _, _, early = play(RPS, -RPS, "conditional", 1000, seed=seed)
        a, b, late = play(RPS, -RPS, "conditional", 20000, seed=seed)
        assert ce_violation(late, RPS, -RPS) < ce_violation(early, RPS, -RPS)
        assert ce_violation(late, RPS, -RPS) < 0.1
        assert np.allclose(a.counts / a.t, 1 / 3, atol=0.08)
        assert np.allclose(b.counts / b.t, 1 / 3, atol=0.08)


def test_conditional_regret_matching_reaches_ce_set_in_chicken() -> None:
    # Chicken: (dare, dare) crashes. Payoffs (row, col).
    row = np.array([[0.0, 7.0], [2.0, 6.0]])
    col = row.T.copy()
    a, b, joint = play(row, col, "conditional", 30000, seed=5)
    # The empirical joint distribution is (close to) a correlated equilibrium ...
    assert ce_violation(joint, row, col) < 0.05
    # ... and the players' conditional regrets, which *are* that CE constraint, vanish.
    assert np.max(a.conditional_regrets) < 0.05
    assert np.max(b.conditional_regrets) < 0.05
    # Crash (dare, dare) is rare in every correlated equilibrium of chicken here.
    assert joint[0, 0] < 0.2


def test_prisoners_dilemma_learns_dominant_strategy() -> None:
    # Defect (1) strictly dominates cooperate (0): the only CE is (defect, defect).
    row = np.array([[3.0, 0.0], [5.0, 1.0]])
    _, _, joint = play(row, row.T.copy(), "conditional", 5000, seed=1)
    assert joint[1, 1] > 0.9


def test_switching_matrix_is_stochastic_with_inertia() -> None:
    d = np.array([[0.0, 0.3, -0.1], [0.0, 0.0, 0.0], [0.2, 0.2, 0.0]])
    p = switching_matrix(d, mu=1.0)
    assert np.allclose(p.sum(axis=1), 1.0)
    assert p[0, 1] == pytest.approx(0.3) and p[0, 2] == 0.0 and p[0, 0] == pytest.approx(0.7)
    assert np.all(np.diag(p) > 0)
    with pytest.raises(ValueError):
        switching_matrix(d, mu=0.3)


def test_stationary_strategy_is_invariant_and_independent_of_mu() -> None:
    d = np.array([[0.0, 0.4, 0.1], [0.05, 0.0, 0.0], [0.3, 0.2, 0.0]])
    q = stationary_strategy(d)
    for mu in (1.0, 5.0):
        assert np.allclose(q @ switching_matrix(d, mu), q, atol=1e-9)
    assert q.sum() == pytest.approx(1.0)
    # Action 1 is regretted least (it is rarely left): it gets the most weight.
    assert q.argmax() == 1


def test_stationary_strategy_without_regret_is_uniform() -> None:
    assert np.allclose(stationary_strategy(np.zeros((4, 4))), 0.25)


def test_unconditional_strategy() -> None:
    assert np.allclose(unconditional_strategy(np.array([1.0, -2.0, 3.0])), [0.25, 0.0, 0.75])
    assert np.allclose(unconditional_strategy(np.array([-1.0, -2.0])), [0.5, 0.5])


def test_routing_regret_moves_off_a_slow_endpoint_and_back() -> None:
    rr = RoutingRegret(3, memory=5.0)
    fast, slow = 0.005, 0.25
    q = np.full(3, 1 / 3)
    for _ in range(20):
        counts = 300 * q
        costs = np.array([fast, fast, slow])
        rr.update(counts, costs, costs, dt=0.5)
        q = rr.strategy("conditional")
    assert q[2] < 0.01 and q[0] == pytest.approx(q[1], rel=0.05)
    # Recovery: fresh estimates show endpoint 2 as fast as the others.
    for _ in range(10):
        rr.update(300 * q, np.full(3, fast), np.full(3, fast), dt=0.5)
    assert rr.strategy("conditional")[2] > 0.25


def test_routing_regret_ignores_jitter_within_the_indifference_margin() -> None:
    rr = RoutingRegret(2, memory=5.0)
    rr.update(np.array([50.0, 50.0]), np.array([0.0100, 0.0104]), np.array([0.0100, 0.0104]), 0.5)
    assert np.allclose(rr.strategy("conditional"), 0.5)


def test_routing_regret_matrix_is_hart_mas_colell_average() -> None:
    rr = RoutingRegret(2, memory=1e9, tolerance=0.0, tolerance_abs=0.0)
    rr.update(np.array([10.0, 0.0]), np.array([0.3, 0.0]), np.array([0.3, 0.1]), dt=1.0)
    rr.update(np.array([0.0, 10.0]), np.array([0.0, 0.1]), np.array([0.3, 0.1]), dt=1.0)
    # D(0,1) = (1/t) * sum over periods where 0 was played of [u(1) - u(0)] = (0.3-0.1)/2.
    assert rr.conditional[0, 1] == pytest.approx(0.1, rel=1e-6)
    assert rr.conditional[1, 0] == pytest.approx(-0.1, rel=1e-6)


def test_resize_keeps_regrets_of_surviving_endpoints() -> None:
    rr = RoutingRegret(3, memory=5.0)
    rr.update(np.array([10.0, 10.0, 10.0]), np.array([0.01, 0.01, 0.5]),
              np.array([0.01, 0.01, 0.5]), dt=0.5)
    before = rr.conditional[2, 0]
    rr.resize([2, 0, None])
    assert rr.conditional.shape == (3, 3)
    assert rr.conditional[0, 1] == pytest.approx(before)
    assert np.all(rr.conditional[2] == 0)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 7), st.data())
def test_resize_moves_every_kept_entry_to_its_new_place(k: int, data: st.DataObject) -> None:
    """The fancy-indexed copy is the entry-by-entry definition: keep[new] = old or None."""
    rng = np.random.default_rng(k)
    rr = RoutingRegret(k, memory=5.0)
    rr.conditional, rr.unconditional = rng.normal(size=(k, k)), rng.normal(size=k)
    rr._per_play, rr._freq = rng.normal(size=(k, k)), rng.random(k)
    before = (rr.conditional.copy(), rr.unconditional.copy(), rr._per_play.copy(),
              rr._freq.copy())
    olds = data.draw(st.permutations(range(k)))
    keep: list[int | None] = [data.draw(st.sampled_from([o, None])) for o in olds]
    keep += [None] * data.draw(st.integers(0, 2))
    rr.resize(keep)
    for a, oa in enumerate(keep):
        assert rr.unconditional[a] == (before[1][oa] if oa is not None else 0.0)
        assert rr._freq[a] == (before[3][oa] if oa is not None else 0.0)
        for b, ob in enumerate(keep):
            both = oa is not None and ob is not None
            assert rr.conditional[a, b] == (before[0][oa, ob] if both else 0.0)
            assert rr._per_play[a, b] == (before[2][oa, ob] if both else 0.0)


def test_an_unchanged_regret_state_is_not_solved_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stranger's finding: a large Service nobody called stalled the sidecar, its tick
    solving a k x k system (O(k^3)) for the same rates again and again."""
    rr = RoutingRegret(3, memory=5.0)
    costs = np.array([0.01, 0.02, 0.5])
    rr.update(np.array([10.0, 10.0, 10.0]), costs, costs, dt=0.5)
    solves = []
    solve = np.linalg.solve
    monkeypatch.setattr(np.linalg, "solve", lambda a, b: solves.append(1) or solve(a, b))
    first = rr.strategy("conditional")
    rr.update(np.zeros(3), costs, costs, dt=0.5)  # nothing played: the same rates
    again = rr.strategy("conditional")
    assert len(solves) == 1 and np.array_equal(first, again)
    again[0] = 7.0  # the caller's copy
    assert np.array_equal(rr.strategy("conditional"), first)
    rr.update(np.array([10.0, 0.0, 0.0]), costs, costs * 2, dt=0.5)  # new estimates
    rr.strategy("conditional")
    assert len(solves) == 2


def test_a_large_upstream_with_even_rates_is_uniform_without_a_solve(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After a change of a large upstream's set nothing is known of it (every switch at the
    same rate): its strategy is uniform, given without the O(k^3) solve; below
    UNIFORM_CHECK_FROM endpoints the solve answers as before, to the last bit."""
    solves = []
    solve = np.linalg.solve
    monkeypatch.setattr(np.linalg, "solve", lambda a, b: solves.append(1) or solve(a, b))
    for k, solved in ((UNIFORM_CHECK_FROM + 1, 0), (UNIFORM_CHECK_FROM, 1)):
        rr = RoutingRegret(k, memory=5.0)
        same = np.full(k, 0.01)
        rr.update(np.zeros(k), same, same, dt=0.5)
        q = rr.strategy("conditional")
        assert len(solves) == solved and q.sum() == pytest.approx(1.0)
        if not solved:
            assert np.array_equal(q, np.full(k, 1.0 / k))
    rr = RoutingRegret(UNIFORM_CHECK_FROM + 1, memory=5.0)  # one endpoint slower: solved
    costs = np.full(rr.k, 0.01)
    costs[0] = 0.5
    rr.update(np.full(rr.k, 5.0), costs, costs, dt=0.5)
    assert rr.strategy("conditional")[0] < 1.0 / rr.k and len(solves) == 2


_LATENCIES = st.lists(st.sampled_from([0.0, 5e-324, 1e-9, 0.001, 0.0095, 0.01, 0.0104, 0.5,
                                       3600.0, 1e300, np.inf, -0.002, np.nan]),
                      min_size=1, max_size=6)


@settings(max_examples=400, deadline=None)
@given(_LATENCIES, _LATENCIES, st.sampled_from([0.1, 0.0, 1e-9, 0.5, 3.0, -0.1]),
       st.sampled_from([0.001, 0.0, 1e-12]))
def test_the_indifference_margin_is_its_definition_to_the_last_bit(
        costs: list[float], estimates: list[float], tolerance: float, floor: float) -> None:
    """``max(tolerance_abs, tolerance * |min(c_j, e_k)|)``, whichever way it is computed
    (the outer minimum of each side's margin for latencies, entry by entry otherwise)."""
    rr = RoutingRegret(1, memory=5.0, tolerance=tolerance, tolerance_abs=floor)
    c, e = np.array(costs), np.array(estimates)
    with np.errstate(invalid="ignore"):
        expected = np.array([[np.maximum(floor, tolerance * np.abs(np.minimum(cj, ek)))
                              for ek in e] for cj in c])
        got = rr._indifference(c, e)
    assert got.shape == expected.shape
    assert np.array_equal(got, expected, equal_nan=True)


def test_regrets_stay_finite_when_an_estimate_or_a_cost_is_not() -> None:
    rr = RoutingRegret(3, memory=5.0)
    rr.update(np.array([5.0, 5.0, 0.0]), np.array([0.01, np.inf, 0.0]),
              np.array([0.01, np.inf, 0.02]), dt=0.5)
    assert np.isfinite(rr.conditional).all() and np.isfinite(rr._current).all()
    assert rr._current[1, 1] == 0.0  # inf - inf (NaN) masked to 0
    assert rr._current[0, 1] == 0.0  # 0.01 - inf masked to 0
    assert rr.conditional[1, 0] == 0.0  # a cost of inf: its regrets masked to 0
    q = rr.strategy("conditional")
    assert np.isfinite(q).all() and q.sum() == pytest.approx(1.0)
