"""The outbound proxy's hedge race (sidecar.outbound ``_race``), against an in-memory network.

The app talks HTTP to a real :class:`OutboundProxy` on loopback; the upstreams are a
:class:`MemoryTransport` handler whose endpoints answer after set delays, so the race's rules
are checked deterministically: the backup goes out only after the delay and within the retry
budget, the first head wins, the explored loser runs on (one at a time per endpoint, up to
``run_on``) to show its latency and the rest are cancelled and observed as censored, never
for a body.
Which picks are exploratory is the policy's (tests/unit/mesh/test_hedging.py); here a round-robin
policy with a fixed plan for one endpoint stands in for it. The process test
(tests/integration/test_hedging.py) checks the same over real sockets with the real policy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from mesh.hedging import HedgePlan
from mesh.policies import RoundRobin
from mesh.policy import Outcome
from mesh.profiles import StrategyProfile, get_profile
from mesh.retry import RetryBudget
from sidecar.h2_site import OutboundSite
from sidecar.metrics import H2Metrics, SidecarMetrics
from sidecar.outbound import OutboundProxy
from sidecar.transport import MemoryTransport
from sidecar.upstreams import UpstreamTable
from tests.support import eventually
from tests.unit.sidecar.memory_upstreams import Network, serve

SLOW, FAST = "http://10.0.0.1:8080", "http://10.0.0.2:8080"


class PlannedPolicy:
    """Round-robin that starts at SLOW, hedges SLOW with FAST, and keeps its outcomes.

    Wraps a :class:`RoundRobin` for the bookkeeping rather than subclassing it: the policies
    may be compiled (``make compile``), and an interpreted class cannot inherit from a
    compiled one."""

    def __init__(self, profile: StrategyProfile, delay: float) -> None:
        self.inner = RoundRobin(profile)
        self.delay = delay
        self.outcomes: list[Outcome] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def pick(self, rng: random.Random, now: float,
             exclude: frozenset[str] = frozenset()) -> str | None:
        return SLOW if SLOW not in exclude else (FAST if FAST not in exclude else None)

    def hedge_plan(self, endpoint: str) -> HedgePlan | None:
        return HedgePlan(FAST, self.delay) if endpoint == SLOW else None

    def on_outcome(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self.inner.on_outcome(outcome)


@dataclass
class Rig:
    proxy: OutboundProxy
    policy: PlannedPolicy
    network: Network
    client: aiohttp.ClientSession
    metrics: SidecarMetrics

    def hedges(self, result: str) -> float:
        return self.metrics.registry.get_sample_value(
            "equilibrium_hedges_total", {"upstream": "users", "result": result}) or 0.0


MakeRig = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def rig() -> AsyncIterator[MakeRig]:
    closers: list[Callable[[], Awaitable[object]]] = []

    async def make(slow: float = 0.5, fast: float = 0.0, delay: float = 0.02,
                   hedge: bool = True, budget: RetryBudget | None = None,
                   run_on: float = 0.1) -> Rig:
        profile = dataclasses.replace(get_profile("balanced"), request_timeout=5.0)
        table = UpstreamTable("round-robin", profile)
        table.apply({"users": (SLOW, FAST)}, 0.0)
        group = table.get("users")
        assert group is not None
        policy = PlannedPolicy(profile, delay)
        group.policy = policy
        group.set_endpoints((SLOW, FAST), 0.0)
        if budget is not None:
            group.budget = budget
        network = Network({SLOW: slow, FAST: fast})
        metrics = SidecarMetrics()
        proxy = OutboundProxy(sidecar_id="unit-sidecar", table=table, profile=profile,
                              metrics=metrics.outbound, rng=random.Random(7),
                              transport=MemoryTransport(network), hedge=hedge,
                              run_on=run_on)
        client = await serve(proxy, closers)
        return Rig(proxy, policy, network, client, metrics)

    yield make
    for close in closers:
        await close()


async def get(rig: Rig, method: str = "GET", data: bytes | None = None) -> tuple[int, str]:
    async with rig.client.request(method, "/x", headers={"Host": "users"}, data=data) as resp:
        return resp.status, resp.headers.get("X-Backend", "")


async def test_a_slow_explored_get_is_answered_by_the_backup_and_the_loser_cut_later(
        rig: MakeRig) -> None:
    r = await rig(slow=5.0, run_on=0.1)
    assert await get(r) == (200, FAST)
    assert r.network.seen[(SLOW, "GET")] == 1 and r.network.seen[(FAST, "GET")] == 1
    # the explored loser runs on (one a time per endpoint) to show how slow it is, then is
    # cut off at run_on from its sending and learned as that lower bound
    assert (r.hedges("sent"), r.hedges("won"), r.hedges("ran-on")) == (1, 1, 1)
    await eventually(lambda: r.network.cancelled == [SLOW], "the loser cut at run_on")
    assert r.hedges("cancelled") == 0
    slow = [o for o in r.policy.outcomes if o.endpoint == SLOW]
    assert len(slow) == 1 and slow[0].censored and slow[0].ok  # no failure of the pod
    assert slow[0].latency >= 0.1  # at least run_on
    assert r.policy.stats[SLOW].in_flight == 0 and r.policy.stats[FAST].in_flight == 0
    assert r.policy.stats[SLOW].failures == 0


async def test_an_explored_loser_that_answers_while_it_runs_on_teaches_its_latency(
        rig: MakeRig) -> None:
    """A stranger's finding: a pod slow on half its requests lost each race on that half,
    was learned only as the race's lower bound (below its estimate: nothing) and from its
    quick half, and looked healthy twice a minute. Its loser's whole latency is learned."""
    r = await rig(slow=0.3, run_on=2.0)
    assert await get(r) == (200, FAST)
    await eventually(lambda: any(o.endpoint == SLOW for o in r.policy.outcomes),
                     "the loser's answer learned")
    slow = [o for o in r.policy.outcomes if o.endpoint == SLOW]
    assert len(slow) == 1 and slow[0].answered and not slow[0].censored and slow[0].ok
    assert slow[0].latency >= 0.3
    assert r.network.cancelled == [] and r.hedges("cancelled") == 0


async def test_one_loser_runs_on_per_endpoint_the_others_are_cancelled(rig: MakeRig) -> None:
    r = await rig(slow=5.0, run_on=1.0)
    answers = await asyncio.gather(*(get(r) for _ in range(3)))
    assert answers == [(200, FAST)] * 3
    assert (r.hedges("ran-on"), r.hedges("cancelled")) == (1, 2)
    assert sorted(r.network.cancelled) == [SLOW, SLOW]
    await r.proxy.close()  # a loser running on is cut when the sidecar closes
    await eventually(lambda: r.network.cancelled == [SLOW] * 3, "cut at close")
    # every attempt started got its one outcome: nothing left in flight (a review's finding)
    assert r.policy.stats[SLOW].in_flight == 0
    assert [o.void for o in r.policy.outcomes if o.endpoint == SLOW].count(True) == 1


async def test_an_explored_endpoint_that_answers_in_time_is_not_hedged(rig: MakeRig) -> None:
    r = await rig(slow=0.0, delay=1.0)
    assert await get(r) == (200, SLOW)
    assert r.network.seen[(FAST, "GET")] == 0 and r.hedges("sent") == 0


async def test_the_explored_endpoint_can_still_win_and_the_backup_is_cancelled(
        rig: MakeRig) -> None:
    r = await rig(slow=0.1, fast=5.0, delay=0.02)
    assert await get(r) == (200, SLOW)
    assert (r.hedges("sent"), r.hedges("won"), r.hedges("cancelled")) == (1, 0, 1)
    assert r.network.cancelled == [FAST]
    fast = [o for o in r.policy.outcomes if o.endpoint == FAST]
    assert len(fast) == 1 and fast[0].censored


async def test_a_request_with_a_body_and_a_post_are_never_hedged(rig: MakeRig) -> None:
    r = await rig(slow=0.2)
    assert await get(r, "PUT", b"payload") == (200, SLOW)
    assert await get(r, "DELETE", b"payload") == (200, SLOW)
    assert await get(r, "POST", b"order") == (200, SLOW)
    assert await get(r, "POST") == (200, SLOW)
    assert r.network.bodies == [b"payload", b"payload", b"order"]
    assert sum(n for (e, _), n in r.network.seen.items() if e == FAST) == 0
    assert r.hedges("sent") == 0


async def test_a_bodiless_put_may_be_hedged(rig: MakeRig) -> None:
    r = await rig(slow=5.0)
    assert await get(r, "PUT") == (200, FAST)
    assert r.hedges("sent") == 1


async def test_the_retry_budget_bounds_hedges(rig: MakeRig) -> None:
    # room for exactly one withdrawal (0 + 1 <= 0.0 * requests + 0.1 * 10)
    r = await rig(slow=0.15, budget=RetryBudget(ratio=0.0, min_per_s=0.1, window=10.0))
    answers = [await get(r) for _ in range(3)]
    assert answers == [(200, FAST), (200, SLOW), (200, SLOW)]
    assert r.hedges("sent") == 1 and r.hedges("budget-exhausted") == 2
    assert r.network.seen[(FAST, "GET")] == 1 and r.network.seen[(SLOW, "GET")] == 3


async def test_hedging_is_off_unless_asked(rig: MakeRig) -> None:
    r = await rig(slow=0.1, hedge=False)
    assert await get(r) == (200, SLOW)
    assert r.network.seen[(FAST, "GET")] == 0 and r.hedges("sent") == 0


async def _no_h2(stream: object) -> None:
    raise AssertionError("no HTTP/2 here")


@pytest.mark.parametrize("hedge", [False, True], ids=["plain", "hedged"])
async def test_an_app_resetting_mid_race_is_its_hang_up_hedged_or_not(hedge: bool) -> None:
    # The review's finding: the hedged race's cancellation recorded nothing, where the plain
    # attempt counts app-hung-up; both racers are cancelled, neither charged.
    profile = dataclasses.replace(get_profile("balanced"), request_timeout=5.0)
    table = UpstreamTable("round-robin", profile)
    table.apply({"users": (SLOW, FAST)}, 0.0)
    group = table.get("users")
    assert group is not None
    policy = PlannedPolicy(profile, 0.05)
    group.policy = policy
    group.set_endpoints((SLOW, FAST), 0.0)
    network = Network({SLOW: 5.0, FAST: 5.0})
    metrics = SidecarMetrics()
    proxy = OutboundProxy(sidecar_id="unit-sidecar", table=table, profile=profile,
                          metrics=metrics.outbound, rng=random.Random(7),
                          transport=MemoryTransport(network), hedge=hedge)
    runner = web.AppRunner(proxy.make_app(), access_log=None)
    await runner.setup()
    site = OutboundSite(runner, "127.0.0.1", 0, handler=_no_h2,
                        metrics=H2Metrics(metrics.registry), drain_timeout=1.0,
                        http1=proxy.serve)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: users\r\n\r\n")
        await writer.drain()
        for _ in range(100):  # the race is on (both racers out) when hedging
            if len(network.seen) == (2 if hedge else 1):
                break
            await asyncio.sleep(0.01)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                   struct.pack("ii", 1, 0))
        writer.close()
        for _ in range(100):
            if metrics.registry.get_sample_value(
                    "equilibrium_errors_total",
                    {"upstream": "users", "reason": "app-hung-up"}):
                break
            await asyncio.sleep(0.01)
        assert metrics.registry.get_sample_value(
            "equilibrium_errors_total", {"upstream": "users", "reason": "app-hung-up"}) == 1
        assert set(network.cancelled) == ({FAST, SLOW} if hedge else {SLOW})
        assert policy.stats[SLOW].failures == 0 and policy.stats[FAST].failures == 0
    finally:
        await runner.cleanup()
