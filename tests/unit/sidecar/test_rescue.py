"""Rescue (sidecar.rescue): what an ejected endpoint holds goes elsewhere, within the rules.

The app talks HTTP to a real :class:`OutboundProxy` on loopback; the upstreams are a
:class:`MemoryTransport` handler in which one endpoint never answers (a hung pod). When the
policy ejects it is the policy's (tests/unit/mesh/test_policies.py); here a policy that picks
the hung endpoint first and says when it was ejected stands in for it, and the test runs the
sweep the sidecar's tick loop runs. The process test (tests/integration/test_rescue.py)
checks the same with the real policy over real sockets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from mesh.policies import RoundRobin
from mesh.policy import Outcome
from mesh.profiles import StrategyProfile, get_profile
from mesh.retry import RetryBudget
from sidecar.metrics import SidecarMetrics
from sidecar.outbound import OutboundProxy
from sidecar.transport import MemoryTransport
from sidecar.upstreams import UpstreamGroup, UpstreamTable
from tests.unit.sidecar.memory_upstreams import Network, serve

HUNG, OK = "http://10.0.0.1:8080", "http://10.0.0.2:8080"


class EjectingPolicy:
    """Round-robin bookkeeping that picks HUNG first and reports an ejection when told.

    Wraps a :class:`RoundRobin` rather than subclassing it (the policies may be compiled)."""

    def __init__(self, profile: StrategyProfile) -> None:
        self.inner = RoundRobin(profile)
        self.ejected_at: float | None = None
        self.outcomes: list[Outcome] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def pick(self, rng: random.Random, now: float,
             exclude: frozenset[str] = frozenset()) -> str | None:
        return next((e for e in (HUNG, OK) if e not in exclude), None)

    def rescue_before(self, endpoint: str, now: float) -> float | None:
        return self.ejected_at if endpoint == HUNG else None

    def on_outcome(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self.inner.on_outcome(outcome)


@dataclass
class Rig:
    proxy: OutboundProxy
    group: UpstreamGroup
    policy: EjectingPolicy
    network: Network
    client: aiohttp.ClientSession
    metrics: SidecarMetrics

    def metric(self, name: str) -> float:
        return self.metrics.registry.get_sample_value(name, {"upstream": "users"}) or 0.0

    async def held(self, count: int) -> None:
        """Until ``count`` attempts are held (the requests reached the hung endpoint)."""
        assert self.proxy.rescue is not None
        for _ in range(200):
            if self.proxy.rescue.held("users") >= count:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{self.proxy.rescue.held('users')} held, {count} expected")

    def eject_and_sweep(self) -> int:
        assert self.proxy.rescue is not None
        now = time.monotonic()
        self.policy.ejected_at = now
        return self.proxy.rescue.sweep(self.group, now)


MakeRig = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def rig() -> AsyncIterator[MakeRig]:
    closers: list[Callable[[], Awaitable[object]]] = []

    async def make(endpoints: tuple[str, ...] = (HUNG, OK), timeout: float = 5.0,
                   budget: RetryBudget | None = None, max_attempts: int = 3,
                   rescue: bool = True) -> Rig:  # the proxy's default is off
        profile = dataclasses.replace(get_profile("balanced"), request_timeout=timeout)
        table = UpstreamTable("round-robin", profile)
        table.apply({"users": endpoints}, 0.0)
        group = table.get("users")
        assert group is not None
        policy = EjectingPolicy(profile)
        group.policy = policy  # type: ignore[assignment]
        group.set_endpoints(endpoints, 0.0)
        if budget is not None:
            group.budget = budget
        network = Network({HUNG: 3600.0, OK: 0.0})  # HUNG never answers (within a test)
        metrics = SidecarMetrics()
        proxy = OutboundProxy(sidecar_id="unit-sidecar", table=table, profile=profile,
                              metrics=metrics.outbound, rng=random.Random(7),
                              transport=MemoryTransport(network), max_attempts=max_attempts,
                              rescue=rescue)
        client = await serve(proxy, closers)
        return Rig(proxy, group, policy, network, client, metrics)

    yield make
    for close in closers:
        await close()


async def call(rig: Rig, method: str = "GET", data: bytes | None = None) -> tuple[int, str]:
    async with rig.client.request(method, "/x", headers={"Host": "users"}, data=data) as resp:
        return resp.status, resp.headers.get("X-Backend", "")


async def test_gets_held_by_an_ejected_endpoint_are_answered_elsewhere(rig: MakeRig) -> None:
    r = await rig()
    calls = [asyncio.ensure_future(call(r)) for _ in range(3)]
    await r.held(3)
    assert r.eject_and_sweep() == 3
    assert await asyncio.gather(*calls) == [(200, OK)] * 3
    assert r.network.seen == Counter({(HUNG, "GET"): 3, (OK, "GET"): 3})
    assert r.network.cancelled == [HUNG] * 3  # given up there (its connection closed)
    hung = [o for o in r.policy.outcomes if o.endpoint == HUNG]
    # no failure of its own (the ejection counted what it did): a lower bound, censored
    assert len(hung) == 3 and all(o.censored and o.ok for o in hung)
    assert r.metric("equilibrium_rescued_total") == 3
    assert r.metric("equilibrium_retries_total") == 3
    assert r.proxy.rescue is not None and r.proxy.rescue.held("users") == 0
    assert r.policy.stats[HUNG].in_flight == 0 and r.policy.stats[OK].in_flight == 0


async def test_a_request_with_a_body_or_a_post_is_never_rescued(rig: MakeRig) -> None:
    r = await rig(timeout=0.5)
    calls = [asyncio.ensure_future(call(r, "POST")),
             asyncio.ensure_future(call(r, "PUT", b"payload")),
             asyncio.ensure_future(call(r, "POST", b"order"))]
    while sum(r.network.seen.values()) < 3:
        await asyncio.sleep(0.01)
    assert r.proxy.rescue is not None and r.proxy.rescue.held("users") == 0
    assert r.eject_and_sweep() == 0
    assert [status for status, _ in await asyncio.gather(*calls)] == [504] * 3
    assert r.network.seen[(OK, "POST")] == r.network.seen[(OK, "PUT")] == 0
    assert r.metric("equilibrium_rescued_total") == 0


async def test_what_was_sent_after_the_ejection_began_is_not_rescued(rig: MakeRig) -> None:
    r = await rig(timeout=0.5)
    assert r.proxy.rescue is not None
    r.policy.ejected_at = time.monotonic()
    task = asyncio.ensure_future(call(r))
    await r.held(1)
    assert r.proxy.rescue.sweep(r.group, time.monotonic()) == 0
    assert (await task)[0] == 504


async def test_no_rescue_without_another_endpoint_or_attempt(rig: MakeRig) -> None:
    alone = await rig(endpoints=(HUNG,), timeout=0.5)
    task = asyncio.ensure_future(call(alone))
    await alone.held(1)
    assert alone.eject_and_sweep() == 0
    assert (await task)[0] == 504
    once = await rig(timeout=0.5, max_attempts=1)
    task = asyncio.ensure_future(call(once))
    await once.held(1)
    assert once.eject_and_sweep() == 0
    assert (await task)[0] == 504


async def test_the_retry_budget_bounds_rescues_and_an_empty_one_is_counted_once(
        rig: MakeRig) -> None:
    # room for exactly one withdrawal (0 + 1 <= 0.0 * requests + 0.1 * 10)
    r = await rig(timeout=1.0, budget=RetryBudget(ratio=0.0, min_per_s=0.1, window=10.0))
    calls = [asyncio.ensure_future(call(r)) for _ in range(3)]
    await r.held(3)
    assert r.eject_and_sweep() == 1
    assert r.eject_and_sweep() == 0  # still empty: the two left wait, counted once each
    statuses = sorted(status for status, _ in await asyncio.gather(*calls))
    assert statuses == [200, 504, 504]
    assert r.metric("equilibrium_rescued_total") == 1
    assert r.metric("equilibrium_retry_budget_exhausted_total") == 2


async def test_rescue_off_holds_nothing(rig: MakeRig) -> None:
    r = await rig(timeout=0.5, rescue=False)
    assert r.proxy.rescue is None
    assert (await call(r))[0] == 504
    assert r.network.seen[(OK, "GET")] == 0
