"""HTTP/1.1 trailer fields through a real sidecar process, both ways, on raw sockets.

The app and the endpoint are raw loopback sockets, so the bytes on each side are exactly what
the sidecar wrote: the app's chunked request ends with trailer fields, which reach the
endpoint; the endpoint's chunked answer ends with trailer fields, which reach the app. Fields
that may not ride in a trailer section (RFC 9110 §6.5.1) and game headers are not relayed.
"""

from __future__ import annotations

import asyncio

from tests.integration.procs import LOOPBACK, async_start_sidecar, async_stop


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


async def test_trailers_cross_the_sidecar_both_ways() -> None:
    seen: list[tuple[bytes, bytes, list[str]]] = []

    async def endpoint(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await read_chunked(reader)
                seen.append(request)
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                             b"Trailer: X-Sum\r\n\r\n6\r\nsum is\r\n0\r\nX-Sum: "
                             + request[1]
                             + b"\r\nX-GT-Price: 3\r\nContent-Type: text/plain\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(endpoint, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    sidecar = await async_start_sidecar({"svc": [f"http://{LOOPBACK}:{port}"]})
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.outbound_port)
        for n in range(2):  # twice on one connection: each exchange ends where it should
            writer.write(b"POST /sum HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"3\r\nab%d\r\n0\r\nX-Checksum: %d\r\nX-GT-Bid: 9\r\n\r\n" % (n, n))
            head, body, trailers = await asyncio.wait_for(read_chunked(reader), 10)
            assert head.startswith(b"HTTP/1.1 200") and body == b"sum is"
            assert trailers == [f"X-Sum: ab{n}"]
            assert seen[n][1] == b"ab%d" % n and seen[n][2] == [f"X-Checksum: {n}"]
        writer.close()
        assert sidecar.metric("equilibrium_rejected_headers_total", header="X-GT-Bid",
                              reason="from-app") == 2
        assert sidecar.metric("equilibrium_rejected_headers_total", header="X-GT-Price",
                              reason="in-trailers") == 2
    finally:
        assert await async_stop(sidecar) == 0
        server.close()
