"""Retries: never a POST, GET on another endpoint after a reset, within the attempt limit."""

from __future__ import annotations

import aiohttp

from tests.integration.procs import (
    ResetServer,
    async_start_sidecar,
    async_stop,
    fetch,
    start_backend,
)


async def test_post_is_never_replayed_after_a_connection_reset() -> None:
    broken = await ResetServer().start()
    healthy = await start_backend("healthy")
    # round-robin makes the resetting endpoint certain to be picked for some of the POSTs
    sidecar = await async_start_sidecar(
        {"svc": [broken.url, healthy.url]}, policy="round-robin"
    )
    try:
        statuses = []
        async with aiohttp.ClientSession() as client:
            for i in range(6):
                reply = await fetch(
                    client, "POST", f"{sidecar.outbound_url}/orders",
                    headers={"Host": "svc"}, data=f"order-{i}".encode(),
                )
                statuses.append(reply.status)
                if reply.status == 502:
                    assert reply.json()["reason"] == "upstream-reset"
        posts_seen = broken.methods["POST"] + healthy.methods["POST"]
        assert broken.methods["POST"] >= 1
        assert posts_seen == 6  # each POST reached exactly one endpoint once
        assert statuses.count(502) == broken.methods["POST"]
        assert statuses.count(200) == healthy.methods["POST"]
        assert sidecar.metric("equilibrium_retries_total", upstream="svc") == 0
    finally:
        await async_stop(sidecar)
        await broken.stop()
        await healthy.stop()


async def test_get_is_retried_on_another_endpoint_after_a_reset() -> None:
    broken = await ResetServer().start()
    healthy = await start_backend("healthy")
    sidecar = await async_start_sidecar(
        {"svc": [broken.url, healthy.url]}, policy="round-robin"
    )
    try:
        async with aiohttp.ClientSession() as client:
            for _ in range(6):
                reply = await fetch(
                    client, "GET", f"{sidecar.outbound_url}/items", headers={"Host": "svc"}
                )
                assert reply.status == 200 and reply.body == b"healthy"
        resets = broken.methods["GET"]
        assert resets >= 1
        assert healthy.methods["GET"] == 6
        retried = [r for r in healthy.seen if "X-GT-Retry" in r.headers]
        assert len(retried) == resets
        assert all(r.headers["X-GT-Retry"] == "1" for r in retried)
        assert sidecar.metric("equilibrium_retries_total", upstream="svc") == resets
    finally:
        await async_stop(sidecar)
        await broken.stop()
        await healthy.stop()


async def test_attempts_are_bounded_and_each_endpoint_tried_once() -> None:
    resets = [await ResetServer().start() for _ in range(4)]
    sidecar = await async_start_sidecar(
        {"svc": [r.url for r in resets]}, extra_args=["--max-attempts", "3"]
    )
    try:
        async with aiohttp.ClientSession() as client:
            reply = await fetch(client, "GET", f"{sidecar.outbound_url}/", headers={"Host": "svc"})
        assert reply.status == 502
        assert reply.json()["reason"] == "upstream-reset"
        per_endpoint = [r.methods["GET"] for r in resets]
        assert sum(per_endpoint) == 3 and max(per_endpoint) == 1
    finally:
        await async_stop(sidecar)
        for r in resets:
            await r.stop()
