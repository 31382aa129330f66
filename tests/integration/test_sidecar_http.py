"""HTTP/1.1 correctness of the real sidecar: headers, bodies, WebSocket, game headers.

One sidecar process and one backend serve every test of this module (a module-scoped
fixture on a module-scoped event loop); tests compare counters before and after.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from multidict import CIMultiDict

from tests.integration.procs import (
    Backend,
    SidecarProcess,
    async_start_sidecar,
    async_stop,
    fetch,
    rss_bytes,
    start_backend,
)
from wire.headers import format_congestion

pytestmark = pytest.mark.asyncio(loop_scope="module")

MB = 1024 * 1024
PAYLOAD = b"0123456789abcdef" * 4096  # 64 KiB


async def handler(request: web.Request) -> web.StreamResponse:
    """The backend's routes for this module."""
    path = request.path
    if path == "/echo":
        body = await request.read()
        return web.json_response(
            {
                "headers": [[k, v] for k, v in request.headers.items()],
                "body_len": len(body),
                "chunked": "chunked" in request.headers.get("Transfer-Encoding", ""),
            }
        )
    if path == "/upload":
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
        return web.json_response({"bytes": total})
    if path == "/download":
        size = int(request.query["bytes"])
        resp = web.StreamResponse()
        if request.query.get("length"):
            resp.content_length = size
        await resp.prepare(request)
        sent = 0
        while sent < size:
            part = PAYLOAD[: size - sent]
            await resp.write(part)
            sent += len(part)
        await resp.write_eof()
        return resp
    if path == "/no-content":
        return web.Response(status=204, headers={"X-Kept": "yes"})
    if path == "/not-modified":
        return web.Response(status=304, headers={"ETag": '"v1"'})
    if path == "/resource":
        return web.Response(body=b"x" * 1234, headers={"ETag": '"v1"'})
    if path == "/gzip":
        return web.Response(
            body=gzip.compress(b"hello " * 100),
            headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"},
        )
    if path == "/hop":
        return web.Response(
            body=b"hop",
            headers={
                "Connection": "X-Private",
                "X-Private": "secret",
                "Keep-Alive": "timeout=5",
                "Proxy-Connection": "keep-alive",
                "X-End-To-End": "kept",
            },
        )
    if path == "/game":
        return web.Response(
            body=b"game",
            headers={
                "X-GT-Congestion": request.query["congestion"],
                "X-GT-Price": "3",
                "X-Other": "kept",
            },
        )
    if path == "/ws":
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"echo:{msg.data}")
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws
    return web.Response(status=404)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def proxied() -> AsyncIterator[tuple[SidecarProcess, Backend]]:
    backend = await start_backend("app", handler=handler)
    sidecar = await async_start_sidecar({"svc": [backend.url]}, sidecar_id="sc-http")
    try:
        yield sidecar, backend
    finally:
        assert await async_stop(sidecar) == 0
        await backend.stop()


async def test_hop_by_hop_removed_via_and_forwarded_added_end_to_end_kept(
    proxied: tuple[SidecarProcess, Backend],
) -> None:
    sidecar, _ = proxied
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    headers = [
        ("Host", "svc"),
        ("Connection", "keep-alive, X-Drop-Me"),
        ("X-Drop-Me", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Upgrade", "something"),
        ("traceparent", trace),
        ("tracestate", "congo=t61rcWkgMzE"),
        ("X-Multi", "a"),
        ("X-Multi", "b"),
        ("X-Forwarded-For", "10.1.1.1"),
        ("Via", "1.1 edge"),
    ]
    async with aiohttp.ClientSession() as client:
        reply = await fetch(
            client, "GET", f"{sidecar.outbound_url}/echo", headers=CIMultiDict(headers)
        )
        assert reply.status == 200
        seen = reply.json()["headers"]
        names = [k.lower() for k, _ in seen]
        values = {k.lower(): v for k, v in seen}
        for hop in ("x-drop-me", "keep-alive", "proxy-connection", "te", "upgrade"):
            assert hop not in names
        assert values["traceparent"] == trace
        assert values["tracestate"] == "congo=t61rcWkgMzE"
        assert [v for k, v in seen if k.lower() == "x-multi"] == ["a", "b"]
        assert values["via"] == "1.1 edge, 1.1 sc-http"
        assert values["x-forwarded-for"] == "10.1.1.1, 127.0.0.1"
        assert values["x-forwarded-proto"] == "http"
        assert values["host"] == "svc"

        reply = await fetch(client, "GET", f"{sidecar.outbound_url}/hop", headers={"Host": "svc"})
        assert reply.body == b"hop"
        assert "X-Private" not in reply.headers and "Keep-Alive" not in reply.headers
        assert "Proxy-Connection" not in reply.headers
        assert reply.headers["X-End-To-End"] == "kept"
        assert reply.headers["Via"] == "1.1 sc-http"


async def test_head_204_304_have_no_body_and_keep_the_connection_usable(
    proxied: tuple[SidecarProcess, Backend],
) -> None:
    sidecar, _ = proxied
    host = {"Host": "svc"}
    # one connection for all: a stray body would corrupt the next response on it
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as client:
        head = await fetch(client, "HEAD", f"{sidecar.outbound_url}/resource", headers=host)
        assert head.status == 200 and head.body == b""
        assert head.headers["Content-Length"] == "1234" and head.headers["ETag"] == '"v1"'
        empty = await fetch(client, "GET", f"{sidecar.outbound_url}/no-content", headers=host)
        assert empty.status == 204 and empty.body == b"" and empty.headers["X-Kept"] == "yes"
        assert "Transfer-Encoding" not in empty.headers
        cached = await fetch(
            client, "GET", f"{sidecar.outbound_url}/not-modified",
            headers={**host, "If-None-Match": '"v1"'},
        )
        assert cached.status == 304 and cached.body == b"" and cached.headers["ETag"] == '"v1"'
        full = await fetch(client, "GET", f"{sidecar.outbound_url}/resource", headers=host)
        assert full.status == 200 and full.body == b"x" * 1234


async def test_chunked_both_ways_and_content_encoding_untouched(
    proxied: tuple[SidecarProcess, Backend],
) -> None:
    sidecar, _ = proxied

    async def parts() -> AsyncIterator[bytes]:
        for i in range(50):
            yield bytes([65 + i % 26]) * 1000

    async with aiohttp.ClientSession(auto_decompress=False) as client:
        up = await fetch(
            client, "POST", f"{sidecar.outbound_url}/echo", headers={"Host": "svc"}, data=parts()
        )
        assert up.json()["body_len"] == 50_000 and up.json()["chunked"] is True
        fixed = await fetch(
            client, "PUT", f"{sidecar.outbound_url}/echo", headers={"Host": "svc"}, data=b"z" * 777
        )
        sent = {k.lower(): v for k, v in fixed.json()["headers"]}
        assert sent["content-length"] == "777" and "transfer-encoding" not in sent

        down = await fetch(
            client, "GET", f"{sidecar.outbound_url}/download?bytes=300000", headers={"Host": "svc"}
        )
        assert down.headers["Transfer-Encoding"] == "chunked" and len(down.body) == 300_000
        sized = await fetch(
            client, "GET", f"{sidecar.outbound_url}/download?bytes=5000&length=1",
            headers={"Host": "svc"},
        )
        assert sized.headers["Content-Length"] == "5000" and len(sized.body) == 5000

        zipped = await fetch(client, "GET", f"{sidecar.outbound_url}/gzip", headers={"Host": "svc"})
        assert zipped.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(zipped.body) == b"hello " * 100


async def test_game_headers_never_cross_and_bad_values_are_counted(
    proxied: tuple[SidecarProcess, Backend],
) -> None:
    sidecar, backend = proxied
    hits_before = backend.hits
    from_app = sidecar.metric(
        "equilibrium_rejected_headers_total", header="X-GT-Bid", reason="from-app"
    )
    unsigned = sidecar.metric(  # a plain backend cannot sign its signals (wire.signals)
        "equilibrium_caller_bad_signals_total", header="x-gt-signals", reason="unsigned"
    )
    async with aiohttp.ClientSession() as client:
        forged = {"Host": "svc", "X-GT-Bid": "v=1;amount=99", "x-gt-probe": "forged"}
        reply = await fetch(client, "GET", f"{sidecar.outbound_url}/echo", headers=forged)
        sent = {k.lower(): v for k, v in reply.json()["headers"]}
        assert "x-gt-bid" not in sent
        assert "x-gt-probe" not in sent and "x-gt-regret" not in sent  # X-GT-Regret is gone

        for congestion in ("not-a-level", format_congestion(0.4)):
            reply = await fetch(
                client, "GET", f"{sidecar.outbound_url}/game",
                params={"congestion": congestion}, headers={"Host": "svc"},
            )
            assert reply.status == 200 and reply.body == b"game"
            assert not [k for k in reply.headers if k.lower().startswith("x-gt-")]
            assert reply.headers["X-Other"] == "kept"
    assert sidecar.metric(
        "equilibrium_rejected_headers_total", header="X-GT-Bid", reason="from-app"
    ) == from_app + 1
    assert sidecar.metric(
        "equilibrium_caller_bad_signals_total", header="x-gt-signals", reason="unsigned"
    ) == unsigned + 2  # dropped unread, the malformed one and the well-formed one
    assert backend.hits == hits_before + 3


async def test_websocket_echo_through_the_proxy(proxied: tuple[SidecarProcess, Backend]) -> None:
    sidecar, _ = proxied
    upgrades = sidecar.metric("equilibrium_requests_total", upstream="svc", code="101")
    async with (
        aiohttp.ClientSession() as client,
        client.ws_connect(f"{sidecar.outbound_url}/ws", headers={"Host": "svc"}) as ws,
    ):
        await ws.send_str("hello")
        assert (await ws.receive(timeout=5)).data == "echo:hello"
        await ws.send_bytes(b"\x01\x02\x03")
        assert (await ws.receive(timeout=5)).data == b"\x03\x02\x01"
        await ws.close()
    assert sidecar.metric(
        "equilibrium_requests_total", upstream="svc", code="101"
    ) == upgrades + 1


async def test_100_mb_bodies_stream_with_bounded_memory(
    proxied: tuple[SidecarProcess, Backend],
) -> None:
    sidecar, _ = proxied
    size = 100 * MB
    baseline = rss_bytes(sidecar.pid, peak=True)  # the peak so far, before the big bodies

    async def generated() -> AsyncIterator[bytes]:
        for _ in range(size // len(PAYLOAD)):
            yield PAYLOAD

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as client:
        up = await fetch(
            client, "POST", f"{sidecar.outbound_url}/upload", headers={"Host": "svc"},
            data=generated(),
        )
        assert json.loads(up.body) == {"bytes": size}
        received = 0
        async with client.get(
            f"{sidecar.outbound_url}/download", params={"bytes": str(size), "length": "1"},
            headers={"Host": "svc"},
        ) as resp:
            async for chunk in resp.content.iter_any():
                received += len(chunk)
        assert received == size
    peak = rss_bytes(sidecar.pid, peak=True)
    # 200 MB went through; the sidecar's peak memory grew by a small fraction of one body
    print(f"sidecar RSS before {baseline / MB:.1f} MB, peak after 2x100 MB {peak / MB:.1f} MB")
    assert peak - baseline < 25 * MB, (baseline, peak)
