"""Long polls behind an inbound sidecar do not take the app's slots from its quick requests
(mesh.admission, *Long requests*): a real sidecar process in front of a real app whose
``/poll`` answers only when the test says so, with the concurrency limit fixed at 4."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.integration.inbound_support import write_config
from tests.integration.procs import (
    LOOPBACK,
    SidecarProcess,
    async_start_sidecar,
    async_stop,
    free_port,
    start_backend,
)

LIMIT = 4
POLICING = {
    "max_wait": 1.0,
    "concurrency": {"initial_limit": LIMIT, "min_limit": 1, "max_limit": LIMIT,
                    "probe_limit": LIMIT, "probe_samples": 2, "long_after": 0.3},
}


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


@contextlib.asynccontextmanager
async def app_behind_sidecar(tmp_path: Path, waiting: set[str], policing: dict[str, Any],
                             flags: tuple[str, ...] = (),
                             ) -> AsyncIterator[tuple[SidecarProcess, str, asyncio.Event]]:
    """An app whose ``waiting`` paths answer once the event is set, the rest at once, behind
    a real inbound sidecar process: the sidecar, its inbound URL and the event (set, and
    both stopped, on the way out)."""
    answer = asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        if request.path in waiting:
            await answer.wait()
        return web.Response(text=request.path)

    app = await start_backend("app", handler=handle)
    port = free_port()
    try:
        inbound = await async_start_sidecar(
            {}, sidecar_id="app-sidecar",
            config_file=write_config(tmp_path / "policing.json", policing),
            extra_args=["--inbound", f"{LOOPBACK}:{port}", "--app", app.url, *flags])
        try:
            yield inbound, f"http://{LOOPBACK}:{port}", answer
        finally:
            answer.set()
            await async_stop(inbound)
    finally:
        await app.stop()


async def test_long_polls_leave_the_slots_to_quick_requests(tmp_path: Path) -> None:
    polls: list[asyncio.Task[int]] = []
    async with app_behind_sidecar(tmp_path, {"/poll"}, POLICING) as (inbound, url, answer), \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        try:
            async def get(path: str) -> int:
                async with session.get(url + path) as response:
                    await response.read()
                    return response.status

            for _ in range(4):  # the limiter's first probe
                assert await get("/quick") == 200
            # twice the limit of long polls, each followed by a quick request (which
            # overtakes it): a service whose clients watch for changes
            for _ in range(2 * LIMIT):
                polls.append(asyncio.create_task(get("/poll")))
                await asyncio.sleep(0.35)
                assert await get("/quick") == 200
            statuses = [await get("/quick") for _ in range(20)]
            assert statuses == [200] * 20, statuses
            assert not any(poll.done() for poll in polls)  # all still open meanwhile
            async def gauge(name: str, wanted: Callable[[float], bool]) -> float:
                """The metric once it is as wanted (the gauges refresh every 0.5 s)."""
                for _ in range(50):
                    async with session.get(f"{inbound.admin_url}/metrics") as response:
                        value = metric(await response.text(), name)
                    if wanted(value):
                        break
                    await asyncio.sleep(0.1)
                return value

            # at most LIMIT - 1 of the polls still count: the rest were parked as long
            assert await gauge("equilibrium_inbound_long_running",
                               lambda v: v >= LIMIT + 1) >= LIMIT + 1
            assert await gauge("equilibrium_inbound_long_requests_total",
                               lambda v: v >= LIMIT + 1) >= LIMIT + 1
            async with session.get(f"{inbound.admin_url}/debug/state") as response:
                state = await response.json()
            concurrency = state["inbound"]["concurrency"]
            assert concurrency["long_running"] >= LIMIT + 1, concurrency
            assert concurrency["in_flight"] < LIMIT, concurrency
            answer.set()
            assert await asyncio.gather(*polls) == [200] * (2 * LIMIT)
            assert await gauge("equilibrium_inbound_long_running", lambda v: v == 0) == 0
        finally:
            for poll in polls:
                poll.cancel()


@pytest.mark.parametrize("declared_by", ["config-file", "flag"])
async def test_a_storm_of_declared_watches_leaves_the_slots_to_quick_requests(
        tmp_path: Path, declared_by: str) -> None:
    """A stranger's finding: a reconnect storm (more watches at once than the limit, before
    any is overtaken) locked quick requests out until the first watch ended. Watches the
    operator declared (their path, or an event stream) take no slot. The path is declared
    in the config file's ``policing.long_paths`` or, as the injector passes a pod's
    ``equilibrium.io/long-paths`` annotation, by ``--inbound-long-paths``."""
    storm: list[asyncio.Task[int]] = []
    declared: dict[str, Any] = {**POLICING, "long_event_stream": True}
    flags: tuple[str, ...] = ()
    if declared_by == "flag":
        flags = ("--inbound-long-paths", "/v1/other,/watch")
    else:
        declared["long_paths"] = ["/watch"]
    async with app_behind_sidecar(tmp_path, {"/watch/things", "/events"}, declared, flags) as (
            inbound, url, answer), \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        try:
            async def get(path: str, headers: dict[str, str] | None = None) -> int:
                async with session.get(url + path, headers=headers) as response:
                    await response.read()
                    return response.status

            storm = [asyncio.create_task(get("/watch/things")) for _ in range(3 * LIMIT)]
            storm += [asyncio.create_task(get("/events", {"Accept": "text/event-stream"}))
                      for _ in range(LIMIT)]
            await asyncio.sleep(0.5)
            statuses = [await get("/quick") for _ in range(20)]
            assert statuses == [200] * 20, statuses
            assert not any(task.done() for task in storm)
            async with session.get(f"{inbound.admin_url}/debug/state") as response:
                concurrency = (await response.json())["inbound"]["concurrency"]
            assert concurrency["long_running"] == 4 * LIMIT, concurrency
            assert concurrency["long_paths"] == (  # the declaration in force
                ["/v1/other", "/watch"] if declared_by == "flag" else ["/watch"])
            answer.set()
            assert await asyncio.gather(*storm) == [200] * (4 * LIMIT)
        finally:
            for task in storm:
                task.cancel()
