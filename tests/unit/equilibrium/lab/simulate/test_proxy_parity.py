"""The simulator's sidecar decides as the real outbound proxy does, on the same observations.

A real :class:`sidecar.outbound.OutboundProxy` (aiohttp, on loopback) forwards through a
:class:`sidecar.transport.MemoryTransport` whose handler plays the pods: it moves a manual
clock (the proxy's ``clock``) forward by a scripted latency and answers, or refuses the
connection for a pod that is gone (the proxy then retries elsewhere). Beside it, the
simulator's :class:`SimSidecar` gets the same script: the same arrival times, the same latency
for each (endpoint, request) and the same refusals, with an RNG of the same seed, and ticks at
the same instants. The endpoints each picks, attempt by attempt, and the final weights must be
identical.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from equilibrium.lab.simulate.sidecar import SimSidecar
from mesh.profiles import get_profile
from sidecar.metrics import SidecarMetrics
from sidecar.outbound import OutboundProxy
from sidecar.transport import ConnectError, MemoryResponse, MemoryTransport, UpstreamRequest
from sidecar.upstreams import UpstreamTable

ENDPOINTS = tuple(f"http://pod-{i}.sim:8080" for i in range(4))
GONE = ENDPOINTS[2]  # refuses connections from request 60 on


def latency_of(endpoint: str, n: int) -> float:
    """The scripted answer time of request ``n`` at ``endpoint`` (pod-3 is slow, noisily)."""
    base = 0.004 + 0.001 * ENDPOINTS.index(endpoint)
    return base + (0.3 if endpoint == ENDPOINTS[3] and n % 2 else 0.0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def clients() -> AsyncIterator[list[TestClient]]:
    made: list[TestClient] = []
    yield made
    for client in made:
        await client.close()


@pytest.mark.parametrize("policy", ["equilibrium", "peak-ewma", "p2c-least-request",
                                    "round-robin"])
async def test_same_picks_as_the_outbound_proxy(policy: str, clients: list[TestClient]) -> None:
    profile = get_profile("balanced")
    clock = Clock()
    table = UpstreamTable(policy, profile)
    table.apply({"demo": ENDPOINTS}, 0.0)
    proxy_picks: list[str] = []
    request_no = [0]

    async def pods(request: UpstreamRequest) -> MemoryResponse:
        endpoint = str(request.url).removesuffix("/")
        proxy_picks.append(endpoint)
        if endpoint == GONE and request_no[0] >= 60:
            clock.now += 0.001
            raise ConnectError("refused")
        clock.now += latency_of(endpoint, request_no[0])
        return MemoryResponse(200, {}, b"ok")

    proxy = OutboundProxy(sidecar_id="parity", table=table, profile=profile,
                          metrics=SidecarMetrics().outbound, rng=random.Random(11),
                          clock=clock, transport=MemoryTransport(pods))
    client = TestClient(TestServer(proxy.make_app()))
    await client.start_server()
    clients.append(client)

    sim = SimSidecar(0, "parity", policy, profile, ENDPOINTS, random.Random(11), 0.0)
    sim_picks: list[str] = []
    sim_now = 0.0
    next_tick = profile.tick_interval
    for n in range(200):
        request_no[0] = n
        arrival = n * 0.02
        while next_tick <= arrival:  # the runner's tick loop, at the same instants for both
            clock.now = sim_now = next_tick
            table.get("demo").tick(next_tick)  # type: ignore[union-attr]
            sim.tick(next_tick)
            next_tick += profile.tick_interval
        clock.now = sim_now = arrival
        async with client.get("/", headers={"Host": "demo"}) as resp:
            assert resp.status == 200
        tried: tuple[str, ...] = ()
        while True:
            endpoint = sim.route(sim_now, tried)
            assert endpoint is not None
            sim_picks.append(endpoint)
            if endpoint == GONE and n >= 60:
                sim.refused(endpoint, sim_now, sim_now + 0.001)
                sim_now += 0.001
                tried = (*tried, endpoint)
                assert sim.may_retry(tried)
                continue
            sim.answered(endpoint, sim_now, sim_now + latency_of(endpoint, n))
            break
    assert sim_picks == proxy_picks
    assert len(proxy_picks) > 200  # the script did exercise refusals and retries
    real = table.get("demo")
    assert real is not None
    real.tick(next_tick)
    sim.tick(next_tick)
    assert sim.group.policy.snapshot().weights == real.policy.snapshot().weights
