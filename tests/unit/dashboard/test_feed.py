"""dashboard.feed: the page, its files and the event stream on a real aiohttp listener."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from dashboard.feed import MAX_CLIENTS, DashboardFeed, asset


class Source:
    def __init__(self) -> None:
        self.n = 0
        self.fail = False

    def __call__(self) -> dict[str, Any]:
        if self.fail:
            raise RuntimeError("a bug in a view")
        self.n += 1
        return {"source": "test", "id": "t", "upstreams": [], "policing": [],
                "value": float("nan") if self.n == 2 else self.n}


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, DashboardFeed, Source]]:
    source = Source()
    feed = DashboardFeed(source, period=0.05)
    app = web.Application()
    feed.attach(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", feed, source
    finally:
        await runner.cleanup()


async def read_events(resp: aiohttp.ClientResponse, count: int) -> list[tuple[str, Any]]:
    events: list[tuple[str, Any]] = []
    name, data = "", ""
    while len(events) < count:
        line = (await asyncio.wait_for(resp.content.readline(), 5)).decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line == "" and name:
            events.append((name, json.loads(data)))
            name, data = "", ""
    return events


async def test_the_page_and_its_files_come_from_the_package_with_a_strict_policy(
    served: tuple[str, DashboardFeed, Source],
) -> None:
    base, _, _ = served
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/dashboard") as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
            assert await resp.read() == asset("index.html")
            policy = resp.headers["Content-Security-Policy"]
            assert "default-src 'none'" in policy and "connect-src 'self'" in policy
        for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
            async with session.get(f"{base}/dashboard/{name}") as resp:
                assert resp.status == 200 and resp.content_type == kind
                assert await resp.read() == asset(name)
        async with session.get(base + "/dashboard/", allow_redirects=False) as resp:
            assert resp.status == 302 and resp.headers["Location"] == "/dashboard"
        async with session.post(base + "/dashboard") as resp:
            assert resp.status == 405  # read-only
    html = asset("index.html").decode()
    assert "http" not in html.replace("http-equiv", "")  # nothing from elsewhere
    assert "http://" not in asset("dashboard.js").decode().replace("http://www.w3.org/2000/svg", "")


async def test_the_stream_sends_the_history_then_each_frame_without_nan(
    served: tuple[str, DashboardFeed, Source],
) -> None:
    base, feed, _ = served
    await asyncio.sleep(0.2)
    async with aiohttp.ClientSession() as session, \
            session.get(base + "/dashboard/events") as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        (name, history), *frames = await read_events(resp, 4)
    assert name == "history" and len(history) >= 2
    assert history[1]["value"] is None  # NaN is not JSON
    assert [n for n, _ in frames] == ["frame", "frame", "frame"]
    seqs = [f["seq"] for _, f in frames]
    assert seqs == sorted(seqs) and seqs[0] > history[-1]["seq"]
    assert all(f["v"] == 1 and f["boot"] == feed.boot for _, f in frames)


async def test_a_failing_view_keeps_the_last_frame_and_the_listener_answers(
    served: tuple[str, DashboardFeed, Source],
) -> None:
    base, feed, source = served
    await asyncio.sleep(0.15)
    source.fail = True
    await asyncio.sleep(0.15)
    last = feed.seq
    async with aiohttp.ClientSession() as session, \
            session.get(base + "/dashboard/frame") as resp:
        assert resp.status == 200
        assert (await resp.json())["seq"] == last
    source.fail = False
    # the sampler slows down on a busy machine (it takes at most 5 % of the loop): wait for
    # the next frame rather than a fixed time (a fixed 0.15 s failed once in CI)
    async with asyncio.timeout(5):
        while feed.seq <= last:
            await asyncio.sleep(0.05)


async def test_streams_are_bounded_and_end_when_the_app_shuts_down(
    served: tuple[str, DashboardFeed, Source],
) -> None:
    base, feed, _ = served
    async with aiohttp.ClientSession() as session:
        streams = [await session.get(base + "/dashboard/events") for _ in range(MAX_CLIENTS)]
        for resp in streams:
            await read_events(resp, 1)
        async with session.get(base + "/dashboard/events") as resp:
            assert resp.status == 503
        await feed.close()
        for resp in streams:  # each stream ends (the server does not wait on them)
            await asyncio.wait_for(resp.read(), 5)
            resp.release()
    assert feed.clients == 0
