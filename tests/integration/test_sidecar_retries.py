"""Retries: never a POST re-sent, GET on another endpoint after a reset, within the attempt
limit; a POST that could not connect goes elsewhere (nothing of it left the sidecar).

One sidecar serves the module (module-scoped loop and fixture): upstream ``svc`` has an
endpoint that resets every connection and a healthy one, routed round-robin so the resetting
endpoint is certain to be picked; upstream ``broken`` has four resetting endpoints; upstream
``gone`` a port nobody listens on and the healthy one. Tests compare counters before and
after.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
import pytest_asyncio

from tests.integration.procs import (
    Backend,
    ResetServer,
    SidecarProcess,
    async_start_sidecar,
    async_stop,
    dead_endpoint,
    fetch,
    start_backend,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")


@dataclass
class Mesh:
    sidecar: SidecarProcess
    resetting: ResetServer
    healthy: Backend
    broken: list[ResetServer]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def mesh() -> AsyncIterator[Mesh]:
    resetting = await ResetServer().start()
    healthy = await start_backend("healthy")
    broken = [await ResetServer().start() for _ in range(4)]
    sidecar = await async_start_sidecar(
        {"svc": [resetting.url, healthy.url], "broken": [r.url for r in broken],
         "gone": [dead_endpoint(), healthy.url]},
        policy="round-robin",
        extra_args=["--max-attempts", "3"],
    )
    try:
        yield Mesh(sidecar, resetting, healthy, broken)
    finally:
        await async_stop(sidecar)
        for server in (resetting, *broken):
            await server.stop()
        await healthy.stop()


async def test_post_is_never_replayed_after_a_connection_reset(mesh: Mesh) -> None:
    resets_before = mesh.resetting.methods["POST"]
    served_before = mesh.healthy.methods["POST"]
    retries_before = mesh.sidecar.metric("equilibrium_retries_total", upstream="svc")
    statuses = []
    async with aiohttp.ClientSession() as client:
        for i in range(6):
            reply = await fetch(
                client, "POST", f"{mesh.sidecar.outbound_url}/orders",
                headers={"Host": "svc"}, data=f"order-{i}".encode(),
            )
            statuses.append(reply.status)
            if reply.status == 502:
                assert reply.json()["reason"] == "upstream-reset"
    resets = mesh.resetting.methods["POST"] - resets_before
    served = mesh.healthy.methods["POST"] - served_before
    assert resets >= 1
    assert resets + served == 6  # each POST reached exactly one endpoint, once
    assert statuses.count(502) == resets and statuses.count(200) == served
    assert mesh.sidecar.metric("equilibrium_retries_total", upstream="svc") == retries_before


async def test_get_is_retried_on_another_endpoint_after_a_reset(mesh: Mesh) -> None:
    resets_before = mesh.resetting.methods["GET"]
    seen_before = len(mesh.healthy.seen)
    retries_before = mesh.sidecar.metric("equilibrium_retries_total", upstream="svc")
    async with aiohttp.ClientSession() as client:
        for _ in range(6):
            reply = await fetch(
                client, "GET", f"{mesh.sidecar.outbound_url}/items", headers={"Host": "svc"}
            )
            assert reply.status == 200 and reply.body == b"healthy"
    resets = mesh.resetting.methods["GET"] - resets_before
    assert resets >= 1
    served = mesh.healthy.seen[seen_before:]
    assert len(served) == 6
    retried = [r for r in served if "X-GT-Retry" in r.headers]
    assert len(retried) == resets
    assert all(r.headers["X-GT-Retry"] == "1" for r in retried)
    assert mesh.sidecar.metric("equilibrium_retries_total", upstream="svc") == (
        retries_before + resets
    )


async def test_attempts_are_bounded_and_each_endpoint_tried_once(mesh: Mesh) -> None:
    before = [r.methods["GET"] for r in mesh.broken]
    async with aiohttp.ClientSession() as client:
        reply = await fetch(
            client, "GET", f"{mesh.sidecar.outbound_url}/", headers={"Host": "broken"}
        )
    assert reply.status == 502
    assert reply.json()["reason"] == "upstream-reset"
    per_endpoint = [r.methods["GET"] - b for r, b in zip(mesh.broken, before, strict=True)]
    assert sum(per_endpoint) == 3 and max(per_endpoint) == 1


async def test_a_post_that_could_not_connect_goes_to_another_endpoint_once(mesh: Mesh) -> None:
    # Connection refused: nothing of the request left the sidecar, not a byte of its body
    # was read, so it goes to the other endpoint (no X-GT-Retry: it is no re-send), and each
    # body reaches the healthy pod exactly once.
    seen_before = len(mesh.healthy.seen)
    retries_before = mesh.sidecar.metric("equilibrium_retries_total", upstream="gone")
    async with aiohttp.ClientSession() as client:
        for i in range(6):
            reply = await fetch(
                client, "POST", f"{mesh.sidecar.outbound_url}/orders",
                headers={"Host": "gone"}, data=f"order-{i}".encode(),
            )
            assert reply.status == 200 and reply.body == b"healthy"
    served = mesh.healthy.seen[seen_before:]
    assert [r.method for r in served] == ["POST"] * 6
    assert not any("X-GT-Retry" in r.headers for r in served)
    refused = mesh.sidecar.metric("equilibrium_requests_total", upstream="gone",
                                  code="connect-error")
    assert refused >= 1  # round-robin: the dead port was picked
    assert mesh.sidecar.metric("equilibrium_retries_total", upstream="gone") == (
        retries_before + refused)
