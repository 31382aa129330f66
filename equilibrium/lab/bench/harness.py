"""Building blocks of benchmark scenarios: drive open-loop load, sample sidecar state.

:func:`drive_load` starts one load-generator process per target, waits until each is set up,
starts them all on one shared schedule origin, collects every record and (once a second)
each given sidecar's ``/debug/state``, and always stops the generators. An ``on_tick`` hook
runs after each of those readings, while the load goes on (the demo's live view and its phases
use it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from equilibrium.lab.loadgen import LoadGenerator, LoadSpec, LoadSummary, Record
from equilibrium.lab.processes import cpu_pressure_stall
from equilibrium.lab.sidecars import Sidecar

START_MARGIN = 0.2  # seconds between "all generators ready" and the schedule's origin


@dataclass(frozen=True, slots=True)
class LoadTarget:
    """Where one client sends: ``url`` (a sidecar's outbound listener or a pod), ``host``."""

    client: str
    url: str
    host: str | None = None


@dataclass(slots=True)
class StateSample:
    """One ``/debug/state`` reading of one sidecar, ``t`` seconds after the load started."""

    t: float
    sidecar: str
    state: dict[str, Any] | None


@dataclass(slots=True)
class LoadResult:
    t0: float
    duration: float
    records: list[Record] = field(default_factory=list)
    summaries: list[LoadSummary] = field(default_factory=list)
    states: list[StateSample] = field(default_factory=list)
    #: share of the run's wall time in which some task waited for a CPU (Linux PSI; NaN if
    #: unknown): high values mean other work on the machine disturbed the measurement
    cpu_pressure: float = float("nan")
    #: CPU seconds (user + system) the load generators used during the run
    generator_cpu: float = float("nan")

    def load_counts(self) -> dict[str, int]:
        """Generator counts summed over clients (planned, sent, delayed, late)."""
        keys = ("planned", "sent", "errors", "delayed_by_cap", "late_starts")
        return {k: sum(int(getattr(s, k)) for s in self.summaries) for k in keys}

    def max_start_lag(self) -> float:
        return max((s.max_start_lag for s in self.summaries), default=0.0)


TickHook = Callable[[LoadResult, float, Mapping[str, dict[str, Any] | None]], Awaitable[None]]
"""``on_tick(result so far, seconds since the load started, sidecar id -> /debug/state)``."""


async def drive_load(
    targets: Sequence[LoadTarget],
    rate: float,
    duration: float,
    logs: Path,
    sidecars: Sequence[Sidecar] = (),
    timeout: float = 5.0,
    max_in_flight: int = 256,
    poll_interval: float = 1.0,
    on_tick: TickHook | None = None,
) -> LoadResult:
    """Run ``rate`` req/s per target for ``duration`` s; returns every record.

    ``result.records`` and ``result.states`` grow while the load runs, so ``on_tick`` sees the
    run so far.
    """
    loop = asyncio.get_running_loop()
    gens: list[LoadGenerator] = []
    result = LoadResult(t0=0.0, duration=duration)
    pumps: list[asyncio.Task[None]] = []

    async def pump(gen: LoadGenerator) -> None:
        async for rec in gen.records():
            result.records.append(rec)

    try:
        for target in targets:
            spec = LoadSpec(target=target.url, host=target.host, rate=rate, duration=duration,
                            client=target.client, timeout=timeout, max_in_flight=max_in_flight)
            gens.append(await LoadGenerator.start(
                spec, stderr_path=str(logs / f"load-{target.client}.log")))
        result.t0 = loop.time() + START_MARGIN
        stall0 = cpu_pressure_stall()
        for gen in gens:
            await gen.begin(result.t0)
            pumps.append(asyncio.create_task(pump(gen)))
        tick = 1
        while not all(p.done() for p in pumps):
            await asyncio.wait(pumps, timeout=max(0.0, result.t0 + tick * poll_interval
                                                  - loop.time()))
            if loop.time() >= result.t0 + tick * poll_interval:
                elapsed = loop.time() - result.t0
                states = await asyncio.gather(*(s.state() for s in sidecars))
                for sidecar, state in zip(sidecars, states, strict=True):
                    result.states.append(StateSample(elapsed, sidecar.id, state))
                if on_tick is not None:
                    await on_tick(result, elapsed,
                                  {s.id: st for s, st in zip(sidecars, states, strict=True)})
                tick += 1
        await asyncio.gather(*pumps)
        elapsed = loop.time() - result.t0
        if elapsed > 0:
            result.cpu_pressure = (cpu_pressure_stall() - stall0) / elapsed
        result.summaries = [g.summary for g in gens if g.summary is not None]
        result.generator_cpu = sum(x.cpu_seconds for x in result.summaries)
        return result
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*(g.stop() for g in gens), return_exceptions=True)


def final_upstream_states(
    states: Sequence[StateSample], upstream: str
) -> dict[str, dict[str, Any]]:
    """The last ``/debug/state`` upstream section seen per sidecar."""
    last: dict[str, dict[str, Any]] = {}
    for sample in states:
        up = ((sample.state or {}).get("upstreams") or {}).get(upstream)
        if up:
            last[sample.sidecar] = up
    return last
