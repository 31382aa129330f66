"""The inbound listener's bid queue, step by step: an in-process ``InboundProxy`` on loopback in
front of an app whose requests finish only when the test says so (concurrency limit 1)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar.inbound import InboundProxy
from sidecar.metrics import InboundMetrics
from sidecar.policing_config import parse_policing
from tests.integration.inbound_support import signed_identity
from tests.integration.procs import LOOPBACK, Reply, fetch, start_backend

KEY = b"queue-test-mesh-key-0123456789"


@dataclass
class Rig:
    proxy: InboundProxy
    url: str
    release: asyncio.Queue[None]
    arrived: asyncio.Queue[str]


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://{LOOPBACK}:{port}"


@pytest_asyncio.fixture
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    release: asyncio.Queue[None] = asyncio.Queue()
    arrived: asyncio.Queue[str] = asyncio.Queue()

    async def gated(req: web.Request) -> web.Response:
        arrived.put_nowait(req.path)
        await release.get()
        return web.Response(text=req.path)

    app = await start_backend("gated", handler=gated)
    overrides = getattr(request, "param", {})
    settings = parse_policing({
        "max_wait": 1.5,
        # long_after: these requests wait for the test, never long by the app's nature (a
        # held slot would otherwise be parked as a scout after 1 s: test_long_requests.py)
        "concurrency": {"initial_limit": 1, "min_limit": 1, "max_limit": 1, "probe_limit": 1,
                        "probe_samples": 1, "long_after": 60},
        "auction": {"max_queue": 2},
        **overrides,
    })
    proxy = InboundProxy(sidecar_id="inbound-test", app_url=app.url, settings=settings,
                         metrics=InboundMetrics(CollectorRegistry()), mesh_key=KEY)
    runner, url = await serve(proxy.make_app())
    try:
        yield Rig(proxy, url, release, arrived)
    finally:
        for _ in range(20):
            release.put_nowait(None)
        await runner.cleanup()
        await app.stop()


def as_caller(url: str, name: str, bid: float | None = None) -> dict[str, str]:
    headers = {"X-GT-Identity": signed_identity(name, url, key=KEY.decode())}
    if bid is not None:
        headers["X-GT-Bid"] = f"{bid:g}"
    return headers


async def until_queued(rig: Rig, length: int) -> None:
    async with asyncio.timeout(5):
        while rig.proxy.auction.queue_length < length:
            await asyncio.sleep(0.01)


async def test_second_price_order_and_eviction(rig: Rig) -> None:
    async with aiohttp.ClientSession() as client:
        first = asyncio.create_task(fetch(client, "GET", rig.url + "/first",
                                          headers=as_caller(rig.url + "/first", "a")))
        assert await rig.arrived.get() == "/first"  # holds the only slot
        low = asyncio.create_task(fetch(client, "GET", rig.url + "/low",
                                        headers=as_caller(rig.url + "/low", "b", 1)))
        await until_queued(rig, 1)
        mid = asyncio.create_task(fetch(client, "GET", rig.url + "/mid",
                                        headers=as_caller(rig.url + "/mid", "c", 3)))
        await until_queued(rig, 2)
        # the queue holds 2: a higher bid pushes the lowest (bid 1) out, a bid of 0 is refused
        high = asyncio.create_task(fetch(client, "GET", rig.url + "/high",
                                         headers=as_caller(rig.url + "/high", "d", 8)))
        evicted: Reply = await low
        refused = await fetch(client, "GET", rig.url + "/zero",
                              headers=as_caller(rig.url + "/zero", "e"))
        rig.release.put_nowait(None)  # /first finishes: the best waiter (8) wins, pays 3
        assert await rig.arrived.get() == "/high"
        rig.release.put_nowait(None)
        assert await rig.arrived.get() == "/mid"  # then 3, alone in the queue: pays 0
        rig.release.put_nowait(None)
        replies = [await first, await high, await mid]
    assert evicted.status == 503 and evicted.json()["reason"] == "queue-full"
    assert refused.status == 503 and refused.headers["Retry-After"] == "1"
    assert [r.status for r in replies] == [200, 200, 200]
    assert [r.headers["X-GT-Price"] for r in replies] == ["0", "3", "0"]
    for reply in (evicted, refused, *replies):
        assert reply.headers["X-GT-Congestion"].startswith("v=1;level=")
        assert reply.headers["X-GT-Reputation"].startswith("v=1;score=")


async def test_waiting_too_long_is_a_503_and_a_client_that_leaves_frees_its_place(
        rig: Rig) -> None:
    async with aiohttp.ClientSession() as client:
        first = asyncio.create_task(fetch(client, "GET", rig.url + "/first"))
        await rig.arrived.get()
        waiter = asyncio.create_task(fetch(client, "GET", rig.url + "/gone"))
        await until_queued(rig, 1)
        waiter.cancel()  # the client goes away while waiting
        async with asyncio.timeout(5):
            while rig.proxy.auction.queue_length:
                await asyncio.sleep(0.01)
        started = time.monotonic()
        late = await fetch(client, "GET", rig.url + "/late")
        waited = time.monotonic() - started
        rig.release.put_nowait(None)
        assert (await first).status == 200
    assert late.status == 503 and late.json()["reason"] == "queue-timeout"
    assert waited >= 1.5  # answered at max_wait, not before
    assert rig.proxy.limiter.in_flight == 0 and not rig.proxy.policing._waiting


@pytest.mark.parametrize(
    "rig", [{"mode": "token-bucket", "token_bucket": {"rate": 0.001, "burst": 1}}],
    indirect=True)
async def test_token_bucket_baseline_answers_429_and_sends_no_game_headers(rig: Rig) -> None:
    async with aiohttp.ClientSession() as client:
        ok = asyncio.create_task(fetch(client, "GET", rig.url + "/one",
                                       headers=as_caller(rig.url + "/one", "a")))
        await rig.arrived.get()
        limited = await fetch(client, "GET", rig.url + "/two",
                              headers=as_caller(rig.url + "/two", "a"))
        rig.release.put_nowait(None)
        served = await ok
    assert served.status == 200 and limited.status == 429
    assert limited.json()["reason"] == "local-rate-limited"
    assert not any(k.lower().startswith("x-gt-") for k in (*served.headers, *limited.headers))
