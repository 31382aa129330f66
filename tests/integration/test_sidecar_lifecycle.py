"""Lifecycle of the real sidecar process: drain on SIGTERM, reload on SIGHUP and file change."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from pathlib import Path

import aiohttp
import pytest

from tests.integration.procs import (
    Backend,
    SidecarProcess,
    async_start_sidecar,
    async_stop,
    fetch,
    http_get,
    start_backend,
)
from tests.support import eventually

POLL = 0.05


def endpoints_of(sidecar: SidecarProcess, upstream: str) -> list[str]:
    return [e["endpoint"] for e in sidecar.state()["upstreams"].get(upstream, {"endpoints": []})
            ["endpoints"]]


async def get_via(
    sidecar: SidecarProcess, path: str = "/", host: str = "svc"
) -> tuple[int, bytes]:
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as client:
        reply = await fetch(client, "GET", f"{sidecar.outbound_url}{path}", headers={"Host": host})
        return reply.status, reply.body


async def wait_hits(backend: Backend, count: int) -> None:
    for _ in range(200):
        if backend.hits >= count:
            return
        await asyncio.sleep(POLL)
    raise AssertionError(f"{backend.name} never saw {count} request(s)")


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


async def test_sigterm_drains_in_flight_requests_up_to_the_deadline_then_exits_0() -> None:
    slow = await start_backend("slow", latency=1.0)  # finishes within the drain deadline
    stuck = await start_backend("stuck", latency=60.0)  # does not
    sidecar = await async_start_sidecar(
        {"svc": [slow.url], "stuck": [stuck.url]}, extra_args=["--drain-timeout", "3"]
    )
    try:
        in_flight = asyncio.create_task(get_via(sidecar))
        beyond = asyncio.create_task(get_via(sidecar, host="stuck"))
        await wait_hits(slow, 1)
        await wait_hits(stuck, 1)
        sidecar.send_signal(signal.SIGTERM)
        await eventually(lambda: http_get(f"{sidecar.admin_url}/readyz")[0] == 503,
                         "readyz answers 503 while draining")
        assert sidecar.state()["draining"] is True
        await eventually(lambda: refuses_connections(sidecar.outbound_port),
                         "the outbound listener is closed")
        assert await in_flight == (200, b"slow")
        # the 60 s request is cut at the deadline; the process still exits cleanly
        assert await asyncio.to_thread(sidecar.wait, 20) == 0
        with pytest.raises(aiohttp.ClientError):  # cut, not answered with a made-up status
            await beyond
        assert "cutting 1 request(s) still in flight" in sidecar.output()
    finally:
        await async_stop(sidecar)
        await slow.stop()
        await stuck.stop()


def write_config(path: Path, endpoints: list[str]) -> None:
    # write-then-rename: the watcher never sees a half-written file
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"upstreams:\n  svc: [{', '.join(endpoints)}]\n")
    tmp.replace(path)


async def test_sighup_swaps_endpoints_while_a_request_is_in_flight(tmp_path: Path) -> None:
    old = await start_backend("old", latency=1.0)
    new = await start_backend("new")
    config = tmp_path / "sidecar.yaml"
    write_config(config, [old.url])
    sidecar = await async_start_sidecar(config_file=config)
    try:
        in_flight = asyncio.create_task(get_via(sidecar))
        await wait_hits(old, 1)
        write_config(config, [new.url])
        sidecar.send_signal(signal.SIGHUP)
        await eventually(lambda: endpoints_of(sidecar, "svc") == [new.url], "SIGHUP reloads")
        assert await in_flight == (200, b"old")  # not dropped by the reload
        assert await get_via(sidecar) == (200, b"new")
        assert old.hits == 1
        assert sidecar.metric("equilibrium_config_reloads_total", result="applied") >= 1
    finally:
        assert await async_stop(sidecar) == 0
        await old.stop()
        await new.stop()


async def test_file_change_reloads_and_a_bad_file_keeps_the_old_config(tmp_path: Path) -> None:
    first = await start_backend("first")
    second = await start_backend("second")
    config = tmp_path / "sidecar.json"
    config.write_text(json.dumps({"upstreams": {"svc": [first.url]}}))
    sidecar = await async_start_sidecar(config_file=config)
    try:
        assert await get_via(sidecar) == (200, b"first")
        tmp = tmp_path / "next.json"
        tmp.write_text(json.dumps({"upstreams": {"svc": [second.url], "extra": []}}))
        tmp.replace(config)  # no signal: the mtime watcher notices
        await eventually(lambda: endpoints_of(sidecar, "svc") == [second.url],
                         "the changed file is reloaded")
        assert "extra" in sidecar.state()["upstreams"]
        assert await get_via(sidecar) == (200, b"second")

        tmp.write_text('{"upstreams": {"svc": ["ftp://nope"]}}')
        tmp.replace(config)
        await eventually(
            lambda: sidecar.metric("equilibrium_config_reloads_total", result="rejected") >= 1,
            "the bad file is rejected")
        sidecar.send_signal(signal.SIGHUP)  # the signal path rejects it too
        await eventually(
            lambda: sidecar.metric("equilibrium_config_reloads_total", result="rejected") >= 2,
            "SIGHUP rejects it too")
        assert endpoints_of(sidecar, "svc") == [second.url]
        assert await get_via(sidecar) == (200, b"second")
        assert "config reload rejected" in sidecar.output()
    finally:
        assert await async_stop(sidecar) == 0
        await first.stop()
        await second.stop()
