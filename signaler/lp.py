"""The correlated-equilibrium linear programs the signaler solves.

Owns: :class:`CorrelatedEquilibriumLP`, the best correlated equilibrium of the symmetric routing
game over *configurations* (with a size guard that falls back to the convex system optimum);
:func:`naive_joint_lp`, the same problem over all ``k**n`` joint profiles (a cross-check for tests);
and :func:`solve_normal_form_ce` / :func:`ce_max_gain` for a general finite game. Pure numerics:
cvxpy + HiGHS, no Redis, no asyncio. Failures raise :class:`SolverError`; nothing returns ``None``.

Correlated equilibrium (Aumann 1974): a distribution ``p`` over joint action profiles such that no
player, told its own action ``j`` by a mediator who drew a profile from ``p``, expects to gain by
playing ``j'`` instead::

    for every player i and j != j':  sum_{s: s_i = j} p(s) [u_i(j', s_-i) - u_i(s)] <= 0

These are linear in ``p``, so the best CE is a linear program. For the routing game the players
(tokens) are symmetric and the objective (expected total latency) is symmetric, so averaging an
optimal CE over all permutations of the players gives an optimal CE that is symmetric; a symmetric
distribution is a distribution over configurations (count vectors), which shrinks the program
from ``k**n`` variables and ``n k (k-1)`` rows to ``C(n+k-1, k-1)`` variables and ``k (k-1)`` rows
(Papadimitriou & Roughgarden, "Computing correlated equilibria in multi-player games", JACM 2008).
:mod:`signaler.routing_game` derives the configuration form of one incentive row.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import cvxpy as cp
import highspy
import numpy as np

from signaler.column_generation import DEFAULT_TIME_BUDGET, solve_by_column_generation
from signaler.latency_model import LatencyModel
from signaler.routing_game import (
    configuration_costs,
    count_configurations,
    deviation_gains,
    enumerate_configurations,
    latency_table,
)
from signaler.solution import CESolution, NoCapacityError, SolverError, usable_endpoints
from signaler.system_optimum import solve_system_optimum

__all__ = [
    "DEFAULT_MAX_CONFIGURATIONS",
    "CESolution",
    "CorrelatedEquilibriumLP",
    "NoCapacityError",
    "NormalFormCE",
    "SolverError",
    "ce_max_gain",
    "naive_joint_lp",
    "solve_normal_form_ce",
    "solve_with_highs",
]

#: Largest number of configurations the LP is built in full for (16 tokens x 4 endpoints: 969).
#: Past it, column generation reaches the same optimum about ten times faster where every
#: configuration can be priced (32 x 5, 58,905: 0.06 s against 0.9 s, docs/benchmarks.md).
DEFAULT_MAX_CONFIGURATIONS = 5_000
#: The naive joint-profile LP is for tests only; refuse anything bigger than this many profiles.
MAX_JOINT_PROFILES = 200_000

_ACCEPTED = {cp.OPTIMAL: "optimal", cp.OPTIMAL_INACCURATE: "optimal_inaccurate"}


@functools.cache
def _silence_highs_banner() -> None:
    """HiGHS prints a copyright banner on stdout the first time a solver object is created in a
    process, which would corrupt machine-readable output (e.g. the bench CLI's JSON). Create that
    first object with file descriptor 1 pointed at /dev/null; later ones print nothing."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no usable stdout: nothing to protect
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def solve_with_highs(problem: cp.Problem, what: str) -> str:
    """Solve ``problem`` with HiGHS; return ``"optimal"`` or ``"optimal_inaccurate"``, or raise
    :class:`SolverError` naming ``what`` and the solver's status (infeasible, unbounded, ...)."""
    _silence_highs_banner()
    try:
        problem.solve(solver=cp.HIGHS)
    except cp.error.SolverError as error:
        raise SolverError(f"{what}: HiGHS failed: {error}") from error
    if problem.status not in _ACCEPTED:
        raise SolverError(f"{what}: HiGHS ended with status {problem.status!r}")
    return _ACCEPTED[problem.status]


@dataclass(frozen=True)
class CorrelatedEquilibriumLP:
    """The best (least expected total latency) correlated equilibrium of ``n_tokens`` symmetric
    tokens, each carrying ``token_load``, over endpoints priced by ``models``.

    Variables ``p(c)`` over configurations ``c``; ``sum p = 1``, ``p >= 0``; for every ``j != j'``
    ``(1/n) sum_c p(c) c_j [l_j(c_j lam) - l_j'((c_j'+1) lam)] <= epsilon`` (no token expects to
    gain more than ``epsilon`` by moving from a recommended ``j`` to ``j'``); minimise
    ``sum_c p(c) sum_j c_j l_j(c_j lam)``.

    Size guard: when the non-failing endpoints have more than ``max_configurations``
    configurations, :meth:`solve` generates the configurations it needs instead of listing them
    all (``method="column-generation"``, :mod:`signaler.column_generation`): still a correlated
    equilibrium, proven the best one where every configuration can be priced, otherwise the best
    found within ``time_budget`` seconds. With ``column_generation=False`` it returns the convex
    system optimum (``method="system-optimum"``, :mod:`signaler.system_optimum`), which is not
    an equilibrium.

    Degenerate inputs: no tokens gives the empty configuration; a single (non-failing) endpoint
    gives the one configuration with every token on it (status ``"trivial"``); failing endpoints
    (``mu`` below ``failed_mu_ratio`` of the best capacity or of the demand) get no tokens; when
    all are failing :meth:`solve` raises :class:`NoCapacityError`.
    """

    models: tuple[LatencyModel, ...]
    n_tokens: int
    token_load: float
    epsilon: float = 0.0
    max_configurations: int = DEFAULT_MAX_CONFIGURATIONS
    failed_mu_ratio: float = 1e-4
    #: Past the size guard: column generation (a CE, see :mod:`signaler.column_generation`)
    #: within ``time_budget`` seconds, or (False) the system optimum, which is not a CE.
    column_generation: bool = True
    time_budget: float = DEFAULT_TIME_BUDGET

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))
        if not self.models:
            raise ValueError("need at least one endpoint model")
        if not all(isinstance(model, LatencyModel) for model in self.models):
            raise ValueError("models must be LatencyModel instances")
        if isinstance(self.n_tokens, bool) or not isinstance(self.n_tokens, int | np.integer):
            raise ValueError(f"n_tokens must be an int, got {self.n_tokens!r}")
        if self.n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {self.n_tokens}")
        if not (math.isfinite(self.token_load) and self.token_load >= 0):
            raise ValueError(f"token_load must be finite and >= 0, got {self.token_load!r}")
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise ValueError(f"epsilon must be finite and >= 0, got {self.epsilon!r}")
        if self.max_configurations < 1:
            raise ValueError("max_configurations must be >= 1")

    @property
    def n_endpoints(self) -> int:
        return len(self.models)

    @property
    def n_configurations(self) -> int:
        """``C(n + k - 1, k - 1)`` over all endpoints (the guard counts non-failing ones)."""
        return count_configurations(self.n_tokens, self.n_endpoints)

    def solve(self) -> CESolution:
        """Solve the LP (or the system-optimum fallback) and verify the result's CE gap."""
        started = time.perf_counter()
        k, n = self.n_endpoints, self.n_tokens
        working = usable_endpoints(self.models, n * self.token_load, self.failed_mu_ratio)
        if n == 0 or working.size == 1:
            counts = np.zeros(k, dtype=np.int64)
            counts[working[0]] = n
            return CESolution.single(
                counts, self.models, self.token_load, "trivial", "configuration-lp", started, 1, 1
            )
        if count_configurations(n, working.size) > self.max_configurations:
            if not self.column_generation:
                return solve_system_optimum(
                    self.models, n, self.token_load, failed_mu_ratio=self.failed_mu_ratio
                )
            return solve_by_column_generation(
                self.models, n, self.token_load, working=working, epsilon=self.epsilon,
                time_budget=self.time_budget,
            )

        kw = working.size
        local = enumerate_configurations(n, kw)
        table = latency_table([self.models[j] for j in working], n + 1, self.token_load)
        costs = configuration_costs(local, table)
        off_diagonal = ~np.eye(kw, dtype=bool).reshape(-1)
        gains = deviation_gains(local, table).reshape(local.shape[0], -1)[:, off_diagonal].T

        compiled = _compiled_configuration_lp(local.shape[0], gains.shape[0])
        with compiled.lock:
            compiled.costs.value = costs
            compiled.gains.value = gains
            compiled.epsilon.value = float(self.epsilon)
            status = solve_with_highs(
                compiled.problem, f"configuration LP ({n} tokens x {kw} endpoints)"
            )
            if compiled.p.value is None:
                raise SolverError("configuration LP returned no solution")
            distribution = np.array(compiled.p.value, dtype=float)

        configurations = np.zeros((local.shape[0], k), dtype=np.int64)
        configurations[:, working] = local
        return CESolution.from_distribution(
            configurations,
            distribution,
            self.models,
            self.token_load,
            status=status,
            method="configuration-lp",
            started=started,
            n_variables=local.shape[0],
            n_constraints=gains.shape[0] + 1,
        )


@dataclass(frozen=True)
class _CompiledLP:
    """One configuration LP shape, compiled once: the signaler re-solves the same (tokens x
    endpoints) shape every epoch with new latency models, so the coefficients are cvxpy
    Parameters (a DPP problem) and cvxpy's canonicalisation — half the time of a 64 x 4 solve
    when rebuilt each epoch — is done only on the first solve. The lock serialises solves of
    one shape (the signaler may solve in worker threads)."""

    problem: cp.Problem
    p: cp.Variable
    costs: cp.Parameter
    gains: cp.Parameter
    epsilon: cp.Parameter
    lock: threading.Lock


@functools.lru_cache(maxsize=16)
def _compiled_configuration_lp(n_configurations: int, n_rows: int) -> _CompiledLP:
    p = cp.Variable(n_configurations, nonneg=True)
    costs = cp.Parameter(n_configurations)
    gains = cp.Parameter((n_rows, n_configurations))
    epsilon = cp.Parameter(nonneg=True)
    problem = cp.Problem(cp.Minimize(costs @ p), [cp.sum(p) == 1, gains @ p <= epsilon])
    return _CompiledLP(problem, p, costs, gains, epsilon, threading.Lock())


# --- general finite games ------------------------------------------------------------------------


@dataclass(frozen=True)
class NormalFormCE:
    """A correlated equilibrium of a finite game: ``distribution`` has one axis per player."""

    distribution: np.ndarray
    total_payoff: float
    max_gain: float
    status: str
    solve_seconds: float


def _check_game(payoff_tensors: Sequence[np.ndarray]) -> list[np.ndarray]:
    tensors = [np.asarray(tensor, dtype=float) for tensor in payoff_tensors]
    if not tensors:
        raise ValueError("a game needs at least one player")
    shape = tensors[0].shape
    if len(shape) != len(tensors) or any(t.shape != shape for t in tensors):
        raise ValueError(
            f"need one payoff tensor per player, each with one axis per player; got shapes "
            f"{[t.shape for t in tensors]}"
        )
    if 0 in shape or not all(np.all(np.isfinite(t)) for t in tensors):
        raise ValueError("payoffs must be finite and every player needs at least one action")
    return tensors


def _incentive_rows(tensors: list[np.ndarray]) -> np.ndarray:
    """One row per (player i, j, j'): ``[s_i = j] (u_i(j', s_-i) - u_i(s))`` over flat profiles."""
    rows = []
    for player, payoff in enumerate(tensors):
        actions = payoff.shape[player]
        index = np.arange(actions).reshape([-1 if a == player else 1 for a in range(payoff.ndim)])
        for j in range(actions):
            told_j = np.broadcast_to(index == j, payoff.shape)
            for j_prime in range(actions):
                if j_prime == j:
                    continue
                deviated = np.take(payoff, [j_prime], axis=player)
                rows.append(np.where(told_j, deviated - payoff, 0.0).reshape(-1))
    size = tensors[0].size
    return np.array(rows).reshape(-1, size)


def ce_max_gain(payoff_tensors: Sequence[np.ndarray], distribution: np.ndarray) -> float:
    """Largest expected gain (>= 0) any player gets by deviating from any recommendation under
    ``distribution`` (0 exactly for a correlated equilibrium)."""
    tensors = _check_game(payoff_tensors)
    p = np.asarray(distribution, dtype=float)
    if p.shape != tensors[0].shape:
        raise ValueError(f"distribution shape {p.shape} does not match game {tensors[0].shape}")
    rows = _incentive_rows(tensors)
    return max(float((rows @ p.reshape(-1)).max(initial=0.0)), 0.0)


def solve_normal_form_ce(
    payoff_tensors: Sequence[np.ndarray], *, epsilon: float = 0.0
) -> NormalFormCE:
    """The correlated equilibrium of a finite game that maximises the players' total payoff.

    ``payoff_tensors[i][s]`` is player ``i``'s payoff at profile ``s`` (one axis per player).
    Solved with cvxpy + HiGHS; the returned ``max_gain`` is recomputed by :func:`ce_max_gain`.
    """
    started = time.perf_counter()
    tensors = _check_game(payoff_tensors)
    rows = _incentive_rows(tensors)
    welfare = np.sum(tensors, axis=0).reshape(-1)
    p = cp.Variable(welfare.size, nonneg=True)
    constraints = [cp.sum(p) == 1]
    if rows.shape[0]:
        constraints.append(rows @ p <= epsilon)
    problem = cp.Problem(cp.Maximize(welfare @ p), constraints)
    status = solve_with_highs(problem, f"normal-form CE LP (game {tensors[0].shape})")
    if p.value is None:
        raise SolverError("normal-form CE LP returned no solution")
    flat = np.maximum(np.asarray(p.value, dtype=float), 0.0)
    flat /= flat.sum()
    distribution = flat.reshape(tensors[0].shape)
    return NormalFormCE(
        distribution=distribution,
        total_payoff=float(welfare @ flat),
        max_gain=ce_max_gain(tensors, distribution),
        status=status,
        solve_seconds=time.perf_counter() - started,
    )


def routing_game_payoffs(
    models: Sequence[LatencyModel], n_tokens: int, token_load: float
) -> list[np.ndarray]:
    """The routing game in normal form: ``u_i(s) = -l_{s_i}(count of s_i in s * lam)``."""
    k = len(models)
    if k**n_tokens > MAX_JOINT_PROFILES:
        raise ValueError(f"{k}**{n_tokens} joint profiles is too many for the naive LP")
    table = latency_table(models, n_tokens, token_load)
    profiles = np.indices((k,) * n_tokens).reshape(n_tokens, -1).T  # (k**n, n)
    counts = np.stack([np.sum(profiles == j, axis=1) for j in range(k)], axis=1)
    own_counts = np.take_along_axis(counts, profiles, axis=1)
    payoffs = -table[profiles, own_counts]  # (k**n, n)
    return [payoffs[:, i].reshape((k,) * n_tokens) for i in range(n_tokens)]


def naive_joint_lp(models: Sequence[LatencyModel], n_tokens: int, token_load: float) -> CESolution:
    """The best CE over all ``k**n`` joint profiles (no symmetry used). For tests, small ``n``.

    The optimal joint distribution is aggregated into configurations so it compares directly
    with :class:`CorrelatedEquilibriumLP`; ``ce_gap`` is the joint game's largest per-player gain
    (never smaller than the aggregated distribution's).
    """
    started = time.perf_counter()
    if n_tokens < 1:
        raise ValueError("the naive joint LP needs at least one token")
    tensors = routing_game_payoffs(models, n_tokens, token_load)
    equilibrium = solve_normal_form_ce(tensors)
    k = len(models)
    profiles = np.indices((k,) * n_tokens).reshape(n_tokens, -1).T
    counts = np.stack([np.sum(profiles == j, axis=1) for j in range(k)], axis=1)
    configurations, inverse = np.unique(counts, axis=0, return_inverse=True)
    probabilities = np.bincount(inverse.reshape(-1), weights=equilibrium.distribution.reshape(-1))
    solution = CESolution.from_distribution(
        configurations,
        probabilities,
        models,
        token_load,
        status=equilibrium.status,
        method="joint-profile-lp",
        started=started,
        n_variables=k**n_tokens,
        n_constraints=n_tokens * k * (k - 1) + 1,
    )
    return dataclasses.replace(solution, ce_gap=max(solution.ce_gap, equilibrium.max_gain))
