"""Slow callers against a real inbound sidecar (issue 14, finding 1): real slow sockets.

The attack as it was found: connections that send a request head and then a body one byte
every second or so. Before, each held one of the app's few concurrency slots for its whole
upload, so a handful of them answered a trusted caller 503 and the attacker stayed in good
standing. Now a body is received before its request asks for a slot (within an upload
deadline, else 408), and each late or abandoned upload counts against its caller.

Everything on loopback, bounded in count and time.
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

from tests.integration.inbound_support import MESH_KEY
from tests.integration.procs import (
    LOOPBACK,
    Backend,
    SidecarProcess,
    async_start_sidecar,
    free_port,
    start_backend,
)
from tests.support import metric_value

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

UPLOAD_TIMEOUT = 2.0
SLOW_CONNECTIONS = 12  # four times the app's 3 slots


@dataclass
class Rig:
    app: Backend
    inbound: SidecarProcess
    caller: SidecarProcess
    inbound_port: int


async def read_all(request: web.Request) -> web.Response:
    return web.Response(text=str(len(await request.read())))


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def rig(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    app = await start_backend("app", latency=0.02, routes=[web.post("/big", read_all)])
    config = Path(tmp_path_factory.mktemp("slow")) / "sidecar.json"
    config.write_text(json.dumps({"policing": {
        "upload_timeout": UPLOAD_TIMEOUT, "max_wait": 1.0,
        "concurrency": {"initial_limit": 3, "min_limit": 3, "max_limit": 3, "probe_limit": 3,
                        "probe_samples": 1},
    }}))
    port = free_port()
    env = {"EQUILIBRIUM_MESH_SECRET": MESH_KEY}
    procs = await asyncio.gather(
        async_start_sidecar({}, sidecar_id="app-sidecar", config_file=config, env=env,
                            extra_args=["--inbound", f"{LOOPBACK}:{port}", "--app", app.url]),
        async_start_sidecar({"svc": [f"http://{LOOPBACK}:{port}"]}, sidecar_id="trusted",
                            env=env, extra_args=["--max-attempts", "1"]),
    )
    try:
        yield Rig(app, procs[0], procs[1], port)
    finally:
        await asyncio.gather(*(asyncio.to_thread(p.stop, 5.0) for p in procs))
        for p in procs:
            p.cleanup()
        await app.stop()


async def trickle(port: int, stop: asyncio.Event, interval: float = 1.0) -> int:
    """One slow uploader: a POST head promising 1000 bytes, then one byte per ``interval``;
    reconnects whenever the sidecar closes the connection. Returns the 408s it got."""
    timeouts = 0
    while not stop.is_set():
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        try:
            writer.write(b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 1000\r\n\r\n")
            await writer.drain()
            while not stop.is_set():
                writer.write(b"x")
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    answer = await asyncio.wait_for(reader.read(4096), timeout=interval)
                    if answer.startswith(b"HTTP/1.1 408"):
                        timeouts += 1
                    if not answer or answer.startswith(b"HTTP/"):
                        break
        except ConnectionError:
            pass
        finally:
            writer.close()
    return timeouts


async def test_slow_uploads_hold_no_slot_and_count_against_their_caller(rig: Rig) -> None:
    stop = asyncio.Event()
    attack = [asyncio.create_task(trickle(rig.inbound_port, stop))
              for _ in range(SLOW_CONNECTIONS)]
    statuses: list[int] = []
    try:
        await asyncio.sleep(0.5)  # every slow connection is in its upload
        async with aiohttp.ClientSession() as client:
            for _ in range(25):  # 5 s at 5 requests/s, both with and without a body
                for method, body in (("GET", None), ("POST", b"order")):
                    async with client.request(method, rig.caller.outbound_url + "/work",
                                              data=body, headers={"Host": "svc"}) as resp:
                        await resp.read()
                        statuses.append(resp.status)
                await asyncio.sleep(0.2)
    finally:
        stop.set()
        got_408 = sum(await asyncio.gather(*attack))
    assert statuses == [200] * len(statuses), statuses
    assert got_408 >= SLOW_CONNECTIONS
    text = rig.inbound.metrics_text()
    assert metric_value(text, "equilibrium_inbound_slow_uploads_total", caller="anonymous",
                        outcome="timeout") >= SLOW_CONNECTIONS
    assert metric_value(text, "equilibrium_inbound_requests_total", caller="anonymous",
                        outcome="upload-timeout") >= SLOW_CONNECTIONS
    # the attacker's standing reflects it: punished, so its next request is refused at once
    assert metric_value(text, "equilibrium_inbound_caller_punishment_level",
                        caller="anonymous") >= 1
    assert metric_value(text, "equilibrium_inbound_caller_punishment_level",
                        caller="trusted") == 0
    assert "Traceback" not in rig.inbound.output()


async def test_an_abandoned_upload_is_counted_as_such(rig: Rig) -> None:
    before = rig.inbound.metric("equilibrium_inbound_slow_uploads_total", outcome="abandoned")
    for _ in range(3):
        _reader, writer = await asyncio.open_connection(LOOPBACK, rig.inbound_port)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 1000\r\n\r\nhalf")
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()
        await writer.wait_closed()
    async with asyncio.timeout(5):
        while rig.inbound.metric("equilibrium_inbound_slow_uploads_total",
                                 outcome="abandoned") < before + 3:
            await asyncio.sleep(0.1)
    assert "Traceback" not in rig.inbound.output()


async def test_a_large_body_that_stalls_after_the_buffer_is_still_cut_at_the_deadline(
        rig: Rig) -> None:
    """Past the 256 KiB buffer the body streams to the app (holding a slot), under the same
    upload deadline: 300 KiB sent at once, then nothing, is a 408 after 2 s, not a hang."""
    before = rig.inbound.metric("equilibrium_inbound_slow_uploads_total", outcome="timeout")
    reader, writer = await asyncio.open_connection(LOOPBACK, rig.inbound_port)
    try:
        writer.write(b"POST /big HTTP/1.1\r\nHost: app\r\nContent-Length: 1000000\r\n\r\n"
                     + b"x" * 300_000)
        await writer.drain()
        async with asyncio.timeout(UPLOAD_TIMEOUT + 5):
            answer = await reader.read(4096)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert rig.inbound.metric("equilibrium_inbound_slow_uploads_total",
                              outcome="timeout") == before + 1
    async with asyncio.timeout(3):  # the slot came back (the gauge is refreshed every 0.5 s)
        while rig.inbound.metric("equilibrium_inbound_in_flight") != 0:
            await asyncio.sleep(0.1)
    assert "Traceback" not in rig.inbound.output()
