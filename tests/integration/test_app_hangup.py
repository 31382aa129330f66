"""An app that hangs up mid-response, through a real sidecar to a real backend: the app's doing,
counted as ``app-hung-up``, never as the endpoint's failure, and the upstream connection (the
rest of the body drained) serves the next request. At an inbound sidecar, an answer that
stalls is told apart by whose side stalled: a caller that stops reading (``caller-stalled``)
or an app that goes silent (``app-error``)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.integration.inbound_support import write_config
from tests.integration.procs import (
    LOOPBACK,
    async_start_sidecar,
    async_stop,
    free_port,
    start_backend,
)
from tests.support import eventually

CHUNK = 8192
CHUNKS = 20


async def test_an_app_hanging_up_mid_body_is_not_the_endpoints_failure() -> None:
    peers: list[int] = []
    streamed = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        if request.path != "/stream":
            return web.Response(text="small")
        resp = web.StreamResponse(headers={"Content-Length": str(CHUNK * CHUNKS)})
        await resp.prepare(request)
        for _ in range(CHUNKS):  # 20 × 20 ms: the app is gone long before the end
            await resp.write(b"s" * CHUNK)
            await asyncio.sleep(0.02)
        await resp.write_eof()
        streamed.set()
        return resp

    backend = await start_backend("pod", handler=handler)
    sidecar = await async_start_sidecar({"svc": [backend.url]})
    errors = "equilibrium_errors_total"
    try:
        # the app: a raw socket that reads the head and a little body, then resets
        reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.outbound_port)
        writer.write(b"GET /stream HTTP/1.1\r\nHost: svc\r\n\r\n")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert len(await reader.readexactly(1000)) == 1000
        _reset(writer)

        await eventually(lambda: sidecar.metric(errors, upstream="svc", reason="app-hung-up"),
                         "the hang-up counted")
        await asyncio.wait_for(streamed.wait(), 10)
        assert sidecar.metric(errors, reason="body-relay-failed") == 0
        [view] = sidecar.state()["upstreams"]["svc"]["endpoints"]
        assert view["failures"] == 0  # not charged to the endpoint
        await asyncio.sleep(0.2)  # the sidecar's drain of the last chunk
        async with aiohttp.ClientSession() as client, client.get(
            f"{sidecar.outbound_url}/next", headers={"Host": "svc"}
        ) as resp:
            assert (resp.status, await resp.text()) == (200, "small")
        # the same upstream connection: drained and kept, not closed
        assert peers == [peers[0], peers[0]]
        assert sidecar.metric(errors, upstream="svc", reason="app-hung-up") == 1
    finally:
        assert await async_stop(sidecar) == 0
        await backend.stop()


async def test_an_app_cutting_its_own_answer_short_is_counted_at_its_inbound_sidecar() -> None:
    # The other way round: the app behind an inbound sidecar promises 100,000 bytes, sends
    # 1,000 and closes. The caller's connection is cut (a truncated answer, never a short
    # one) and the inbound side counts it as the app's error.
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"c" * 1000)
        await writer.drain()
        writer.close()

    app = await asyncio.start_server(cut, LOOPBACK, 0)
    app_port = app.sockets[0].getsockname()[1]
    inbound_port = free_port()
    sidecar = await async_start_sidecar({}, sidecar_id="cut-in", extra_args=[
        "--inbound", f"{LOOPBACK}:{inbound_port}", "--app", f"http://{LOOPBACK}:{app_port}"])
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, inbound_port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: app\r\n\r\n")
        got = await asyncio.wait_for(reader.read(), 10)  # until the sidecar cuts it
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and 0 < len(body) < 100_000
        writer.close()
        await eventually(lambda: sidecar.metric(
            "equilibrium_inbound_requests_total", outcome="app-error") == 1,
            "the cut answer is counted", timeout=5)
        assert sidecar.metric("equilibrium_inbound_requests_total", outcome="admitted") == 0
    finally:
        await async_stop(sidecar)
        app.close()
        await app.wait_closed()


async def _inbound_in_front_of(handle, request_timeout: str | None,  # type: ignore[no-untyped-def]
                               extra: list[str] | None = None, *,
                               policing: dict[str, object] | None = None,
                               tmp_path: Path | None = None):
    """An inbound sidecar in front of an app served by ``handle``; ``policing``: its
    settings, written to a config file under ``tmp_path``."""
    app = await asyncio.start_server(handle, LOOPBACK, 0)
    inbound_port = free_port()
    timeout = ["--request-timeout", request_timeout] if request_timeout is not None else []
    config = None
    if policing is not None:
        assert tmp_path is not None
        config = write_config(tmp_path / "policing.json", policing)
    sidecar = await async_start_sidecar({}, sidecar_id="stall-in", config_file=config, extra_args=[
        "--inbound", f"{LOOPBACK}:{inbound_port}",
        "--app", f"http://{LOOPBACK}:{app.sockets[0].getsockname()[1]}",
        *timeout, *(extra or [])])
    return app, sidecar, inbound_port


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a client's abort does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


LIMIT_ONE = {"initial_limit": 1, "min_limit": 1, "max_limit": 1, "probe_limit": 1}
"""An inbound concurrency limit pinned at one request."""


# --transparent: as injected pods run it, on asyncio's loop (uvloop otherwise), whose abort
# empties the write queue
@pytest.mark.parametrize("extra", [[], ["--transparent"]], ids=["uvloop", "transparent"])
async def test_a_caller_that_stops_reading_is_its_own_doing_at_the_inbound_sidecar(
        extra: list[str]) -> None:
    size = 64 * 1024 * 1024  # far more than the socket buffers on both sides hold
    app, sidecar, port = await _inbound_in_front_of(_big_app(size), "0.5", extra)
    requests = "equilibrium_inbound_requests_total"
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(b"GET /big HTTP/1.1\r\nHost: app\r\n\r\n")
        await writer.drain()
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        # then it reads nothing more
        await eventually(lambda: sidecar.metric(requests, outcome="caller-stalled") == 1,
                         "the caller's stall counted", timeout=10)
        assert sidecar.metric(requests, outcome="app-error") == 0
        assert sidecar.metric(requests, outcome="admitted") == 0
        writer.close()
    finally:
        await async_stop(sidecar)
        app.close()
        await app.wait_closed()


async def test_an_app_that_goes_silent_mid_answer_is_the_apps_error() -> None:
    release = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"s" * 1000)
        await writer.drain()
        await release.wait()  # silent, connection open
        writer.close()

    app, sidecar, port = await _inbound_in_front_of(silent, "0.5")
    requests = "equilibrium_inbound_requests_total"
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: app\r\n\r\n")
        got = await asyncio.wait_for(reader.read(), 10)  # read all until the sidecar cuts
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and len(body) == 1000
        await eventually(lambda: sidecar.metric(requests, outcome="app-error") == 1,
                         "the app's stall counted", timeout=5)
        assert sidecar.metric(requests, outcome="caller-stalled") == 0
        writer.close()
    finally:
        release.set()
        await async_stop(sidecar)
        app.close()
        await app.wait_closed()


async def _read_slowly(port: int, host: str, size: int, step: int = 32768,
                       pause: float = 0.03, within: float = 30.0, rcvbuf: int = 16384) -> int:
    """A reader on a small receive buffer that takes ``step`` bytes every ``pause`` seconds
    (by default about 1 MB/s, far slower than the sidecar writes): the kernel wakes the
    sidecar's writes only once a good part of its send buffer is free, seconds apart.
    Returns the body bytes received (until the end, a cut, or ``within`` seconds)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (LOOPBACK, port))
    # a small buffer: the stream reads from the socket only as fast as it is read
    reader, writer = await asyncio.open_connection(sock=sock, limit=step)
    try:
        writer.write(b"GET /big HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        got = 0
        deadline = time.monotonic() + within
        while got < size and time.monotonic() < deadline:
            try:
                data = await reader.read(step)
            except ConnectionError:
                break
            if not data:
                break
            got += len(data)
            await asyncio.sleep(pause)
        return got
    finally:
        writer.close()


def _big_app(size: int):  # type: ignore[no-untyped-def]
    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        with contextlib.suppress(ConnectionError):
            for _ in range(size // 65536):
                writer.write(b"b" * 65536)
                await writer.drain()
        writer.close()
    return big


@pytest.mark.parametrize("extra", [[], ["--transparent"]], ids=["uvloop", "transparent"])
async def test_a_slow_steady_reader_gets_the_whole_answer_at_the_inbound_sidecar(
        extra: list[str]) -> None:
    # A stall bound of 0.5 s and a reader that takes a little at a time: before, the
    # sidecar's write waited longer than the bound for the kernel's room, it counted the
    # reader as stalled and cut it (the reader saw the answer end short, once the kernel's
    # queue ran out).
    size = 4 * 1024 * 1024
    app, sidecar, port = await _inbound_in_front_of(_big_app(size), "0.5", extra)
    requests = "equilibrium_inbound_requests_total"
    try:
        assert await _read_slowly(port, "app", size) == size
        await eventually(lambda: sidecar.metric(requests, outcome="admitted") == 1,
                         "the answer counted whole")
        assert sidecar.metric(requests, outcome="caller-stalled") == 0
    finally:
        await async_stop(sidecar)
        app.close()
        await app.wait_closed()


async def test_a_slow_steady_app_gets_the_whole_answer_at_the_outbound_sidecar() -> None:
    size = 4 * 1024 * 1024
    app = await asyncio.start_server(_big_app(size), LOOPBACK, 0)
    sidecar = await async_start_sidecar(
        {"svc": [f"http://{LOOPBACK}:{app.sockets[0].getsockname()[1]}"]},
        extra_args=["--request-timeout", "0.5"])
    try:
        assert await _read_slowly(sidecar.outbound_port, "svc", size) == size
        assert sidecar.metric("equilibrium_errors_total", upstream="svc") == 0
    finally:
        await async_stop(sidecar)
        app.close()
        await app.wait_closed()


async def test_a_trickle_reader_is_still_cut_at_the_inbound_sidecar() -> None:
    # 1 KiB every 50 ms (20 KB/s) against a stall bound of 0.5 s: under the 64 KiB a bound
    # a reader must take to count as moving, so it is a stall (it would otherwise hold the
    # app's slot as long as it liked)
    size = 64 * 1024 * 1024
    app, sidecar, port = await _inbound_in_front_of(_big_app(size), "0.5")
    requests = "equilibrium_inbound_requests_total"
    try:
        reading = asyncio.create_task(_read_slowly(port, "app", size, step=1024, pause=0.05,
                                                   within=20, rcvbuf=4096))
        await eventually(lambda: sidecar.metric(requests, outcome="caller-stalled") == 1,
                         "the trickle counted as a stall", timeout=10)
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        assert sidecar.metric(requests, outcome="admitted") == 0
    finally:
        await async_stop(sidecar)
        app.close()
        await app.wait_closed()


async def test_a_caller_resetting_before_its_answer_frees_its_sidecar_at_once() -> None:
    # A caller that resets while its answer is still being made (a client's timeout): the
    # outbound sidecar cancels the attempt at once (the endpoint is no longer counted busy
    # there) and resets its upstream connection; the inbound sidecar sees the reset but keeps
    # the app's slot until the app is done (a reset does not stop an app's work), then drops
    # the answer, counted. Before, the outbound side held on until the app answered.
    release = asyncio.Event()
    answered = asyncio.Event()
    seen: list[str] = []

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head.split(b" ", 2)[1].decode())
        if head.startswith(b"GET /slow"):
            await asyncio.wait_for(release.wait(), 20)
        with contextlib.suppress(ConnectionError):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        answered.set()
        writer.close()

    app, inbound, inbound_port = await _inbound_in_front_of(slow, "30")
    outbound = await async_start_sidecar({"svc": [f"http://{LOOPBACK}:{inbound_port}"]},
                                         sidecar_id="reset-out")
    try:
        _, writer = await asyncio.open_connection(LOOPBACK, outbound.outbound_port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: svc\r\n\r\n")
        await writer.drain()
        await eventually(lambda: seen == ["/slow"], "the request reached the app")
        _reset(writer)
        await eventually(lambda: outbound.metric("equilibrium_errors_total", upstream="svc",
                                                 reason="app-hung-up") == 1,
                         "the hang-up counted at the caller's sidecar")
        [view] = outbound.state()["upstreams"]["svc"]["endpoints"]
        assert view["failures"] == 0 and view["in_flight"] == 0  # freed, nobody's failure
        assert not answered.is_set()  # all this while the app still works on it
        release.set()
        await asyncio.wait_for(answered.wait(), 10)
        await eventually(lambda: inbound.metric("equilibrium_inbound_requests_total",
                                                outcome="caller-hung-up") == 1,
                         "the dropped answer counted at the app's sidecar")
        assert inbound.metric("equilibrium_inbound_requests_total", outcome="app-error") == 0
        async with aiohttp.ClientSession() as client, client.get(
            f"{outbound.outbound_url}/next", headers={"Host": "svc"}
        ) as resp:
            assert (resp.status, await resp.text()) == (200, "ok")
    finally:
        release.set()
        await async_stop(outbound)
        await async_stop(inbound)
        app.close()
        await app.wait_closed()


async def test_a_caller_whose_chunked_body_breaks_its_framing_is_answered_400_inbound() -> None:
    # The stranger's finding: a chunk size of "zz" mid-body closed the caller's connection
    # without an answer. The caller can still read, so it is told (as the outbound side
    # tells its app), and the connection closes after.
    async def reads_all(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.read()  # never answers: the body never ends well
        writer.close()

    app, sidecar, port = await _inbound_in_front_of(reads_all, "5")
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(b"POST /up HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"zz\r\nbad\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), answer[:200]
        assert b'"reason": "upload-abandoned"' in body
        assert sidecar.metric("equilibrium_inbound_requests_total",
                              outcome="upload-abandoned") == 1
        assert sidecar.metric("equilibrium_inbound_http1_rejected_requests_total",
                              reason="malformed") == 1
        writer.close()
    finally:
        await async_stop(sidecar)
        app.close()
        await app.wait_closed()


async def test_a_caller_resetting_at_the_inbound_sidecar_cannot_get_past_its_limit(
        tmp_path: Path) -> None:
    # The review's finding: giving the app's slot back when the caller reset let a caller
    # that resets put any number of requests on an app that (like most) does not stop work
    # when its connection goes. The slot stays held until the app is done; a request reset
    # while still queued never reaches the app.
    busy, peak, seen = 0, 0, []
    arrived: asyncio.Queue[None] = asyncio.Queue()

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal busy, peak
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            seen.append(head.split(b" ", 2)[1].decode())
            busy += 1
            peak = max(peak, busy)
            arrived.put_nowait(None)
            await asyncio.sleep(2.0)  # the work, whatever happens to the connection
            busy -= 1
            try:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
            except ConnectionError:
                return

    server, sidecar, port = await _inbound_in_front_of(
        app, None, policing={"max_wait": 10, "concurrency": LIMIT_ONE}, tmp_path=tmp_path)
    outcomes = "equilibrium_inbound_requests_total"
    try:
        _, first = await asyncio.open_connection(LOOPBACK, port)
        first.write(b"GET /first HTTP/1.1\r\nHost: app\r\n\r\n")
        await asyncio.wait_for(arrived.get(), 5)  # the app works on it
        _, queued = await asyncio.open_connection(LOOPBACK, port)
        queued.write(b"GET /queued HTTP/1.1\r\nHost: app\r\n\r\n")
        await queued.drain()
        await eventually(lambda: sidecar.metric("equilibrium_inbound_queue_length") == 1,
                         "it waits for the slot")
        _reset(queued)  # a reset while queued leaves the queue at once
        await eventually(lambda: sidecar.metric("equilibrium_inbound_queue_length") == 0,
                         "the queue place given back")
        assert sidecar.metric(outcomes, outcome="caller-hung-up") == 1
        assert busy == 1 and seen == ["/first"]  # while the first is still worked on
        # bad bytes after the request in progress (the second review's way round a reset)
        # cut the connection but do not free the slot either
        first.write(b"GET /x HTTP/1.1\r\nno colon here\r\n\r\n")
        await first.drain()
        await asyncio.sleep(0.1)
        _reset(first)
        async with aiohttp.ClientSession() as client, client.get(
            f"http://{LOOPBACK}:{port}/third", headers={"Host": "app"}
        ) as resp:
            assert (resp.status, await resp.text()) == (200, "ok")
        assert peak == 1 and seen == ["/first", "/third"], (peak, seen)
        await eventually(lambda: sidecar.metric(outcomes, outcome="caller-hung-up") == 2,
                         "both hang-ups counted")
    finally:
        await async_stop(sidecar)
        server.close()
        await server.wait_closed()


async def test_a_body_that_breaks_while_queued_never_reaches_the_app(tmp_path: Path) -> None:
    # The review's finding: an upload whose framing broke while it waited for a slot still
    # took the slot and went to the app once one freed. It is answered 400 there instead.
    seen: list[str] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head.split(b" ", 2)[1].decode())
        await asyncio.sleep(1.0 if head.startswith(b"GET /hold") else 0.0)
        with contextlib.suppress(ConnectionError):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        writer.close()

    server, sidecar, port = await _inbound_in_front_of(
        app, None, policing={"max_wait": 5, "upload_buffer": 16, "concurrency": LIMIT_ONE},
        tmp_path=tmp_path)
    try:
        _, holder = await asyncio.open_connection(LOOPBACK, port)
        holder.write(b"GET /hold HTTP/1.1\r\nHost: app\r\n\r\n")
        await eventually(lambda: seen == ["/hold"], "the slot is taken")
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(b"POST /up HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"40\r\n" + b"x" * 64 + b"\r\n")
        await asyncio.sleep(0.2)  # past its upload buffer: it waits for the slot
        writer.write(b"zz\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        assert answer.startswith(b"HTTP/1.1 400") and b"upload-abandoned" in answer, answer
        await asyncio.sleep(0.2)
        assert seen == ["/hold"]  # the broken upload never reached the app
        holder.close()
        writer.close()
    finally:
        await async_stop(sidecar)
        server.close()
        await server.wait_closed()
