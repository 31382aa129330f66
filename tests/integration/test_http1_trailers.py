"""HTTP/1.1 trailer fields through real sidecar processes, both ways, on raw sockets.

The caller and the endpoint are raw loopback sockets, so the bytes on each side are exactly
what a sidecar wrote: the caller's chunked request ends with trailer fields, which reach the
endpoint; the endpoint's chunked answer ends with trailer fields, which reach the caller. Once
through one sidecar's outbound listener, once through a caller's sidecar and the endpoint's
inbound sidecar (the mesh path). Fields that may not ride in a trailer section (RFC 9110
§6.5.1) and game headers are not relayed.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from tests.integration.inbound_support import UPSTREAM, mesh, write_config
from tests.integration.procs import (
    LOOPBACK,
    RawEndpoint,
    async_start_sidecar,
    async_stop,
    raw_endpoint,
)


async def read_chunked(reader: asyncio.StreamReader) -> tuple[bytes, bytes, list[str]]:
    """A head, then a chunked body: (head, body, trailer lines)."""
    head = await reader.readuntil(b"\r\n\r\n")
    body = b""
    while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
        body += (await reader.readexactly(size + 2))[:-2]
    trailers = []
    while line := (await reader.readuntil(b"\r\n"))[:-2]:
        trailers.append(line.decode())
    return head, body, trailers


class Endpoint(RawEndpoint):
    """A raw HTTP/1.1 endpoint: reads chunked requests, answers each with a chunked body and
    trailer fields (one to relay, two that must not be)."""

    def __init__(self) -> None:
        self.seen: list[tuple[bytes, bytes, list[str]]] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await read_chunked(reader)
                self.seen.append(request)
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                             b"Trailer: X-Sum\r\n\r\n6\r\nsum is\r\n0\r\nX-Sum: "
                             + request[1]
                             + b"\r\nX-GT-Price: 3\r\nContent-Type: text/plain\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def endpoint() -> contextlib.AbstractAsyncContextManager[Endpoint]:
    return raw_endpoint(Endpoint())


async def exchange_twice(port: int, app: Endpoint) -> None:
    """Two chunked requests with trailers on one connection to ``port``; each exchange ends
    where it should (the second is read right after the first)."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    for n in range(2):
        writer.write(b"POST /sum HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\r\nab%d\r\n0\r\nX-Checksum: %d\r\nX-GT-Bid: 9\r\n\r\n"
                     % (UPSTREAM.encode(), n, n))
        head, body, trailers = await asyncio.wait_for(read_chunked(reader), 10)
        assert head.startswith(b"HTTP/1.1 200") and body == b"sum is"
        assert trailers == [f"X-Sum: ab{n}"]
        assert app.seen[n][1] == b"ab%d" % n and app.seen[n][2] == [f"X-Checksum: {n}"]
    writer.close()


async def test_trailers_cross_the_sidecar_both_ways() -> None:
    async with endpoint() as app:
        sidecar = await async_start_sidecar({UPSTREAM: [app.url]})
        try:
            await exchange_twice(sidecar.outbound_port, app)
            assert sidecar.metric("equilibrium_rejected_headers_total", header="X-GT-Bid",
                                  reason="from-app") == 2
            assert sidecar.metric("equilibrium_rejected_headers_total", header="X-GT-Price",
                                  reason="in-trailers") == 2
        finally:
            assert await async_stop(sidecar) == 0


async def test_trailers_cross_a_caller_sidecar_and_the_inbound_sidecar(tmp_path: Path) -> None:
    async with endpoint() as app, mesh(
        app.url, ["caller"], write_config(tmp_path / "c.json", {})
    ) as m:
        await exchange_twice(m.callers["caller"].outbound_port, app)
        # the app's X-GT-Price never leaves its pod: the inbound side strips it
        assert m.server.metric("equilibrium_inbound_stripped_headers_total",
                               source="from-app") == 2
        assert m.server.metric("equilibrium_inbound_requests_total", caller="caller",
                               outcome="admitted") == 2
        # straight to the inbound listener: a game header in the trailers is not relayed
        reader, writer = await asyncio.open_connection(LOOPBACK, m.inbound_port)
        writer.write(b"POST /sum HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"2\r\nzz\r\n0\r\nX-GT-Bid: 900\r\nX-Rows: 1\r\n\r\n")
        _, body, trailers = await asyncio.wait_for(read_chunked(reader), 10)
        writer.close()
        assert (body, trailers) == (b"sum is", ["X-Sum: zz"])
        assert app.seen[2][1:] == (b"zz", ["X-Rows: 1"])
        assert m.server.metric("equilibrium_inbound_stripped_headers_total",
                               source="in-trailers") == 1
