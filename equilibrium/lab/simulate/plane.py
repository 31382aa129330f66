"""The signaling plane in virtual time: the real sidecar task and the real signaler, in memory.

Owns :class:`SimPlane`: one :class:`wire.memory_store.MemorySignalStore` on the simulation's
clock (the seam ``tests/integration/test_signal_store_contract.py`` holds to the Redis store's
behaviour), one :class:`signaler.service.SignalerService` reading and publishing through it,
and per simulated sidecar one :class:`sidecar.signaling.SidecarSignaling` over that sidecar's
upstream table, with the mesh key of the run. Each sidecar's :meth:`sidecar_round` is the real
``run_round`` (build the summary from the policy's snapshot and epoch windows, encode it,
exchange, verify and follow the newest recommendation); :meth:`signaler_epoch` is the real
``run_epoch`` (lease, consume, fit, solve, sign, publish). The engine decides when each runs
(each sidecar at its own phase of the epoch, the signaler at its own), which is where signal
staleness comes from. Must not change what either side does.

Clocks: the store and the signaler read unix time ``wall0 + now``; the sidecars' policies run
on ``now`` and translate expiry times, as the real task does between its monotonic and wall
clocks.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine
from typing import Any, TypeVar

import numpy as np
from prometheus_client import CollectorRegistry

from equilibrium.lab.simulate.sidecar import UPSTREAM, SimSidecar
from sidecar.metrics import SignalingMetrics
from sidecar.signaling import SidecarSignaling, SignalingSettings
from signaler.service import SignalerConfig, SignalerService
from wire.memory_store import MemorySignalStore

#: unix time of virtual time 0 (any fixed value: runs must not depend on the date)
WALL0 = 1_800_000_000.0
T = TypeVar("T")
MESH_KEY = b"simulated-mesh-key-not-a-secret-0123456789"


def run_now(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never waits (the memory store answers at once) without an event
    loop's overhead; RuntimeError if it does wait."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("a signaling round waited on the memory store")


class SimPlane:
    """The store, the signaler and the sidecars' signaling tasks of one run."""

    def __init__(self, clock: Any, *, epoch: float, tokens: int, seed: int) -> None:
        self.clock = clock
        self.epoch = epoch
        self.store = MemorySignalStore(self.wall)
        self.loop = asyncio.new_event_loop()
        self.signaler = SignalerService(
            SignalerConfig(redis_url="memory://simulated", signer="sim-signaler",
                           key=MESH_KEY, epoch=epoch, tokens=tokens, upstreams=(UPSTREAM,),
                           seed=seed),
            store=self.store, clock=self.wall, rng=np.random.default_rng(seed),
        )
        self._settings = SignalingSettings(redis_url="memory://simulated", key=MESH_KEY,
                                           epoch=epoch)
        self._metrics = SignalingMetrics(CollectorRegistry(auto_describe=False))
        self.tasks: dict[int, SidecarSignaling] = {}
        self.plans = 0
        self.solve_failures = 0

    def wall(self) -> float:
        return WALL0 + float(self.clock())

    def join(self, sc: SimSidecar, seed: int) -> None:
        self.tasks[sc.index] = SidecarSignaling(
            sidecar_id=sc.id, table=sc.table, metrics=self._metrics, settings=self._settings,
            store=self.store, clock=self.clock, wall=self.wall, rng=random.Random(seed),
        )

    def leave(self, index: int) -> None:
        self.tasks.pop(index, None)

    def sidecar_round(self, index: int) -> None:
        task = self.tasks.get(index)
        if task is not None:
            run_now(task.run_round())

    def signaler_epoch(self) -> None:
        self.loop.run_until_complete(self.signaler.run_epoch())

    def following(self) -> int:
        """Sidecars whose policy follows a recommendation now."""
        return sum(1 for t in self.tasks.values()
                   for g in t.table if g.snapshot is not None and g.snapshot.following)

    def state(self) -> dict[str, Any]:
        """The signaler's plan and gaps for the report (no wall times)."""
        view = self.signaler.views.get(UPSTREAM)
        status = self.signaler.status.get(UPSTREAM)
        out: dict[str, Any] = {"published": status.published if status else 0}
        if view is not None:
            out["regret_gap"] = view.regret_gap(self.wall())
            out["sidecars_fresh"] = len(view.fresh(self.wall()))
        plan = status.plan if status else None
        if plan is not None:
            out.update(method=plan.solution.method, status=plan.status,
                       objective=plan.solution.objective, ce_gap=plan.solution.ce_gap,
                       tokens=plan.solution.n_tokens)
        return out

    def close(self) -> None:
        self.loop.run_until_complete(self.signaler.close())
        self.loop.close()
