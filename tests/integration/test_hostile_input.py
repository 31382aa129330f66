"""Hostile numbers and request targets against real sidecar processes (issue 14, #11).

An upstream that answers ``level=²`` (``'²'.isdigit()`` is true, ``int('²')`` raises) or a
5,000-digit retry, and a client that sends an absolute-form target to the inbound listener:
each must get a clear answer and a metric, never a 500 or a traceback.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

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

pytestmark = pytest.mark.asyncio(loop_scope="module")

HOSTILE_STANDINGS = {
    "/superscript": "v=1;score=1;level=\u00b2;phase=good",
    "/arabic-indic": "v=1;score=1;level=\u0663;phase=punished;retry=\u0663",
    "/huge": "v=1;score=1;level=0;phase=punished;retry=" + "9" * 5_000,
}


UNDERSCORED = {"X_GT_Identity": "v=1;id=root;ts=1;sig=x", "X-GT_Price": "0",
               "x_gt_reputation": "v=1;score=0;level=9;phase=punished;retry=300",
               "X-Gt_Congestion": "v=1;level=1"}


def game_like(names: object) -> list[str]:
    """Header names a CGI/WSGI app would read as ``X-GT-*``."""
    return [n for n in names  # type: ignore[attr-defined]
            if str(n).replace("_", "-").lower().startswith("x-gt-")]


@dataclass
class Setup:
    upstream: Backend
    app: Backend
    caller: SidecarProcess
    inbound: SidecarProcess
    inbound_port: int


async def hostile_upstream(request: web.Request) -> web.Response:
    return web.Response(text="body", headers={
        "X-GT-Reputation": HOSTILE_STANDINGS.get(request.path, "v=1;score=1;level=0;phase=good"),
        "X-GT-Price": "\u0663",
        **(UNDERSCORED if request.path == "/underscored" else {}),
    })


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def setup() -> AsyncIterator[Setup]:
    upstream = await start_backend("hostile", handler=hostile_upstream)
    app = await start_backend("app")
    inbound_port = free_port()
    procs = await asyncio.gather(
        async_start_sidecar({"svc": [upstream.url]}, sidecar_id="caller",
                            env={"EQUILIBRIUM_MESH_SECRET": MESH_KEY}),
        async_start_sidecar({}, sidecar_id="app-sidecar",
                            env={"EQUILIBRIUM_MESH_SECRET": MESH_KEY},
                            extra_args=["--inbound", f"{LOOPBACK}:{inbound_port}",
                                        "--app", app.url]),
    )
    try:
        yield Setup(upstream, app, *procs, inbound_port)
    finally:
        await asyncio.gather(*(asyncio.to_thread(p.stop, 5.0) for p in procs))
        for p in procs:
            p.cleanup()
        await app.stop()
        await upstream.stop()


@pytest.mark.parametrize("path", sorted(HOSTILE_STANDINGS))
async def test_non_ascii_or_huge_numbers_from_an_upstream_are_ignored_and_counted(
        setup: Setup, path: str) -> None:
    """An upstream without the mesh key cannot sign its answer (wire.signals): its hostile
    standings are dropped unread, counted as unsigned, and never believed."""
    before = metric_value(setup.caller.metrics_text(), "equilibrium_caller_bad_signals_total",
                          header="x-gt-signals", reason="unsigned")
    async with aiohttp.ClientSession() as client:
        for _ in range(2):  # a second request is not backed off: the signal was not believed
            async with client.get(setup.caller.outbound_url + path,
                                  headers={"Host": "svc"}) as resp:
                assert resp.status == 200, await resp.text()
                assert await resp.text() == "body"
                assert "X-Equilibrium-Price" not in resp.headers
    text = setup.caller.metrics_text()
    assert metric_value(text, "equilibrium_caller_bad_signals_total",
                        header="x-gt-signals", reason="unsigned") == before + 2
    assert metric_value(text, "equilibrium_caller_punished", upstream="svc") == 0
    assert "Traceback" not in setup.caller.output()


async def raw_get(port: int, target: bytes, host: bytes) -> tuple[bytes, bytes]:
    """``GET target`` as written, on a connection of its own: the answer's head and body."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n"
                     b"Connection: close\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


@pytest.mark.parametrize("target", [b"http://example.com/x", b"https://[::1]:8080/admin?x=1"])
async def test_a_target_that_is_not_a_path_gets_400_on_the_inbound_listener(
        setup: Setup, target: bytes) -> None:
    head, body = await raw_get(setup.inbound_port, target, b"app")
    assert head.startswith(b"HTTP/1.1 400"), head[:200]
    assert b'"bad-target"' in body
    assert setup.app.hits == 0
    assert metric_value(setup.inbound.metrics_text(), "equilibrium_inbound_requests_total",
                        outcome="bad-target") >= 1
    assert "Traceback" not in setup.inbound.output()


@pytest.mark.parametrize("target", [b"https://svc/abs", b"HTTPS://svc:443/abs", b"ftp://svc/x"])
async def test_an_absolute_target_of_another_scheme_gets_400_on_the_outbound_listener(
        setup: Setup, target: bytes) -> None:
    """A stranger's finding: ``GET https://svc/abs`` went to the endpoint in plain text (the
    scheme was dropped). The sidecar originates no TLS: refused, and the pod sees nothing."""
    before = setup.upstream.app_hits
    head, body = await raw_get(setup.caller.outbound_port, target, b"svc")
    assert head.startswith(b"HTTP/1.1 400"), head[:200]
    assert b'"bad-target"' in body and b"not originate TLS" in body, body
    assert setup.upstream.app_hits == before
    # a path whose query holds such a URL is a path
    head, _ = await raw_get(setup.caller.outbound_port, b"/x?u=https://a.example/", b"svc")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    assert setup.upstream.app_hits == before + 1


async def test_underscore_game_headers_are_stripped_in_both_directions(setup: Setup) -> None:
    """``X_GT_Identity`` and ``X-GT_Price`` reach a WSGI app as ``HTTP_X_GT_*``: the app's
    request must not carry them to the upstream, the upstream's answer must not carry them
    to the app, and a punishment spelled with underscores is not believed."""
    async with aiohttp.ClientSession() as client, client.get(
            setup.caller.outbound_url + "/underscored",
            headers={"Host": "svc", **UNDERSCORED}) as resp:
        assert resp.status == 200
        assert game_like(resp.headers) == []
    sent = setup.upstream.seen[-1].headers  # the sidecar's own X-GT-* only, one identity
    assert [n for n in game_like(sent) if "_" in n] == []
    assert sent.getall("X-GT-Identity")[0].startswith("v=2;id=caller;")
    assert metric_value(setup.caller.metrics_text(), "equilibrium_caller_punished",
                        upstream="svc") == 0

    setup.app.seen.clear()
    async with aiohttp.ClientSession() as client, client.get(
            f"http://{LOOPBACK}:{setup.inbound_port}/app", headers=UNDERSCORED) as resp:
        assert resp.status == 200
    assert len(setup.app.seen) == 1 and game_like(setup.app.seen[0].headers) == []
