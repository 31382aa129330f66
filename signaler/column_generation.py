"""The best correlated equilibrium past the configuration LP's size, by column generation.

Owns :func:`solve_by_column_generation` and the pool of configurations it keeps per game shape
between epochs. Pure numerics (numpy + HiGHS through ``highspy``): no Redis, no asyncio.

Why it works. The configuration LP of :mod:`signaler.lp` has ``C(n+k-1, k-1)`` variables but
only ``k (k-1) + 1`` rows (Papadimitriou & Roughgarden, JACM 2008), so an optimal basic solution
puts mass on at most ``k (k-1) + 1`` configurations. Column generation (Dantzig & Wolfe 1960;
Gilmore & Gomory 1961) solves a *restricted master* LP over a few configurations, reads its
row duals, and adds configurations whose reduced cost is negative until none is left.

- Every restricted master is an exact CE program on its columns: whatever it returns satisfies
  every incentive constraint of the full game (the constraint rows are the full game's rows,
  only the columns are fewer). It is feasible from the first round because the master starts
  with a pure Nash configuration (:func:`signaler.routing_game.greedy_nash`), which is a CE on
  its own. So the published plan is a CE to solver precision at any size; what the search
  buys is a *better* CE.
- Pricing. With ``y0`` the dual of ``sum p = 1`` and ``w_ab = -y_ab >= 0`` those of the
  incentive rows, a configuration ``c`` has reduced cost::

      rc(c) = sum_a c_a l_a(c_a) (1 + W_a / n) - (1/n) sum_a c_a sum_b w_ab l_b(c_b + 1) - y0

  (``W_a = sum_b w_ab``; loads are token counts times the token load). When all
  configurations can be listed (up to ``exact_pricing_limit``) every one is priced and the
  result is proven optimal: the same optimum as the configuration LP (``status="optimal"``),
  about ten times faster than building that LP in full. A plan whose cost reaches the system
  optimum's (a lower bound on every CE's) is proven optimal too.
  Past that, pricing is a steepest-descent local search over single-token moves from the
  master's support, the system optimum and the Nash configuration; when it finds nothing the
  plan is a CE whose optimality is not proven (``status="feasible"``), and its objective is
  reported beside the system optimum's (a lower bound on every CE's).
- Warm start. The signaler solves the same (tokens, endpoints) shape every epoch with new
  latency curves: the configurations of the last solve of a shape are offered to the next
  master, so a repeat solve usually needs few rounds.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

import highspy
import numpy as np

from signaler.latency_model import LatencyModel
from signaler.routing_game import (
    configuration_costs,
    count_configurations,
    enumerate_configurations,
    greedy_nash,
    greedy_system_optimum,
    latency_table,
)
from signaler.solution import CESolution, SolverError

__all__ = [
    "DEFAULT_EXACT_PRICING_LIMIT",
    "DEFAULT_TIME_BUDGET",
    "forget_warm_starts",
    "solve_by_column_generation",
]

#: Shapes with at most this many configurations are priced exhaustively (proven optimal).
DEFAULT_EXACT_PRICING_LIMIT = 1_000_000
#: Seconds a solve may spend before it stops adding columns (the master's answer is a CE then).
DEFAULT_TIME_BUDGET = 0.8
#: Columns added per round, at most.
COLUMNS_PER_ROUND = 64
#: Starting points of the local search per round, at most (besides the best new ones).
STARTS_PER_ROUND = 12
#: A reduced cost below ``-RC_TOLERANCE * scale`` counts as an improving column.
RC_TOLERANCE = 1e-9
_ENUMERATION_CHUNK = 20_000


class _Pool:
    """The configurations of the last solves, per (tokens, endpoints) shape (thread-safe)."""

    def __init__(self, shapes: int = 16, per_shape: int = 4096) -> None:
        self._lock = threading.Lock()
        self._shapes: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._limit, self._per_shape = shapes, per_shape

    def get(self, shape: tuple[int, int]) -> np.ndarray | None:
        with self._lock:
            found = self._shapes.get(shape)
            if found is not None:
                self._shapes.move_to_end(shape)
            return found

    def clear(self) -> None:
        with self._lock:
            self._shapes.clear()

    def put(self, shape: tuple[int, int], configurations: np.ndarray) -> None:
        with self._lock:
            self._shapes[shape] = configurations[-self._per_shape:].copy()
            self._shapes.move_to_end(shape)
            while len(self._shapes) > self._limit:
                self._shapes.popitem(last=False)


_POOL = _Pool()


def forget_warm_starts() -> None:
    """Drop every remembered configuration (the next solve of each shape starts cold)."""
    _POOL.clear()


class _Master:
    """The restricted master LP: rows ``sum p = 1`` and ``k (k-1)`` incentive rows ``<= eps``,
    columns added as they are found (HiGHS re-solves from the previous basis)."""

    def __init__(self, table: np.ndarray, n: int, epsilon: float) -> None:
        from signaler.lp import _silence_highs_banner

        _silence_highs_banner()
        self.table, self.n = table, n
        k = table.shape[0]
        self.k = k
        pairs = [(a, b) for a in range(k) for b in range(k) if a != b]
        self.row_of = np.full((k, k), -1, dtype=np.int64)
        for r, (a, b) in enumerate(pairs, start=1):
            self.row_of[a, b] = r
        self.highs = highspy.Highs()
        self.highs.setOptionValue("output_flag", False)
        rows = len(pairs) + 1
        lower = np.full(rows, -highspy.kHighsInf)
        upper = np.full(rows, float(epsilon))
        lower[0] = upper[0] = 1.0
        self.highs.addRows(rows, lower, upper, 0, np.zeros(rows, dtype=np.int32),
                           np.zeros(0, dtype=np.int32), np.zeros(0))
        self.columns: list[np.ndarray] = []
        self.seen: set[bytes] = set()

    def add(self, configurations: np.ndarray) -> int:
        """Add the configurations not in the master yet; return how many were added."""
        fresh = []
        for c in configurations:
            key = c.tobytes()
            if key not in self.seen:
                self.seen.add(key)
                fresh.append(c)
        if not fresh:
            return 0
        block = np.array(fresh, dtype=np.int64)
        costs = configuration_costs(block, self.table)
        own = np.take_along_axis(self.table.T, block, axis=0)
        up = np.take_along_axis(self.table.T, block + 1, axis=0)
        starts: list[int] = []
        indices: list[int] = []
        values: list[float] = []
        for m, c in enumerate(block):
            starts.append(len(indices))
            indices.append(0)
            values.append(1.0)
            for a in np.flatnonzero(c):
                gains = (c[a] / self.n) * (own[m, a] - up[m])
                gains[a] = 0.0
                nz = np.flatnonzero(gains)
                indices.extend(self.row_of[a, nz].tolist())
                values.extend(gains[nz].tolist())
        self.highs.addCols(
            len(block), costs, np.zeros(len(block)), np.full(len(block), highspy.kHighsInf),
            len(indices), np.array(starts, dtype=np.int32), np.array(indices, dtype=np.int32),
            np.array(values, dtype=float),
        )
        self.columns.extend(block)
        return len(block)

    def solve(self) -> np.ndarray:
        """Re-solve (from the last basis); the probability of each column, in order added."""
        self.highs.run()
        status = self.highs.getModelStatus()
        if status != highspy.HighsModelStatus.kOptimal:
            said = self.highs.modelStatusToString(status)
            raise SolverError(f"column-generation master: HiGHS ended with {said}")
        return np.asarray(self.highs.getSolution().col_value, dtype=float)

    def duals(self) -> tuple[float, np.ndarray]:
        """The dual of ``sum p = 1`` and the duals ``w[a, b] >= 0`` of the incentive rows."""
        duals = np.asarray(self.highs.getSolution().row_dual, dtype=float)
        w = np.zeros((self.k, self.k))
        mask = self.row_of >= 0
        w[mask] = np.maximum(-duals[self.row_of[mask]], 0.0)
        return float(duals[0]), w


def reduced_costs(
    configurations: np.ndarray, table: np.ndarray, n: int, y0: float, w: np.ndarray
) -> np.ndarray:
    """``rc(c)`` of each configuration (rows of ``configurations``) under the duals ``y0``, ``w``
    (see the module docstring)."""
    own = np.take_along_axis(table.T, configurations, axis=0)
    up = np.take_along_axis(table.T, configurations + 1, axis=0)
    unary = configurations * own * (1.0 + w.sum(axis=1) / n)
    pairwise = configurations * (up @ w.T) / n
    result: np.ndarray = unary.sum(axis=1) - pairwise.sum(axis=1) - y0
    return result


def move_deltas(
    c: np.ndarray, table: np.ndarray, n: int, w: np.ndarray
) -> np.ndarray:
    """``D[a, b] = rc(c - e_a + e_b) - rc(c)``: the change of the reduced cost when one token
    moves from ``a`` to ``b`` (``inf`` where ``a`` has no token or ``a == b``), in O(k^2).

    With ``U_j(x) = x l_j(x) (1 + W_j/n)``, ``V_j(x) = l_j(x + 1)``, ``P = w V(c)`` and
    ``Q = c w``, the unary part changes by ``U_a(c_a-1) - U_a(c_a) + U_b(c_b+1) - U_b(c_b)`` and
    the pairwise sum ``S = sum_j c_j P_j`` by
    ``Q_a dV_a + Q_b dV_b - P_a + P_b - w_ab dV_b + w_ba dV_a``, where ``dV_a`` and ``dV_b``
    are the changes of ``V`` at the endpoint the token leaves and the one it joins.
    """
    k = c.size
    rows = np.arange(k)
    scale = 1.0 + w.sum(axis=1) / n
    counts = c.astype(np.int64)
    down = np.maximum(counts - 1, 0)
    unary = counts * table[rows, counts] * scale
    unary_down = down * table[rows, down] * scale - unary  # a loses a token
    unary_up = (counts + 1) * table[rows, counts + 1] * scale - unary  # b gains one
    v = table[rows, counts + 1]
    dv_down = table[rows, down + 1] - v
    dv_up = table[rows, counts + 2] - v
    p = w @ v
    q = counts @ w
    pairwise = ((q * dv_down - p)[:, None] + (q * dv_up + p)[None, :]
                - w * dv_up[None, :] + w.T * dv_down[:, None])
    deltas: np.ndarray = unary_down[:, None] + unary_up[None, :] - pairwise / n
    deltas[counts == 0, :] = np.inf
    deltas[rows, rows] = np.inf
    return deltas


def _descend(
    start: np.ndarray, table: np.ndarray, n: int, y0: float, w: np.ndarray, tolerance: float,
    deadline: float,
) -> list[np.ndarray]:
    """Steepest descent on ``rc`` over single-token moves from ``start``; the improving
    configurations it passed."""
    current = start.copy()
    value = float(reduced_costs(current[None, :], table, n, y0, w)[0])
    found: list[np.ndarray] = []
    k = current.size
    for _ in range(4 * n + 4):
        if time.perf_counter() > deadline:
            break
        deltas = move_deltas(current, table, n, w)
        best = int(np.argmin(deltas))
        if deltas.flat[best] >= -tolerance:
            break
        a, b = divmod(best, k)
        current = current.copy()
        current[a] -= 1
        current[b] += 1
        value += float(deltas.flat[best])
        if value < -tolerance:
            found.append(current)
    return found


@functools.lru_cache(maxsize=4)
def _exhaustive(n: int, k: int) -> _Exhaustive:
    return _Exhaustive(n, k)


class _Exhaustive:
    """Every configuration of a small shape, priced in chunks (exact pricing)."""

    def __init__(self, n: int, k: int) -> None:
        self.configurations = enumerate_configurations(n, k)

    def improving(
        self, table: np.ndarray, n: int, y0: float, w: np.ndarray, tolerance: float, limit: int
    ) -> np.ndarray:
        best_values: list[np.ndarray] = []
        best_rows: list[np.ndarray] = []
        for start in range(0, self.configurations.shape[0], _ENUMERATION_CHUNK):
            chunk = self.configurations[start:start + _ENUMERATION_CHUNK]
            values = reduced_costs(chunk, table, n, y0, w)
            keep = np.flatnonzero(values < -tolerance)
            if keep.size:
                best_values.append(values[keep])
                best_rows.append(chunk[keep])
        if not best_rows:
            return np.zeros((0, self.configurations.shape[1]), dtype=np.int64)
        values = np.concatenate(best_values)
        rows = np.concatenate(best_rows)
        order = np.argsort(values)[:limit]
        return rows[order]


def solve_by_column_generation(
    models: Sequence[LatencyModel],
    n_tokens: int,
    token_load: float,
    *,
    working: np.ndarray | None = None,
    epsilon: float = 0.0,
    time_budget: float = DEFAULT_TIME_BUDGET,
    exact_pricing_limit: int = DEFAULT_EXACT_PRICING_LIMIT,
    warm_start: bool = True,
    seed: int = 0,
) -> CESolution:
    """The best correlated equilibrium found by column generation (see the module docstring).

    ``working``: indices of the endpoints that may get tokens (default: all); the others are
    priced only when the CE gap is verified. Returns ``method="column-generation"`` with
    ``status="optimal"`` (pricing proved no better CE exists) or ``"feasible"`` (a CE; the
    search stopped at ``time_budget`` seconds or found no improving configuration). The CE gap
    is recomputed from the returned distribution over every endpoint.
    """
    started = time.perf_counter()
    deadline = started + max(time_budget, 0.0)
    k_all = len(models)
    if working is None:
        working = np.arange(k_all)
    n = int(n_tokens)
    if n < 1:
        raise ValueError("column generation needs at least one token")
    kw = int(working.size)
    models_w = [models[int(j)] for j in working]
    table = latency_table(models_w, n + 1, token_load)
    scale = max(float(np.abs(table[:, : n + 2]).max()), 1e-12) * n
    tolerance = RC_TOLERANCE * scale

    master = _Master(table, n, epsilon)
    nash = greedy_nash(table, n)
    optimum = greedy_system_optimum(table, n)
    master.add(np.stack([nash, optimum]))
    shape = (n, kw)
    if warm_start and (pooled := _POOL.get(shape)) is not None:
        master.add(pooled)
    exhaustive = (
        _exhaustive(n, kw) if count_configurations(n, kw) <= exact_pricing_limit else None
    )
    rng = np.random.default_rng(seed)
    proven = False
    values = master.solve()
    y0, w = master.duals()
    while True:
        if exhaustive is not None:
            new = exhaustive.improving(table, n, y0, w, tolerance, COLUMNS_PER_ROUND)
            if new.shape[0] == 0:
                proven = True
                break
        else:
            columns = np.array(master.columns)
            support = np.flatnonzero(values > 1e-12)
            picks = support if support.size <= STARTS_PER_ROUND else rng.choice(
                support, STARTS_PER_ROUND, replace=False)
            starts = [columns[i] for i in picks] + [optimum]
            found: list[np.ndarray] = []
            for start in starts:
                found.extend(_descend(start, table, n, y0, w, tolerance, deadline))
                if time.perf_counter() > deadline:
                    break
            if not found:
                break
            block = np.unique(np.array(found), axis=0)
            order = np.argsort(reduced_costs(block, table, n, y0, w))
            new = block[order[:COLUMNS_PER_ROUND]]
        added = master.add(new)
        if added:
            values = master.solve()
            y0, w = master.duals()
        if not added or time.perf_counter() > deadline:
            break

    columns = np.array(master.columns)
    # the system optimum is a lower bound on every CE's cost: reaching it proves optimality
    lower_bound = float(configuration_costs(optimum[None, :], table)[0])
    if float(values @ configuration_costs(columns, table)) <= lower_bound + tolerance:
        proven = True
    if warm_start:
        support = columns[values > 1e-12]
        _POOL.put(shape, np.concatenate([columns, support]) if support.size else columns)
    configurations = np.zeros((columns.shape[0], k_all), dtype=np.int64)
    configurations[:, working] = columns
    return CESolution.from_distribution(
        configurations,
        values,
        models,
        token_load,
        status="optimal" if proven else "feasible",
        method="column-generation",
        started=started,
        n_variables=len(master.columns),
        n_constraints=kw * (kw - 1) + 1,
    )
