"""Benchmark of the signaler's programs: LP size and solve time against (tokens, endpoints), and
what the best correlated equilibrium buys over independent play.

Owns: :func:`lp_solve_table` (measure) and :func:`format_markdown` (report), which the
``equilibrium bench`` CLI calls, and :func:`solve_once`: ``python -m signaler.lp_bench
--tokens T --endpoints K --json`` prints one shape's method, first and repeat solve seconds,
verified CE gap and objective beside the system optimum's; without arguments it prints the
table. Pure numerics: no Redis.

Scenario: a heterogeneous fleet of M/M/1 endpoints -- endpoint ``j`` has fixed delay
``2 ms * (1 + j mod 3)`` and capacity ``50 req/s * (1 + j mod 4)`` -- offered ``utilisation`` of
the total capacity, split into ``n`` equal tokens. For each size the row compares, as mean latency
per token (ms):

- ``best CE``: the configuration LP's optimum (past the guard, column generation's CE);
- ``system optimum``: the exact integer optimum (no incentive constraints; a lower bound);
- ``pure Nash``: the best and the worst pure Nash equilibria of this congestion game (every
  configuration checked when they can be enumerated; past the LP's size guard, the one reached
  by tokens choosing greedily one after another) -- where independent best-responders settle;
- ``regret matching``: independent Hart & Mas-Colell conditional regret matching, time-averaged
  after burn-in and averaged over ``regret_runs`` seeded runs
  (:func:`signaler.routing_game.simulate_regret_matching`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from signaler.column_generation import forget_warm_starts
from signaler.latency_model import LatencyModel
from signaler.lp import (
    DEFAULT_MAX_CONFIGURATIONS,
    CorrelatedEquilibriumLP,
    _compiled_configuration_lp,
)
from signaler.routing_game import (
    ce_gap,
    configuration_costs,
    count_configurations,
    enumerate_configurations,
    greedy_nash,
    greedy_system_optimum,
    latency_table,
    pure_nash_mask,
    simulate_regret_matching,
)

DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((8, 3), (16, 4), (32, 4), (64, 4), (16, 8))


def bench_fleet(n_endpoints: int) -> tuple[LatencyModel, ...]:
    """The benchmark's heterogeneous endpoints (latencies in seconds, loads in req/s)."""
    return tuple(
        LatencyModel(d=0.002 * (1 + j % 3), mu=50.0 * (1 + j % 4)) for j in range(n_endpoints)
    )


def lp_solve_table(
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    repeats: int = 3,
    *,
    utilisation: float = 0.9,
    regret_rounds: int = 2000,
    regret_runs: int = 3,
    seed: int = 7,
) -> list[dict[str, Any]]:
    """Solve the CE program for each ``(tokens, endpoints)`` size ``repeats`` times; return one
    row per size with the median build+solve seconds, the program's size and the outcomes."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    rows = []
    for n, k in sizes:
        models = bench_fleet(k)
        token_load = utilisation * sum(m.mu for m in models) / n
        program = CorrelatedEquilibriumLP(models, n, token_load)
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            solution = program.solve()
            seconds.append(time.perf_counter() - started)
        table = latency_table(models, n + 1, token_load)

        def per_token_ms(total: float, n: int = n) -> float:
            return 1000.0 * total / n

        optimum = configuration_costs(greedy_system_optimum(table, n)[None, :], table)[0]
        nash_best, nash_worst = _pure_nash_range(table, n, k)
        regret = statistics.fmean(
            simulate_regret_matching(table, n, regret_rounds, np.random.default_rng(seed + run))
            for run in range(regret_runs)
        )
        rows.append(
            {
                "tokens": n,
                "endpoints": k,
                "configurations": count_configurations(n, k),
                "method": solution.method,
                "n_variables": solution.n_variables,
                "n_constraints": solution.n_constraints,
                "seconds": statistics.median(seconds),
                "status": solution.status,
                "objective": solution.objective,
                "ce_gap": solution.ce_gap,
                "best_ce_ms": per_token_ms(solution.objective),
                "system_optimum_ms": per_token_ms(optimum),
                "pure_nash_ms": per_token_ms(nash_best),
                "worst_pure_nash_ms": per_token_ms(nash_worst),
                "regret_matching_ms": per_token_ms(regret),
            }
        )
    return rows


def _pure_nash_range(table: np.ndarray, n: int, k: int) -> tuple[float, float]:
    """Total latency of the best and the worst pure Nash configurations."""
    if count_configurations(n, k) > DEFAULT_MAX_CONFIGURATIONS:
        greedy = float(configuration_costs(greedy_nash(table, n)[None, :], table)[0])
        return greedy, greedy
    configurations = enumerate_configurations(n, k)
    costs = configuration_costs(configurations, table)[pure_nash_mask(configurations, table)]
    return float(costs.min()), float(costs.max())


_COLUMNS = (
    ("tokens × endpoints", lambda r: f"{r['tokens']} × {r['endpoints']}"),
    ("configurations", lambda r: f"{r['configurations']:,}"),
    ("method", lambda r: r["method"]),
    ("LP vars", lambda r: f"{r['n_variables']:,}"),
    ("rows", lambda r: str(r["n_constraints"])),
    ("build+solve s", lambda r: f"{r['seconds']:.3f}"),
    ("CE gap", lambda r: f"{r['ce_gap']:.1e}"),
    ("best CE ms", lambda r: f"{r['best_ce_ms']:.2f}"),
    ("system opt ms", lambda r: f"{r['system_optimum_ms']:.2f}"),
    (
        "pure Nash ms (best–worst)",
        lambda r: f"{r['pure_nash_ms']:.2f}–{r['worst_pure_nash_ms']:.2f}",
    ),
    ("regret matching ms", lambda r: f"{r['regret_matching_ms']:.2f}"),
)


def format_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table (latencies are mean per token, in milliseconds)."""
    header = "| " + " | ".join(name for name, _ in _COLUMNS) + " |"
    rule = "|" + "|".join("---:" for _ in _COLUMNS) + "|"
    body = ["| " + " | ".join(cell(row) for _, cell in _COLUMNS) + " |" for row in rows]
    return "\n".join([header, rule, *body]) + "\n"


def random_fleet(n_endpoints: int, seed: int) -> tuple[LatencyModel, ...]:
    """Endpoints drawn at random (seeded): fixed delay 1-20 ms, capacity 20-200 req/s."""
    rng = np.random.default_rng(seed)
    return tuple(
        LatencyModel(d=float(rng.uniform(0.001, 0.02)), mu=float(rng.uniform(20.0, 200.0)))
        for _ in range(n_endpoints)
    )


def solve_once(
    n_tokens: int, n_endpoints: int, *, utilisation: float = 0.9, repeats: int = 3,
    seed: int | None = None,
) -> dict[str, Any]:
    """One (tokens, endpoints) shape of the benchmark fleet: the first solve (nothing compiled,
    nothing remembered), then the median of ``repeats`` repeat solves, as the signaler re-solves
    each epoch; latencies in seconds (expected total per unit of time, as in the LP). With
    ``seed`` the fleet is :func:`random_fleet` instead of :func:`bench_fleet`."""
    if n_tokens < 1 or n_endpoints < 1 or repeats < 1:
        raise ValueError("need tokens >= 1, endpoints >= 1 and repeats >= 1")
    models = bench_fleet(n_endpoints) if seed is None else random_fleet(n_endpoints, seed)
    token_load = utilisation * sum(m.mu for m in models) / n_tokens
    program = CorrelatedEquilibriumLP(models, n_tokens, token_load)
    _compiled_configuration_lp.cache_clear()
    forget_warm_starts()
    started = time.perf_counter()
    first = program.solve()
    first_seconds = time.perf_counter() - started
    seconds, solution = [], first
    for _ in range(repeats):
        started = time.perf_counter()
        solution = program.solve()
        seconds.append(time.perf_counter() - started)
    table = latency_table(models, n_tokens + 1, token_load)
    optimum = configuration_costs(greedy_system_optimum(table, n_tokens)[None, :], table)[0]
    nash = configuration_costs(greedy_nash(table, n_tokens)[None, :], table)[0]
    return {
        "tokens": n_tokens,
        "endpoints": n_endpoints,
        "fleet": "bench" if seed is None else f"random:{seed}",
        "utilisation": utilisation,
        "configurations": count_configurations(n_tokens, n_endpoints),
        "method": solution.method,
        "status": solution.status,
        "seconds": statistics.median(seconds),
        "first_seconds": first_seconds,
        # verified on the fitted curves as given (no pooling of alike endpoints)
        "ce_gap": ce_gap(solution.configurations, solution.probabilities, table),
        "objective": solution.objective,
        "system_optimum_objective": float(optimum),
        "pure_nash_objective": float(nash),
        "support": int(solution.probabilities.size),
        "n_variables": solution.n_variables,
        "n_constraints": solution.n_constraints,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m signaler.lp_bench",
        description="Solve the signaler's CE program for one shape (--tokens/--endpoints) or "
                    "print the table of the default shapes.",
    )
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--endpoints", type=int)
    parser.add_argument("--utilisation", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, help="a random fleet with this seed instead of the "
                                                 "benchmark's fixed one")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if (args.tokens is None) != (args.endpoints is None):
        parser.error("give both --tokens and --endpoints, or neither")
    if args.tokens is None:
        print(format_markdown(lp_solve_table()), end="")
        return 0
    try:
        row = solve_once(args.tokens, args.endpoints, utilisation=args.utilisation,
                         repeats=args.repeats, seed=args.seed)
    except ValueError as error:
        parser.error(str(error))
    if args.json:
        print(json.dumps(row, sort_keys=True))
    else:
        for key, value in row.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
