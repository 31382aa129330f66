"""An endpoint's answer that breaks before any of it reached the app: an error answer, not a cut.

A sidecar writes an answer's head together with its first chunk of body, so when the body
breaks (a malformed first chunk size) or stalls before that first chunk, nothing has gone to
the app yet and it can still be told why: 502 ``upstream-protocol-error`` or 504
``upstream-timeout``, on a connection that stays usable (a stranger's finding: the app got a
cut connection). Once a byte of the body is out, the only honest signal left is the cut.
The endpoint is a raw loopback socket, so the broken bytes are exactly these.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

from tests.integration.inbound_support import UPSTREAM, mesh, write_config
from tests.integration.procs import (
    LOOPBACK,
    RawEndpoint,
    async_start_sidecar,
    async_stop,
    raw_endpoint,
)

ANSWERS = {
    # the head, then a chunk size that is not hexadecimal (and the connection held open)
    b"/bad-first-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n",
    # the head, then nothing of its five bytes
    b"/stall": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
    # one good chunk, then a bad chunk size: the first chunk is the app's already
    b"/bad-second-chunk": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"3\r\nabc\r\nzz\r\n"),
    b"/ok": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
}


class Endpoint(RawEndpoint):
    """Answers each request by its path (:data:`ANSWERS`); keeps a broken answer's
    connection open, as a stuck or buggy server would."""

    def __init__(self) -> None:
        self.paths: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                self.paths.append(path)
                writer.write(ANSWERS[path])
                await writer.drain()
                if path != b"/ok":
                    await reader.read()  # until the sidecar gives up on this connection
                    break
        writer.close()


def endpoint() -> contextlib.AbstractAsyncContextManager[Endpoint]:
    return raw_endpoint(Endpoint())


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One answer framed by its Content-Length: (status, headers, body)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    lines = head.split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if line)
    body = await reader.readexactly(int(headers["Content-Length"]))
    return int(lines[0].split(" ")[1]), headers, body


async def ask(writer: asyncio.StreamWriter, path: str) -> None:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {UPSTREAM}\r\n\r\n".encode())
    await writer.drain()


async def test_a_broken_or_stalled_answer_before_its_body_is_an_error_answer() -> None:
    async with endpoint() as app:
        sidecar = await async_start_sidecar({UPSTREAM: [app.url]},
                                            extra_args=["--request-timeout", "1"])
        try:
            reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.outbound_port)
            await ask(writer, "/bad-first-chunk")
            status, headers, body = await asyncio.wait_for(read_answer(reader), 10)
            assert status == 502 and json.loads(body)["reason"] == "upstream-protocol-error"
            assert "Connection" not in headers  # the app's connection is kept
            await ask(writer, "/stall")
            status, _, body = await asyncio.wait_for(read_answer(reader), 10)
            assert status == 504 and json.loads(body)["reason"] == "upstream-timeout"
            assert "nothing more within the request timeout" in json.loads(body)["error"]
            await ask(writer, "/ok")  # the same connection still serves
            assert (await asyncio.wait_for(read_answer(reader), 10))[::2] == (200, b"ok")
            # once a chunk of the body is out, the connection is cut
            await ask(writer, "/bad-second-chunk")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head
            assert await asyncio.wait_for(reader.readuntil(b"abc\r\n"), 10)
            assert await asyncio.wait_for(reader.read(), 10) == b""  # cut, no last chunk
            writer.close()
            assert app.paths == [b"/bad-first-chunk", b"/stall", b"/ok", b"/bad-second-chunk"]
            # each broken answer is the endpoint's failure, under its own reason
            for reason in ("upstream-protocol-error", "upstream-timeout", "body-relay-failed"):
                assert sidecar.metric("equilibrium_errors_total", upstream=UPSTREAM,
                                      reason=reason) == 1
                assert sidecar.metric("equilibrium_requests_total", upstream=UPSTREAM,
                                      code=reason) == 1
        finally:
            assert await async_stop(sidecar) == 0


async def test_the_inbound_sidecar_answers_502_for_an_app_whose_answer_broke_at_once(
    tmp_path: Path,
) -> None:
    async with endpoint() as app, mesh(
        app.url, ["caller"], write_config(tmp_path / "c.json", {})
    ) as m:
        reader, writer = await asyncio.open_connection(LOOPBACK, m.callers["caller"].outbound_port)
        await ask(writer, "/bad-first-chunk")
        status, _, body = await asyncio.wait_for(read_answer(reader), 10)
        # the inbound sidecar's own answer, relayed by the caller's sidecar as the endpoint's
        assert status == 502
        assert json.loads(body)["reason"] == "upstream-protocol-error"
        assert json.loads(body)["sidecar"] == "app-sidecar"
        await ask(writer, "/ok")
        assert (await asyncio.wait_for(read_answer(reader), 10))[::2] == (200, b"ok")
        writer.close()
        assert m.server.metric("equilibrium_inbound_requests_total", caller="caller",
                               outcome="app-error") == 1
        assert app.paths == [b"/bad-first-chunk", b"/ok"]
