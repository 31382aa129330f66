"""Scenario ``standings``: what the inbound sidecar's periodic reads of the reputation book cost
at 10,000 callers, the full scan of every standing against the incremental index.

In process, no fleet: the cost measured is event-loop time, which the two ways of reading the
book spend synchronously. A :class:`mesh.reputation.ReputationBook` is filled with
``--standings-callers`` callers; then, tick after tick, ``--standings-changed`` of them make a
request and both readers run, alternating which goes first:

* ``full-scan``: what the sidecar did before (issue 14, finding 14): every standing
  (:meth:`~mesh.reputation.ReputationBook.standings`) partitioned into labelled callers and
  the others' worst reputation and level for the gauges (every 0.5 s), and the busiest callers
  by a heap over all standings for ``/debug/state``;
* ``incremental``: :meth:`~mesh.reputation.ReputationBook.gauge_digest` and
  :meth:`~mesh.reputation.ReputationBook.snapshot`, over the callers changed since the last
  read (:mod:`mesh.standings`).

Reported: the median and p99 of each read's wall time, and the ratio.
"""

from __future__ import annotations

import argparse
import heapq
import statistics
import time
from typing import Any

from equilibrium.lab.bench.scenarios import BenchContext, Scenario, ScenarioResult, Table
from mesh.reputation import ANONYMOUS, Phase, PolicingParams, ReputationBook

LABELS = 100
"""Callers with a metric label of their own (the sidecar's default ``max_caller_labels``)."""
TOP = 20
"""Callers ``/debug/state`` shows (the sidecar's default ``debug_callers``)."""


def full_scan_gauges(book: ReputationBook, now: float, named: set[str]) -> tuple[float, int, int]:
    """The gauges' inputs as the sidecar computed them before: one pass over every standing."""
    worst_rep, worst_level, punished = 1.0, 0, 0
    for standing in book.standings(now):
        punished += standing.phase is Phase.PUNISHED
        if standing.caller not in named:
            worst_rep = min(worst_rep, standing.reputation)
            worst_level = max(worst_level, standing.level)
    return worst_rep, worst_level, punished


def full_scan_snapshot(book: ReputationBook, now: float) -> list[str]:
    every = book.standings(now)
    busiest = heapq.nsmallest(TOP, every, key=lambda s: (-s.recent_requests, s.caller))
    return [s.caller for s in busiest]


def _quantiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return statistics.median(ordered), p99


class Standings(Scenario):
    name = "standings"
    summary = "event-loop time of the reputation book's periodic reads at 10,000 callers"
    default_duration = 1.0  # unused: the scenario counts ticks (--standings-ticks)
    default_clients = 1  # unused: no fleet

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--standings-callers", type=int, default=10_000,
                           help="callers tracked by the book (default 10000)")
        group.add_argument("--standings-changed", type=int, default=50,
                           help="callers making a request between two ticks (default 50)")
        group.add_argument("--standings-ticks", type=int, default=200,
                           help="ticks measured (default 200)")

    async def run(self, ctx: BenchContext) -> ScenarioResult:
        args = ctx.args
        callers, changed, ticks = (args.standings_callers, args.standings_changed,
                                   args.standings_ticks)
        book = ReputationBook(PolicingParams(capacity=1000.0, max_callers=max(callers, 1)))
        now = 0.0
        for i in range(callers):
            now += 1e-4
            book.admit(f"caller-{i}", now)
        named = {ANONYMOUS, *(f"caller-{i}" for i in range(LABELS))}
        book.gauge_digest(now, named)  # the first read folds everyone in once
        times: dict[str, dict[str, list[float]]] = {
            "full-scan": {"gauges": [], "debug-state": []},
            "incremental": {"gauges": [], "debug-state": []},
        }
        clock = time.perf_counter
        for tick in range(ticks):
            for j in range(changed):
                now += 0.5 / max(changed, 1)
                book.admit(f"caller-{(tick * 7919 + j * 104_729) % max(callers, 1)}", now)
            order = ("full-scan", "incremental") if tick % 2 else ("incremental", "full-scan")
            for reader in order:
                started = clock()
                if reader == "full-scan":
                    full_scan_gauges(book, now, named)
                else:
                    book.gauge_digest(now, named)
                times[reader]["gauges"].append(clock() - started)
                started = clock()
                if reader == "full-scan":
                    full_scan_snapshot(book, now)
                else:
                    book.snapshot(now, TOP)
                times[reader]["debug-state"].append(clock() - started)
        rows: list[list[str]] = []
        data: dict[str, Any] = {}
        for read in ("gauges", "debug-state"):
            full = _quantiles(times["full-scan"][read])
            incr = _quantiles(times["incremental"][read])
            data[read] = {"full_scan_ms": [x * 1e3 for x in full],
                          "incremental_ms": [x * 1e3 for x in incr]}
            rows.append([read, f"{full[0] * 1e3:.2f}", f"{full[1] * 1e3:.2f}",
                         f"{incr[0] * 1e3:.3f}", f"{incr[1] * 1e3:.3f}",
                         f"{full[0] / max(incr[0], 1e-9):.0f}x"])
        ctx.say(f"standings: {callers} callers, {changed} changed per tick, {ticks} ticks")
        return ScenarioResult(
            parameters={"callers": callers, "changed_per_tick": changed, "ticks": ticks,
                        "labelled": LABELS, "top": TOP},
            tables=[Table(
                f"Per read, {callers} callers, {changed} changed between ticks",
                ["read", "full scan median ms", "full scan p99 ms", "incremental median ms",
                 "incremental p99 ms", "median ratio"], rows)],
            data=data,
        )


SCENARIO = Standings()
