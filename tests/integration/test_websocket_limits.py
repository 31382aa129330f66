"""WebSocket limits against a real inbound sidecar (issue 14, finding 2).

The attack as it was found: WebSocket messages were unbounded (``max_msg_size=0`` both ways)
and WebSockets held no slot: one 64 MB message took the sidecar from 61 to 255 MB (the injected
memory limit is 256 Mi). Now a message past ``websocket_max_message`` (1 MiB by default)
closes that WebSocket with 1009 before it is buffered, and a caller holds at most
``websocket_max_per_caller`` open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from tests.integration.procs import (
    LOOPBACK,
    Backend,
    SidecarProcess,
    async_start_sidecar,
    free_port,
    rss_bytes,
    start_backend,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

BIG = 64 * 1024 * 1024


@dataclass
class Rig:
    app: Backend
    sidecar: SidecarProcess
    url: str


async def echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=0)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type == aiohttp.WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def rig(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    app = await start_backend("app", routes=[web.get("/ws", echo)])
    config = Path(tmp_path_factory.mktemp("ws")) / "sidecar.json"
    config.write_text(json.dumps({"policing": {"websocket_max_per_caller": 2}}))
    port = free_port()
    sidecar = await async_start_sidecar(
        {}, sidecar_id="ws-sidecar", config_file=config,
        extra_args=["--inbound", f"{LOOPBACK}:{port}", "--app", app.url])
    try:
        yield Rig(app, sidecar, f"http://{LOOPBACK}:{port}")
    finally:
        await asyncio.to_thread(sidecar.stop, 5.0)
        sidecar.cleanup()
        await app.stop()


async def test_a_64_mb_message_closes_its_websocket_with_1009_without_buffering(
        rig: Rig) -> None:
    pid = rig.sidecar.pid
    async with aiohttp.ClientSession() as client:
        async with client.ws_connect(rig.url + "/ws") as ws:  # it works below the limit
            await ws.send_str("hello")
            assert (await ws.receive(timeout=5)).data == "hello"
        async with client.ws_connect(rig.url + "/ws", max_msg_size=0) as ws:
            # past the 1 MiB limit; the sidecar may close and reset before the client has
            # sent it all (CI, 2026-12-06: "Connection lost" in send_bytes)
            with contextlib.suppress(ConnectionError):
                await ws.send_bytes(b"x" * (2 * 1024 * 1024))
            msg = await ws.receive(timeout=10)
            # closed with 1009, which the client sees unless the reset of the rest of its
            # 2 MiB comes first (1006: seen once in CI, 2026-12-05); either way the sidecar
            # counts it as oversized (the metric, below)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                aiohttp.WSMsgType.ERROR)
            assert ws.close_code in (aiohttp.WSCloseCode.MESSAGE_TOO_BIG,
                                     aiohttp.WSCloseCode.ABNORMAL_CLOSURE)
        before = rss_bytes(pid)
        async with client.ws_connect(rig.url + "/ws", max_msg_size=0) as ws:
            with contextlib.suppress(ConnectionError):
                await ws.send_bytes(b"x" * BIG)
            msg = await ws.receive(timeout=10)
            # closed with 1009; the client may see the reset of the 60 MB it still had in
            # flight first (1006)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                aiohttp.WSMsgType.ERROR)
            assert ws.close_code in (aiohttp.WSCloseCode.MESSAGE_TOO_BIG,
                                     aiohttp.WSCloseCode.ABNORMAL_CLOSURE)
        async with client.get(rig.url + "/plain") as resp:  # other traffic is unaffected
            assert resp.status == 200
    grown = rss_bytes(pid, peak=True) - before
    assert grown < 16 * 1024 * 1024, f"the sidecar grew by {grown / 2**20:.1f} MiB"
    assert rig.sidecar.metric("equilibrium_websocket_oversized_total", listener="inbound") == 2
    assert "Traceback" not in rig.sidecar.output()


async def test_websockets_count_against_their_caller(rig: Rig) -> None:
    async with aiohttp.ClientSession() as client:
        first = await client.ws_connect(rig.url + "/ws")
        second = await client.ws_connect(rig.url + "/ws")
        try:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await client.ws_connect(rig.url + "/ws")
            assert refused.value.status == 429
        finally:
            await first.close()
            await second.close()
        await asyncio.sleep(0.2)
        third = await client.ws_connect(rig.url + "/ws")  # a closed one frees its place
        await third.close()
    assert rig.sidecar.metric("equilibrium_inbound_requests_total", caller="anonymous",
                              outcome="websocket-limit") == 1
