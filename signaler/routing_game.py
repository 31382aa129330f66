"""The symmetric routing game the signaler solves: tokens (players) choosing endpoints.

Owns: enumerating configurations (count vectors), pricing them with the endpoints' latency
models, the correlated-equilibrium gap of a distribution over configurations, pure Nash
configurations, the exact integer system optimum, and a regret-matching simulation used as the
"independent play" baseline. Pure numerics: no Redis, no asyncio, no global RNG (pass a
``numpy.random.Generator``).

The game. ``n`` tokens each carry ``token_load`` of traffic and pick one of ``k`` endpoints; a
token on endpoint ``j`` with ``c_j`` tokens there suffers ``l_j(c_j * token_load)``. Players are
symmetric, so a distribution over joint profiles that is invariant under permuting players is a
distribution ``p`` over configurations ``c`` (``sum(c) = n``), and the chance that a given token is
told ``j`` in configuration ``c`` is ``c_j / n`` (Papadimitriou & Roughgarden, "Computing correlated
equilibria in multi-player games", JACM 2008). A token told ``j`` that moves to ``j'`` gains
``l_j(c_j * lam) - l_j'((c_j' + 1) * lam)``; its expected gain, weighted by the chance of being told
``j``, is ``(1/n) * sum_c p(c) * c_j * [l_j(c_j lam) - l_j'((c_j'+1) lam)]``. That is exactly one
player's CE constraint in the joint-profile LP and, averaged over periods instead of over ``p``,
Hart & Mas-Colell's conditional regret ``D(j, j')``.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

from signaler.latency_model import LatencyModel


def count_configurations(n_tokens: int, n_endpoints: int) -> int:
    """``C(n + k - 1, k - 1)``: how many ways ``n`` identical tokens split over ``k`` endpoints."""
    if n_tokens < 0 or n_endpoints < 1:
        raise ValueError("need n_tokens >= 0 and n_endpoints >= 1")
    return math.comb(n_tokens + n_endpoints - 1, n_endpoints - 1)


def enumerate_configurations(n_tokens: int, n_endpoints: int) -> np.ndarray:
    """All count vectors of ``n`` tokens over ``k`` endpoints, shape ``(C(n+k-1,k-1), k)``.

    Stars and bars: choosing the ``k - 1`` bar positions among ``n + k - 1`` slots fixes the
    counts as the gaps between consecutive bars.
    """
    m = count_configurations(n_tokens, n_endpoints)
    if n_endpoints == 1:
        return np.full((1, 1), n_tokens, dtype=np.int64)
    slots = n_tokens + n_endpoints - 1
    flat = np.fromiter(
        itertools.chain.from_iterable(itertools.combinations(range(slots), n_endpoints - 1)),
        dtype=np.int64,
        count=m * (n_endpoints - 1),
    )
    bars = flat.reshape(m, n_endpoints - 1)
    edges = np.concatenate(
        [np.full((m, 1), -1, dtype=np.int64), bars, np.full((m, 1), slots, dtype=np.int64)], axis=1
    )
    return np.diff(edges, axis=1) - 1


def latency_table(models: Sequence[LatencyModel], max_tokens: int, token_load: float) -> np.ndarray:
    """``table[j, c] = l_j(c * token_load)`` for ``c = 0 .. max_tokens``, shape ``(k, max+1)``."""
    if not (math.isfinite(token_load) and token_load >= 0):
        raise ValueError(f"token_load must be finite and >= 0, got {token_load!r}")
    loads = np.arange(max_tokens + 1, dtype=float) * token_load
    return np.stack([np.asarray(model.latency(loads), dtype=float) for model in models])


def configuration_costs(configurations: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Total latency ``sum_j c_j * l_j(c_j lam)`` of every configuration, shape ``(m,)``."""
    per_endpoint = np.take_along_axis(table.T, configurations, axis=0)
    costs: np.ndarray = np.sum(configurations * per_endpoint, axis=1)
    return costs


def deviation_gains(configurations: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``G[m, j, j'] = (c_j / n) * [l_j(c_j lam) - l_j'((c_j' + 1) lam)]`` (zero on the diagonal).

    ``p @ G.reshape(m, -1)`` gives, for each pair, one token's expected gain from moving from a
    recommended ``j`` to ``j'``; the distribution is a CE when none is positive. ``table`` must
    cover counts up to ``n + 1``.
    """
    n = int(configurations[0].sum()) if configurations.size else 0
    if n == 0:
        k = configurations.shape[1]
        return np.zeros((configurations.shape[0], k, k))
    own = np.take_along_axis(table.T, configurations, axis=0)  # (m, k): l_j(c_j)
    moved = np.take_along_axis(table.T, configurations + 1, axis=0)  # (m, k): l_j'(c_j' + 1)
    gains: np.ndarray = (configurations[:, :, None] / n) * (own[:, :, None] - moved[:, None, :])
    diagonal = np.arange(configurations.shape[1])
    gains[:, diagonal, diagonal] = 0.0
    return gains


def ce_gap(configurations: np.ndarray, probabilities: np.ndarray, table: np.ndarray) -> float:
    """Largest expected gain (>= 0) one token gets by deviating from its recommendation."""
    gains = np.einsum("m,mab->ab", probabilities, deviation_gains(configurations, table))
    return max(float(gains.max(initial=0.0)), 0.0)


def pure_nash_mask(configurations: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Which configurations are pure Nash equilibria (no used endpoint's token gains by moving)."""
    gains = deviation_gains(configurations, table)
    mask: np.ndarray = np.all(gains.reshape(gains.shape[0], -1) <= 1e-12 * np.abs(table).max(),
                              axis=1)
    return mask


def greedy_system_optimum(table: np.ndarray, n_tokens: int) -> np.ndarray:
    """The integer configuration minimising total latency, exactly.

    ``c * l(c * lam)`` is convex in ``c`` for every endpoint (``x * l(x)`` is convex), so adding
    tokens one at a time where the marginal total cost is smallest is optimal for this separable
    convex resource-allocation problem. A heap of the endpoints' next marginal costs makes each
    token O(log k) (ties go to the lowest index, as ``argmin`` would).
    """
    rows = table.tolist()

    def marginal(j: int, c: int) -> float:
        return float((c + 1) * rows[j][c + 1] - c * rows[j][c])

    return _greedy(len(rows), n_tokens, marginal)


def greedy_nash(table: np.ndarray, n_tokens: int) -> np.ndarray:
    """A pure Nash configuration: tokens arrive one at a time and take the endpoint that is then
    fastest for them. For singleton congestion games with identical players and increasing
    latencies no earlier token ever wants to move, so the result is a pure Nash equilibrium."""
    rows = table.tolist()
    return _greedy(len(rows), n_tokens, lambda j, c: float(rows[j][c + 1]))


def _greedy(k: int, n_tokens: int, cost: Callable[[int, int], float]) -> np.ndarray:
    """Place ``n_tokens`` one at a time on the endpoint ``j`` of least ``cost(j, c_j)`` (ties to
    the lowest ``j``), with a heap of each endpoint's next cost."""
    counts = [0] * k
    heap = [(cost(j, 0), j) for j in range(k)]
    heapq.heapify(heap)
    for _ in range(n_tokens):
        _, j = heap[0]
        counts[j] += 1
        heapq.heapreplace(heap, (cost(j, counts[j]), j))
    return np.array(counts, dtype=np.int64)


def simulate_regret_matching(
    table: np.ndarray,
    n_tokens: int,
    rounds: int,
    rng: np.random.Generator,
    *,
    burn_in: float = 0.5,
) -> float:
    """Mean total latency of independent conditional regret matching, after a burn-in.

    Hart & Mas-Colell (2000), "A simple adaptive procedure leading to correlated equilibrium":
    every token keeps ``D(j, j')``, its summed gain had it played ``j'`` whenever it played ``j``,
    and switches from its last action ``j`` to ``j'`` with probability ``[D(j,j')]^+ / (t * mu)``.
    Full-information variant (the counterfactual latency ``l_j'((c_j' + 1) lam)`` is known).
    ``mu`` is ``2 (k - 1)`` times the largest positive gain seen so far (an average of gains never
    exceeds it), so every row of positive average regrets sums below ``mu`` and staying always
    keeps positive probability.
    """
    k = table.shape[0]
    if n_tokens == 0:
        return 0.0
    largest_gain = 1e-12
    actions = rng.integers(0, k, size=n_tokens)
    regrets = np.zeros((n_tokens, k, k))
    players = np.arange(n_tokens)
    rows = np.arange(k)
    start = int(rounds * burn_in)
    costs: list[float] = []
    for t in range(1, rounds + 1):
        counts = np.bincount(actions, minlength=k)
        own = table[actions, counts[actions]]
        moved = table[rows, counts + 1]
        if t > start:
            costs.append(float(own.sum()))
        gains = own[:, None] - moved[None, :]
        gains[players, actions] = 0.0
        regrets[players, actions, :] += gains
        largest_gain = max(largest_gain, float(gains.max()))
        inertia = 2.0 * max(k - 1, 1) * largest_gain
        switch = np.maximum(regrets[players, actions, :], 0.0) / (t * inertia)
        switch[players, actions] = 0.0
        switch[players, actions] = 1.0 - switch.sum(axis=1)
        cumulative = np.cumsum(switch, axis=1)
        draws = rng.random(n_tokens)[:, None] * cumulative[:, -1:]
        actions = np.minimum(np.sum(cumulative < draws, axis=1), k - 1)
    return float(np.mean(costs))
