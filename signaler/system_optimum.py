"""The convex system-optimum routing program: the signaler's fallback past the LP's size guard.

Owns: Beckmann's program with marginal costs -- minimise the total latency ``sum_j x_j l_j(x_j)``
over flows ``x >= 0`` with ``sum x = demand`` (Beckmann, McGuire & Winsten, "Studies in the
Economics of Transportation", 1956; at the optimum every used endpoint has the same, minimal,
*marginal* cost ``l_j(x) + x l_j'(x)``) -- solved with cvxpy (Clarabel: the program has
second-order-cone terms, which HiGHS does not take), then rounded to tokens and returned in the
same ``CESolution`` shape as the correlated-equilibrium LP.
Pure numerics: no Redis, no asyncio.

Capacity. When the demand fits below every endpoint's knee (``sum_j knee * mu_j >= demand``) the
flows are capped at the knee, so no endpoint is planned past ``knee * mu``; status ``"optimal"``.
Otherwise no plan respects capacity: the caps are dropped and the tangent-continued curve of
:mod:`signaler.latency_model` prices the overload (status ``"overloaded"``; still a usable plan
that spreads the excess where the marginal cost is lowest).

DCP form. Below the knee ``x l(x) = d x + mu/(mu - x) - 1``; past it, with ``u = x - kappa``,
``x l(x) = TC(kappa) + TC'(kappa) u + s u^2`` (``s`` the tangent slope). Splitting
``x = y + u`` with ``0 <= y <= kappa``, ``u >= 0`` and pricing ``y`` and ``u`` separately is exact:
the marginal cost of ``y`` never exceeds ``TC'(kappa)``, so an optimum never uses ``u`` before
``y`` is full.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import cvxpy as cp
import numpy as np

from signaler.latency_model import LatencyModel
from signaler.routing_game import latency_table
from signaler.solution import CESolution, SolverError, usable_endpoints


def solve_system_optimum(
    models: Sequence[LatencyModel],
    n_tokens: int,
    token_load: float,
    *,
    failed_mu_ratio: float = 1e-4,
) -> CESolution:
    """Solve Beckmann's system-optimum program and round the flows to ``n_tokens`` tokens.

    The continuous flows are rounded to tokens by largest remainder and then polished to the
    exact integer optimum by :func:`polish_by_exchange`.

    Returns one configuration with probability 1 (``method="system-optimum"``); ``objective`` is
    the rounded configuration's total latency ``sum_j c_j l_j(c_j lam)`` (the LP's units) and
    ``ce_gap`` its largest per-token gain from deviating (a system optimum is in general not an
    equilibrium, so this may be positive). Raises :class:`SolverError` if the solver fails and
    :class:`NoCapacityError` if every endpoint is failing.
    """
    started = time.perf_counter()
    k = len(models)
    if k == 0:
        raise ValueError("need at least one endpoint")
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    demand = n_tokens * token_load
    working = usable_endpoints(models, demand, failed_mu_ratio)
    if n_tokens == 0 or demand == 0 or working.size == 1:
        counts = np.zeros(k, dtype=np.int64)
        if n_tokens:
            counts[working[0] if working.size else 0] = n_tokens
        return CESolution.single(
            counts, models, token_load, "trivial", "system-optimum", started, 0, 0
        )

    working_models = [models[j] for j in working]
    flows, status = _solve_flows(working_models, demand)
    rounded = round_to_tokens(flows / token_load, n_tokens)
    counts = np.zeros(k, dtype=np.int64)
    counts[working] = polish_by_exchange(
        rounded, latency_table(working_models, n_tokens + 1, token_load)
    )
    return CESolution.single(
        counts, models, token_load, status, "system-optimum", started, 2 * working.size, 1
    )


def _solve_flows(models: Sequence[LatencyModel], demand: float) -> tuple[np.ndarray, str]:
    k = len(models)
    d = np.array([m.d for m in models])
    mu = np.array([m.mu for m in models])
    kappa = np.array([m.knee_load for m in models])
    overloaded = float(kappa.sum()) < demand
    y = cp.Variable(k, nonneg=True)
    cost = d @ y + cp.sum(cp.multiply(mu, cp.inv_pos(mu - y))) - k
    constraints = [y <= kappa]
    if overloaded:
        u = cp.Variable(k, nonneg=True)
        slope = 1.0 / (mu - kappa) ** 2
        marginal_at_knee = np.asarray([m.marginal_cost(m.knee_load) for m in models])
        cost = cost + marginal_at_knee @ u + cp.sum(cp.multiply(slope, cp.square(u)))
        constraints.append(cp.sum(y) + cp.sum(u) == demand)
    else:
        constraints.append(cp.sum(y) == demand)
    problem = cp.Problem(cp.Minimize(cost), constraints)
    try:
        problem.solve(solver=cp.CLARABEL)
    except cp.error.SolverError as error:
        raise SolverError(f"system-optimum program failed: {error}") from error
    if problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) or y.value is None:
        raise SolverError(f"system-optimum program ended with status {problem.status!r}")
    flows = np.maximum(np.asarray(y.value, dtype=float), 0.0)
    if overloaded:
        flows = flows + np.maximum(np.asarray(u.value, dtype=float), 0.0)
    return flows, "overloaded" if overloaded else "optimal"


def round_to_tokens(quotas: np.ndarray, total: int) -> np.ndarray:
    """Largest-remainder rounding of non-negative ``quotas`` to integers summing to ``total``."""
    quotas = np.asarray(quotas, dtype=float)
    if quotas.size == 0 or total <= 0:
        return np.zeros(quotas.size, dtype=np.int64)
    if not np.all(np.isfinite(quotas)) or np.any(quotas < 0) or quotas.sum() <= 0:
        raise ValueError(f"quotas must be finite, >= 0 and not all zero, got {quotas!r}")
    scaled = quotas * (total / quotas.sum())
    counts: np.ndarray = np.floor(scaled).astype(np.int64)
    remainders = scaled - counts
    short = total - int(counts.sum())
    # Stable order: largest remainder first, ties to the lower index.
    for index in np.argsort(-remainders, kind="stable")[:short]:
        counts[index] += 1
    return counts


def polish_by_exchange(counts: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Move single tokens between endpoints while that lowers the total latency.

    The total ``sum_j c_j l_j(c_j lam)`` is separable and convex in the counts, and for such a
    function over ``{c >= 0, sum c = n}`` a configuration no single-token move improves is a global
    integer optimum (Ibaraki & Katoh, "Resource Allocation Problems", 1988). Rounding the
    continuous optimum starts the search within a few moves of it, so this is cheap; it repairs the
    rounding error that matters when tokens are coarse (e.g. 16 tokens over 8 endpoints).
    ``table[j, c] = l_j(c lam)`` must cover counts up to ``n``.
    """
    counts = np.array(counts, dtype=np.int64)
    rows = np.arange(counts.size)
    limit = table.shape[1] - 1
    for _ in range(int(counts.sum()) * counts.size + 1):
        cost = counts * table[rows, counts]
        up = np.minimum(counts + 1, limit)
        down = np.maximum(counts - 1, 0)
        add = np.where(counts < limit, up * table[rows, up] - cost, np.inf)
        remove = np.where(counts > 0, cost - down * table[rows, down], -np.inf)
        source, target = int(np.argmax(remove)), int(np.argmin(add))
        # source == target means remove[j] <= add[j] bounds every pair: no move improves.
        if source == target or add[target] - remove[source] >= -1e-12 * max(cost.sum(), 1e-300):
            break
        counts[source] -= 1
        counts[target] += 1
    return counts
