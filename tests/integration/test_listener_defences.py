"""The inbound listener's socket defences against a real sidecar process (issue 14,
finding 3): half-sent request heads, idle keep-alive connections, a connection flood from one
address, and a file limit too low for the flood.

The attack as it was found: 300 half-sent heads stayed open past 80 s (no header-read timeout,
aiohttp's 3630 s keep-alive), and under a low file limit idle connections made the sidecar's
own outbound requests fail while asyncio logged ~22,000 tracebacks in 12 s.
"""

from __future__ import annotations

import asyncio
import json
import resource
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

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

ATTACKER = "127.0.0.2"  # another loopback address: its own source for the per-source cap
HEADS = 300


@dataclass
class Rig:
    app: Backend
    sidecar: SidecarProcess
    inbound_url: str
    port: int


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def rig(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    app = await start_backend("app")
    config = Path(tmp_path_factory.mktemp("listener")) / "sidecar.json"
    config.write_text(json.dumps({"policing": {
        "header_timeout": 1.0, "keepalive_timeout": 2.0, "max_connections_per_source": 1000}}))
    port = free_port()
    sidecar = await async_start_sidecar(
        {"app": [app.url]}, sidecar_id="defended", config_file=config,
        extra_args=["--inbound", f"{LOOPBACK}:{port}", "--app", app.url])
    try:
        yield Rig(app, sidecar, f"http://{LOOPBACK}:{port}", port)
    finally:
        await asyncio.to_thread(sidecar.stop, 5.0)
        sidecar.cleanup()
        await app.stop()


async def open_from(host: str, port: int, count: int, data: bytes = b""
                    ) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    conns = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection(host, port, local_addr=(ATTACKER, 0))
        if data:
            writer.write(data)
        conns.append((reader, writer))
    return conns


async def ended_by_server(reader: asyncio.StreamReader, within: float) -> bytes | None:
    """What the server wrote before it ended the connection (within ``within`` s); None if it
    did not end it, or reset it."""
    try:
        async with asyncio.timeout(within):
            return await reader.read()
    except (TimeoutError, ConnectionError):
        return None


async def test_half_sent_heads_are_closed_after_the_header_timeout(rig: Rig) -> None:
    conns = await open_from(LOOPBACK, rig.port, HEADS, b"GET / HTTP/1.1\r\nHost: app\r\nX-A: ")
    try:
        statuses = []
        async with aiohttp.ClientSession() as client:
            for _ in range(10):  # a normal client is served meanwhile
                async with client.get(rig.inbound_url + "/ok") as resp:
                    statuses.append(resp.status)
                await asyncio.sleep(0.05)
        assert statuses == [200] * 10
        ends = await asyncio.gather(*(ended_by_server(r, 5.0) for r, _ in conns))
        assert all(end is not None for end in ends), \
            f"{ends.count(None)} of {HEADS} heads still open"
        # each answered 408 before the close (the sidecar's HTTP/1.1 server), then ended
        assert all(end is not None and end.startswith(b"HTTP/1.1 408") for end in ends)
    finally:
        for _, writer in conns:
            writer.close()
    text = rig.sidecar.metrics_text()
    assert metric_value(text, "equilibrium_inbound_listener_timeouts_total",
                        phase="header") >= HEADS
    assert "Traceback" not in rig.sidecar.output()


async def test_an_idle_keep_alive_connection_is_closed(rig: Rig) -> None:
    reader, writer = await asyncio.open_connection(LOOPBACK, rig.port)
    try:
        writer.write(b"GET /one HTTP/1.1\r\nHost: app\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        # a second request on the same connection is served (keep-alive works) ...
        writer.write(b"GET /two HTTP/1.1\r\nHost: app\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(
            b"HTTP/1.1 200")
        await reader.readexactly(length)
        # ... and then, idle for the keep-alive timeout (2 s), it is closed
        assert await ended_by_server(reader, 5.0) == b""
    finally:
        writer.close()
    assert rig.sidecar.metric("equilibrium_inbound_listener_timeouts_total", phase="idle") >= 1


async def test_a_low_file_limit_caps_connections_without_a_traceback_storm(rig: Rig) -> None:
    pid = rig.sidecar.pid
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (200, old[1]))  # cap: 100 inbound
    await asyncio.sleep(1.1)  # the cap follows the limit within a second
    before = rig.sidecar.metric("equilibrium_inbound_connections_rejected_total", reason="cap")
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        conns = await open_from(LOOPBACK, rig.port, 300, b"GET / HTTP/1.1\r\n")
        await asyncio.sleep(0.3)
        # the sidecar's own outbound requests still get descriptors
        async with aiohttp.ClientSession() as client, client.get(
                rig.sidecar.outbound_url + "/out", headers={"Host": "app"}) as resp:
            assert resp.status == 200
        rejected = rig.sidecar.metric("equilibrium_inbound_connections_rejected_total",
                                      reason="cap") - before
        assert rejected >= 150, rejected
    finally:
        for _, writer in conns:
            writer.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, old)
    output = rig.sidecar.output()
    assert output.count("Traceback") == 0, output[-3000:]
