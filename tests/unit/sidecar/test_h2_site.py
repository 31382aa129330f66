"""sidecar.h2_site: telling the HTTP/2 preface from HTTP/1.1 by the first bytes; the drain of
a listener's sockets together."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

from sidecar.exchange import Exchange
from sidecar.h2_site import PREFACE, outbound_site, sniff_preface
from sidecar.metrics import H2Metrics

pytestmark = pytest.mark.http2  # run again on the other engine by make test


def test_the_whole_preface_is_http2() -> None:
    assert sniff_preface(PREFACE) is True
    assert sniff_preface(PREFACE + b"\x00\x00\x12\x04") is True


@pytest.mark.parametrize("cut", [0, 1, 3, 10, 23])
def test_a_prefix_of_the_preface_waits_for_more(cut: int) -> None:
    assert sniff_preface(PREFACE[:cut]) is None


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"POST /x HTTP/1.1\r\n", b"PUT ",
                                  b"PRI * HTTP/1.1\r\n\r\n", b"\x16\x03\x01", b"PATCH /"])
def test_anything_else_is_not(data: bytes) -> None:
    assert sniff_preface(data) is False


async def test_on_stop_every_socket_of_the_listener_stops_accepting_before_the_drain() -> None:
    """A listener's sockets (``0.0.0.0`` and its ``[::]`` twin) share one drain: while the
    first one's request in flight finishes, the twin takes no new connection either."""
    async def handler(exchange: Exchange) -> None:
        await asyncio.sleep(1.0 if exchange.raw_path == "/slow" else 0)
        await exchange.start_response(200, None, CIMultiDict({"Content-Length": "2"}))
        await exchange.write(b"ok")
        await exchange.finish()

    async def get(port: int, path: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        try:
            return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        finally:
            writer.close()

    async def no_h2(stream: object) -> None:
        raise AssertionError("no HTTP/2 here")

    runner = web.AppRunner(web.Application())
    await runner.setup()
    factory = outbound_site(no_h2, H2Metrics(CollectorRegistry()), drain_timeout=3.0,
                            http1=handler)
    first, twin = factory(runner, "127.0.0.1", 0), factory(runner, "127.0.0.1", 0)
    await first.start()
    await twin.start()
    ports = [site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
             for site in (first, twin)]
    slow = asyncio.create_task(get(ports[0], "/slow"))
    await asyncio.sleep(0.1)
    cleanup = asyncio.create_task(runner.cleanup())
    await asyncio.sleep(0.2)  # draining: the slow request is still in flight
    with pytest.raises(ConnectionRefusedError):
        await get(ports[1], "/")
    assert (await slow).startswith(b"HTTP/1.1 200")  # what was in flight finished
    await cleanup
