"""The real ``equilibrium sidecar`` process routes by Host and absolute-form, and fails clearly.

Backends are real aiohttp servers on loopback; the sidecar is a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from tests.integration.procs import (
    async_start_sidecar,
    async_stop,
    backends,
    dead_endpoint,
    fetch,
    free_port,
    http_get,
    start_backend,
)
from tests.support import eventually


async def test_host_header_routes_to_the_upstreams_endpoints() -> None:
    async with backends(3, prefix="users") as pods, backends(1, prefix="orders") as others:
        sidecar = await async_start_sidecar(
            {"users": [p.url for p in pods], "orders": [o.url for o in others]}
        )
        try:
            seen: Counter[str] = Counter()
            async with aiohttp.ClientSession() as client:
                for i in range(30):
                    # the port in Host is ignored; the name is case-insensitive
                    host = "Users:8080" if i % 2 else "users"
                    async with client.get(
                        f"{sidecar.outbound_url}/items?page={i}", headers={"Host": host}
                    ) as resp:
                        assert resp.status == 200
                        seen[await resp.text()] += 1
                async with client.get(
                    f"{sidecar.outbound_url}/x", headers={"Host": "orders"}
                ) as resp:
                    assert await resp.text() == "orders-0"
            assert set(seen) == {"users-0", "users-1", "users-2"}
            assert sum(seen.values()) == 30
            assert all(p.seen[-1].path_qs.startswith("/items?page=") for p in pods)
            assert others[0].hits == 1
            assert sidecar.metric("equilibrium_requests_total", upstream="users") == 30
        finally:
            assert await async_stop(sidecar) == 0


async def test_absolute_form_http_proxy_setting_and_debug_state() -> None:
    async with backends(2, prefix="catalog") as pods:
        sidecar = await async_start_sidecar(
            {"catalog": [p.url for p in pods]}, sidecar_id="app-1", strategy="conservative",
            policy="p2c-least-request",
        )
        try:
            async with aiohttp.ClientSession() as client:
                reply = await fetch(
                    client, "GET", URL("http://catalog/books/1?x=%2F", encoded=True),
                    proxy=sidecar.outbound_url,
                )
                assert reply.status == 200 and reply.body.startswith(b"catalog-")

            def via_env_proxy() -> tuple[int, bytes]:
                # urllib honours HTTP_PROXY like most HTTP clients: zero code changes in the app
                handler = urllib.request.ProxyHandler({"http": sidecar.outbound_url})
                with urllib.request.build_opener(handler).open(
                    "http://catalog/books/2", timeout=5
                ) as resp:
                    return resp.status, resp.read()

            status, body = await asyncio.to_thread(via_env_proxy)
            assert status == 200 and body.startswith(b"catalog-")
            targets = [r.raw_path for p in pods for r in p.seen]
            assert sorted(targets) == ["/books/1?x=%2F", "/books/2"]
            assert all(r.headers["Host"] == "catalog" for p in pods for r in p.seen)

            state = sidecar.state()
            assert set(state) == {"id", "strategy", "policy", "draining", "upstreams", "inbound"}
            assert state["inbound"] is None  # no --inbound listener
            assert (state["id"], state["strategy"], state["policy"], state["draining"]) == (
                "app-1", "conservative", "p2c-least-request", False,
            )
            upstream = state["upstreams"]["catalog"]
            assert upstream["policy"] == "p2c-least-request"
            assert upstream["following"] is False
            assert isinstance(upstream["converged"], bool)
            assert {e["endpoint"] for e in upstream["endpoints"]} == {p.url for p in pods}
            for ep in upstream["endpoints"]:
                assert set(ep) == {"endpoint", "weight", "latency_estimate", "regret",
                                   "in_flight", "requests", "failures", "overruled", "bad",
                                   "usable", "stalled", "long_in_flight"}
                assert ep["usable"] is True and ep["overruled"] is False and ep["stalled"] == 0
                assert ep["bad"] is False
            assert abs(sum(e["weight"] for e in upstream["endpoints"]) - 1.0) < 1e-6
        finally:
            await async_stop(sidecar)


async def test_unknown_upstream_and_dead_or_missing_endpoints_answer_json() -> None:
    outbound = free_port()
    loop_url = f"http://127.0.0.1:{outbound}"  # an endpoint that is the sidecar itself
    sidecar = await async_start_sidecar(
        {"down": [dead_endpoint(), dead_endpoint()], "empty": [], "loop": [loop_url]},
        outbound_port=outbound,
        extra_args=["--connect-timeout", "0.5"],
    )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
            cases = {"nowhere": (404, "unknown-upstream"), "down": (502, "connect-error"),
                     "empty": (503, "no-endpoint"), "loop": (508, "loop-detected")}
            for host, (status, reason) in cases.items():
                async with client.get(f"{sidecar.outbound_url}/", headers={"Host": host}) as resp:
                    assert resp.status == status
                    body = json.loads(await resp.read())
                    assert body["reason"] == reason and body["upstream"] == host
                    assert body["error"]
            # the dead upstream's GET was retried on the other endpoint before giving up
            assert sidecar.metric("equilibrium_retries_total", upstream="down") == 1
            for host, (_, reason) in cases.items():
                # an error before an upstream was found is labelled "": a made-up Host must
                # not become a series of its own
                label = "" if reason in ("unknown-upstream", "loop-detected") else host
                assert sidecar.metric("equilibrium_errors_total", upstream=label,
                                      reason=reason) == 1
    finally:
        await async_stop(sidecar)


async def broken_bodies(request: web.Request) -> web.StreamResponse:
    """/truncated: promises 1 MB, dies after 64 KiB. /large: 64 MB for a reader that stalls.

    /upload: counts the bytes of the request body.
    """
    if request.path == "/upload":
        return web.Response(text=str(len(await request.read())))
    resp = web.StreamResponse()
    if request.path == "/truncated":
        resp.content_length = 1024 * 1024
        await resp.prepare(request)
        await resp.write(b"t" * 65536)
        assert request.transport is not None
        request.transport.abort()
        return resp
    resp.content_length = 64 * 1024 * 1024
    await resp.prepare(request)
    with contextlib.suppress(ConnectionError):
        for _ in range(1024):
            await resp.write(b"l" * 65536)
    return resp


async def test_timeouts_and_failed_bodies_never_hang() -> None:
    backend = await start_backend("bodies", handler=broken_bodies)
    slow = await start_backend("slow", latency=5.0)
    sidecar = await async_start_sidecar(
        {"svc": [backend.url], "slow": [slow.url]}, extra_args=["--request-timeout", "0.5"]
    )
    metric = "equilibrium_errors_total"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as client:
            reply = await fetch(client, "GET", f"{sidecar.outbound_url}/", headers={"Host": "slow"})
            assert reply.status == 504 and reply.json()["reason"] == "upstream-timeout"
            assert slow.hits == 1  # a timeout may have reached the app: it is not retried
            assert sidecar.metric(metric, upstream="slow", reason="upstream-timeout") == 1

            async def trickle() -> AsyncIterator[bytes]:
                for _ in range(8):  # 8 x 0.2 s: longer than the timeout, but always moving
                    await asyncio.sleep(0.2)
                    yield b"u" * 1000

            reply = await fetch(
                client, "POST", f"{sidecar.outbound_url}/upload", headers={"Host": "svc"},
                data=trickle(),
            )
            assert (reply.status, reply.body) == (200, b"8000")

            # an upstream that dies mid-body: the app sees a truncated body, not a short 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await fetch(client, "GET", f"{sidecar.outbound_url}/truncated",
                            headers={"Host": "svc"})
            # an app that stops reading: the sidecar gives up on it after the idle timeout,
            # and says whose doing it was
            async with client.get(f"{sidecar.outbound_url}/large", headers={"Host": "svc"}) as r:
                assert r.status == 200
                for _ in range(100):
                    if sidecar.metric(metric, reason="app-stalled") >= 1:
                        break
                    await asyncio.sleep(0.1)
        assert sidecar.metric(metric, upstream="svc", reason="body-relay-failed") == 1
        assert sidecar.metric(metric, upstream="svc", reason="app-stalled") == 1
        # the cut answer is the endpoint's failure, not a 200 (the upload's and the stalled
        # reader's answers are; a stranger's finding)
        requests = "equilibrium_requests_total"
        assert sidecar.metric(requests, upstream="svc", code="body-relay-failed") == 1
        await eventually(lambda: sidecar.metric(requests, upstream="svc", code="200") == 2,
                         "the stalled reader's answer is counted once its relay ends")
        health = await asyncio.to_thread(http_get, f"{sidecar.admin_url}/healthz")
        assert health[0] == 200
    finally:
        assert await async_stop(sidecar) == 0
        await backend.stop()
        await slow.stop()


async def test_an_endpoint_cutting_its_answers_short_is_charged_for_them() -> None:
    # A stranger's finding: an answer the endpoint cut mid-body was counted as a 200 and
    # learned as a success, so a pod that breaks every answer kept its share for good. Its
    # outcome is now taken once the body is through: a failure, charged as one.
    async def cutting(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 4096
        await resp.prepare(request)
        await resp.write(b"c" * 100)
        assert request.transport is not None
        request.transport.abort()
        return resp

    good = await start_backend("good")
    cut = await start_backend("cut", handler=cutting)
    sidecar = await async_start_sidecar({"svc": [good.url, cut.url]})
    try:
        broken = [0, 0]  # in the first 40 requests, in the last 40
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as client:
            for i in range(80):  # over 4 s: the policy learns at its ticks (1 s)
                await asyncio.sleep(0.05)
                try:
                    reply = await fetch(client, "GET", f"{sidecar.outbound_url}/{i}",
                                        headers={"Host": "svc"})
                    assert reply.status == 200 and reply.body == b"good"
                except aiohttp.ClientPayloadError:
                    broken[i >= 40] += 1
        assert sum(broken) == cut.hits  # never re-sent: its head was relayed already
        assert good.hits == 80 - sum(broken)
        # counted as the endpoint's failures (ejected after five in a row, or weighed down
        # by their penalty), the pod that breaks its answers is left; the code before counted
        # them as 200s and kept sending it half of all requests (37 of 80)
        assert broken[1] <= 4, broken
        requests = "equilibrium_requests_total"
        assert sidecar.metric(requests, endpoint=cut.url, code="body-relay-failed") == cut.hits
        assert sidecar.metric(requests, endpoint=cut.url, code="200") == 0
    finally:
        assert await async_stop(sidecar) == 0
        await good.stop()
        await cut.stop()
