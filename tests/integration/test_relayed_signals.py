"""A server outside the mesh that relays a meshed pod's signed answer cannot make a POST run twice.

A stranger's finding: an endpoint of a caller's upstream that is not a sidecar (here a relay
on 127.0.0.2) runs each request itself, then passes the caller's request, its
``X-GT-Challenge`` and identity included, on to a meshed pod's inbound sidecar whose app is
down, and relays that sidecar's signed refusal (``X-GT-Refused: app-unreachable``, "the app
never saw it") back. The caller's sidecar believed it and sent the POST to its other
endpoint: it ran twice. A signed answer now says where its sidecar was reached (127.0.0.1,
its socket's local address), and the caller compares that with where it sent the request
(the relay, 127.0.0.2): the refusal is not acted on, the app gets the 503 as it came, and no
POST runs twice. Real processes: the caller's and the pod's sidecars, real HTTP servers.
"""

from __future__ import annotations

import contextlib
import secrets
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from equilibrium.lab.processes import free_port
from tests.integration.procs import (
    LOOPBACK,
    async_start_sidecar,
    async_stop,
    dead_endpoint,
    start_backend,
)

RELAY_HOST = "127.0.0.2"  # another address than the sidecars' (a pod of its own)


@contextlib.asynccontextmanager
async def relay(to: str) -> AsyncIterator[tuple[str, Counter[str], list[str]]]:
    """A server on :data:`RELAY_HOST` (its URL) that runs each request (counts its
    ``X-Request-Id``) and answers with what ``to`` answers to the same request, headers and
    all; the ids of the answers that carried a signed refusal are listed."""
    ran: Counter[str] = Counter()
    refused: list[str] = []
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.method == "POST":  # (the caller's sidecar probes its endpoints too)
            ran[request.headers.get("X-Request-Id", "")] += 1
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("content-length", "transfer-encoding", "connection")}
        async with session.request(request.method, to + request.path_qs, headers=headers,
                                   data=await request.read()) as answer:
            body = await answer.read()
            if request.method == "POST" and "X-GT-Refused" in answer.headers \
                    and "X-GT-Signals" in answer.headers:
                refused.append(request.headers.get("X-Request-Id", ""))
            kept = {k: v for k, v in answer.headers.items()
                    if k.lower() not in ("content-length", "transfer-encoding", "connection",
                                         "date", "server")}
            return web.Response(status=answer.status, body=body, headers=kept)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port(RELAY_HOST)
    await web.TCPSite(runner, RELAY_HOST, port).start()
    try:
        yield f"http://{RELAY_HOST}:{port}", ran, refused
    finally:
        await session.close()
        await runner.cleanup()


async def test_a_relayed_refusal_does_not_make_a_post_run_twice() -> None:
    env = {"EQUILIBRIUM_MESH_SECRET": secrets.token_hex(32)}
    inbound_port = free_port()
    pod = await async_start_sidecar(  # a meshed pod whose app is down: signed refusals
        {}, sidecar_id="pod-sidecar", env=env,
        extra_args=["--inbound", f"{LOOPBACK}:{inbound_port}", "--app", dead_endpoint()])
    healthy = await start_backend("healthy")
    caller = None
    try:
        async with relay(f"http://{LOOPBACK}:{inbound_port}") as (relay_url, ran, refused):
            caller = await async_start_sidecar(
                {"payments": [relay_url, healthy.url]}, sidecar_id="client", env=env,
                policy="round-robin")
            statuses: Counter[int] = Counter()
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as app:
                for n in range(12):
                    async with app.post(f"{caller.outbound_url}/pay", data=b"{}",
                                        headers={"Host": "payments",
                                                 "X-Request-Id": f"r{n}"}) as answer:
                        await answer.read()
                        statuses[answer.status] += 1
            at_healthy = Counter(r.headers.get("X-Request-Id", "") for r in healthy.seen
                                 if r.method == "POST")
            twice = sorted(set(ran) & set(at_healthy))
            assert twice == [], f"POSTs run at the relay and again elsewhere: {twice}"
            relayed = sum(ran.values())
            assert relayed >= 4  # round robin: the relay had its share
            assert len(refused) >= 3  # most with the pod's signed refusal (a busy machine
            # may fail the relay's own forwarding now and then: a 500, no refusal)
            assert statuses[200] == 12 - relayed  # each answer of the relay went to the app
            assert statuses[503] >= len(refused)
            assert caller.metric("equilibrium_caller_bad_signals_total",
                                 header="x-gt-signals", reason="elsewhere") == len(refused)
    finally:
        if caller is not None:
            assert await async_stop(caller) == 0
        assert await async_stop(pod) == 0
        await healthy.stop()
