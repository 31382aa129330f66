"""The outbound listener's HTTP/1.1 server over real loopback sockets, byte by byte.

The proxy behind it is the real :class:`OutboundProxy` on an in-memory transport (the
upstreams); the app side is raw sockets, so slow, partial, pipelined and hostile clients are
exactly what the server sees. The defences (header timeout, idle timeout, head size, the
connection cap) are checked with a well-behaved client served alongside.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from mesh.profiles import get_profile
from sidecar.h2_site import OutboundSite
from sidecar.http1.client_connection import RequestBodyFailed
from sidecar.http1.server import (
    BODY_HIGH_WATER,
    BrokenBody,
    H1Connection,
    H1Limits,
    RequestBody,
)
from sidecar.metrics import H2Metrics, SidecarMetrics
from sidecar.outbound import OutboundProxy
from sidecar.transport import MemoryResponse, MemoryTransport, UpstreamRequest
from sidecar.upstreams import UpstreamTable

Respond = Callable[[UpstreamRequest], Awaitable[MemoryResponse]]


async def hello(request: UpstreamRequest) -> MemoryResponse:
    body = b""
    if request.body is not None:
        body = b"".join([chunk async for chunk in request.body])
    return MemoryResponse(200, {"Content-Length": str(5 + len(body))}, b"hello" + body)


@dataclass
class Listener:
    port: int
    metrics: SidecarMetrics
    site: OutboundSite | None = None
    seen: list[UpstreamRequest] = field(default_factory=list)
    answers: list[MemoryResponse] = field(default_factory=list)

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


MakeListener = Callable[..., Awaitable[Listener]]


async def _no_h2(stream: object) -> None:
    raise AssertionError("no HTTP/2 here")


@pytest.fixture
async def listener() -> AsyncIterator[MakeListener]:
    runners: list[web.AppRunner] = []

    async def make(respond: Respond = hello, *, limits: H1Limits | None = None,
                   max_connections: int = 100) -> Listener:
        profile = dataclasses.replace(get_profile("balanced"), request_timeout=5.0)
        table = UpstreamTable("round-robin", profile)
        table.apply({"users": ("http://10.0.0.1:8080",)}, 0.0)
        metrics = SidecarMetrics()
        rig = Listener(0, metrics)

        async def upstream(request: UpstreamRequest) -> MemoryResponse:
            rig.seen.append(request)
            answer = await respond(request)
            rig.answers.append(answer)
            return answer

        proxy = OutboundProxy(sidecar_id="h1", table=table, profile=profile,
                              metrics=metrics.outbound, rng=random.Random(1),
                              transport=MemoryTransport(upstream))
        runner = web.AppRunner(proxy.make_app(), access_log=None)
        await runner.setup()
        runners.append(runner)
        site = OutboundSite(runner, "127.0.0.1", 0, handler=_no_h2,
                            metrics=H2Metrics(metrics.registry), drain_timeout=1.0,
                            max_connections=max_connections, http1=proxy.serve,
                            http1_limits=limits)
        await site.start()
        rig.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        rig.site = site
        return rig

    yield make
    for runner in runners:
        await runner.cleanup()


async def read_response(
    reader: asyncio.StreamReader, trailers: list[tuple[str, str]] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One response: status, headers (lower-cased names), body (by length or chunked); a
    chunked body's trailer fields are appended to ``trailers``."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                while line := (await reader.readuntil(b"\r\n")).decode()[:-2]:
                    name, value = line.split(":", 1)
                    if trailers is not None:
                        trailers.append((name, value.strip()))
                break
            body += (await reader.readexactly(size + 2))[:-2]
    else:
        body = b""
    return status, headers, body


async def closed(reader: asyncio.StreamReader, within: float = 5.0) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), within) == b""
    except ConnectionResetError:
        return True


GET = b"GET /x HTTP/1.1\r\nHost: users\r\n\r\n"


# ---------------------------------------------------------------- the defences


async def test_a_half_sent_head_gets_408_after_the_timeout_while_others_are_served(
    listener: MakeListener,
) -> None:
    rig = await listener(limits=H1Limits(header_timeout=0.5))
    slow_r, slow_w = await rig.connect()
    slow_w.write(b"GET /slow HTTP/1.1\r\nHost: us")  # and nothing more
    await slow_w.drain()
    fast_r, fast_w = await rig.connect()
    for _ in range(3):
        fast_w.write(GET)
        status, _, body = await read_response(fast_r)
        assert (status, body) == (200, b"hello")
    status, headers, body = await read_response(slow_r)
    assert status == 408 and headers["connection"] == "close"
    assert json.loads(body) == {"error": "Request Timeout", "reason": "header-timeout"}
    assert await closed(slow_r)
    assert rig.sample("equilibrium_listener_timeouts_total", phase="http1_header") == 1
    assert [r.url.path for r in rig.seen] == ["/x"] * 3
    fast_w.close()
    slow_w.close()


async def test_a_head_dripped_byte_by_byte_is_not_given_more_time(
    listener: MakeListener,
) -> None:
    rig = await listener(limits=H1Limits(header_timeout=0.6))
    reader, writer = await rig.connect()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        for byte in b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 100:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.05)
            if reader.at_eof():
                raise ConnectionResetError
        await read_response(reader)
    assert loop.time() - started < 3.0
    assert rig.sample("equilibrium_listener_timeouts_total", phase="http1_header") == 1
    writer.close()


async def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(
    listener: MakeListener,
) -> None:
    rig = await listener(limits=H1Limits(idle_timeout=0.5))
    reader, writer = await rig.connect()
    writer.write(GET)
    assert (await read_response(reader))[0] == 200
    await asyncio.sleep(0.2)  # not idle long enough yet: still served
    writer.write(GET)
    assert (await read_response(reader))[0] == 200
    assert await closed(reader, within=3.0)
    assert rig.sample("equilibrium_listener_timeouts_total", phase="http1_idle") == 1
    writer.close()


async def test_an_oversized_head_gets_431_whether_sent_at_once_or_in_parts(
    listener: MakeListener,
) -> None:
    rig = await listener(limits=H1Limits(max_head=8192))
    reader, writer = await rig.connect()
    writer.write(b"GET / HTTP/1.1\r\nHost: users\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert status == 431 and headers["connection"] == "close"
    assert json.loads(body)["reason"] == "head-too-large"
    assert await closed(reader)
    reader, writer2 = await rig.connect()  # one endless header line, sent in parts
    writer2.write(b"GET / HTTP/1.1\r\nHost: users\r\nX-Big: ")
    await writer2.drain()
    await asyncio.sleep(0.05)
    for _ in range(5):
        writer2.write(b"b" * 2000)
        await writer2.drain()
        await asyncio.sleep(0.01)
    assert (await read_response(reader))[0] == 431
    assert rig.sample("equilibrium_http1_rejected_requests_total", reason="head-too-large") == 2
    assert rig.seen == []
    writer.close()
    writer2.close()


@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\r\nHost users\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: users\r\nContent-Length: abc\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: users\r\nContent-Length: 3\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    # RFC 9112 §3.2; the first Host won before (a helper's finding), as nginx refuses it
    b"GET / HTTP/1.1\r\nHost: users\r\nHost: other\r\n\r\n",
    # RFC 9112 §6.1: chunked in HTTP/1.0 is faulty framing (it was forwarded: the stranger's
    # finding)
    b"POST / HTTP/1.0\r\nHost: users\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
], ids=["no-colon", "garbage", "bad-length", "length-and-chunked", "two-hosts",
        "chunked-in-http-1.0"])
async def test_a_malformed_request_gets_400_with_its_reason_and_is_counted(
    listener: MakeListener, request_bytes: bytes,
) -> None:
    rig = await listener()
    reader, writer = await rig.connect()
    writer.write(request_bytes)
    status, headers, body = await read_response(reader)
    assert status == 400 and headers["content-type"].startswith("application/json")
    assert json.loads(body) == {"error": "Bad Request", "reason": "malformed"}
    assert await closed(reader)
    assert rig.sample("equilibrium_http1_rejected_requests_total", reason="malformed") == 1
    assert rig.seen == []
    writer.close()


async def test_a_listener_that_requires_host_refuses_an_http11_request_without_one(
        listener: MakeListener) -> None:
    # RFC 9112 §3.2: the inbound listener's rule (it forwarded such a request and made up a
    # Host: the stranger's finding); the outbound listener answers its own `no-host`
    strict = await listener(limits=H1Limits(require_host=True))
    reader, writer = await strict.connect()
    writer.write(b"GET /x HTTP/1.1\r\n\r\n")
    status, _, body = await read_response(reader)
    assert (status, json.loads(body)["reason"]) == (400, "malformed")
    assert await closed(reader)
    writer.close()
    reader, writer = await strict.connect()
    writer.write(b"GET /x HTTP/1.0\r\n\r\n")  # HTTP/1.0 needs no Host: routed (and refused
    status, _, body = await read_response(reader)  # by the outbound proxy, for want of one)
    assert (status, json.loads(body)["reason"]) == (400, "no-host")
    writer.close()
    lenient = await listener()
    reader, writer = await lenient.connect()
    writer.write(b"GET /x HTTP/1.1\r\n\r\n")
    status, _, body = await read_response(reader)
    assert (status, json.loads(body)["reason"]) == (400, "no-host")
    writer.close()
    assert strict.seen == [] and lenient.seen == []


async def test_a_transfer_coding_besides_chunked_is_refused_501(
        listener: MakeListener) -> None:
    # "gzip, chunked" reached the upstream re-chunked without its gzip (a helper's finding)
    rig = await listener()
    reader, writer = await rig.connect()
    writer.write(b"POST / HTTP/1.1\r\nHost: users\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                 b"2\r\nzz\r\n0\r\n\r\n")
    status, _, body = await read_response(reader)
    assert status == 501 and json.loads(body)["reason"] == "transfer-coding-not-supported"
    assert rig.seen == []
    writer.close()


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9"])
async def test_a_version_other_than_1_0_and_1_1_gets_505(
    listener: MakeListener, version: bytes,
) -> None:
    # llhttp reads these lines; they were served as HTTP/1.1 (a helper's finding)
    rig = await listener()
    reader, writer = await rig.connect()
    writer.write(b"GET / " + version + b"\r\nHost: users\r\n\r\n")
    status, _, body = await read_response(reader)
    assert status == 505
    assert json.loads(body)["reason"] == "version-not-supported"
    assert await closed(reader)
    assert rig.sample("equilibrium_http1_rejected_requests_total",
                      reason="version-not-supported") == 1
    assert rig.seen == []
    writer.close()


async def test_connect_is_refused_501_after_the_requests_before_it(
    listener: MakeListener,
) -> None:
    """A proxy-aware client sends CONNECT for https:// URLs (``https_proxy``): no tunnel is
    opened, it is told so in JSON, and what it sent after the head never reaches anyone."""
    rig = await listener()
    reader, writer = await rig.connect()
    writer.write(GET + b"CONNECT users:443 HTTP/1.1\r\nHost: users:443\r\n\r\n"
                 b"\x16\x03\x01 not http at all\r\n\r\n" + GET)
    assert (await read_response(reader))[:3:2] == (200, b"hello")
    status, headers, body = await read_response(reader)
    assert status == 501 and headers["connection"] == "close"
    assert json.loads(body) == {"error": "Not Implemented", "reason": "connect-not-supported"}
    assert await closed(reader)
    assert [r.url.path for r in rig.seen] == ["/x"]
    assert rig.sample("equilibrium_http1_rejected_requests_total",
                      reason="connect-not-supported") == 1
    writer.close()


async def test_the_connection_cap_closes_one_more_connection_at_once(
    listener: MakeListener,
) -> None:
    rig = await listener(max_connections=2)
    held = [await rig.connect() for _ in range(2)]
    for reader, writer in held:
        writer.write(GET)
        assert (await read_response(reader))[0] == 200  # both open and served
    reader, writer = await rig.connect()
    writer.write(GET)
    assert await closed(reader)
    assert rig.sample("equilibrium_outbound_connections_rejected_total") == 1
    held[0][1].close()
    await asyncio.sleep(0.2)
    reader, writer = await rig.connect()  # a place is free again
    writer.write(GET)
    assert (await read_response(reader))[0] == 200
    for _, w in (*held, (reader, writer)):
        w.close()


# ---------------------------------------------------------------- HTTP/1.1 itself


async def test_pipelined_requests_are_answered_in_order(listener: MakeListener) -> None:
    async def slower_first(request: UpstreamRequest) -> MemoryResponse:
        n = int(request.url.path.strip("/"))
        await asyncio.sleep(0.05 * (3 - n))
        return MemoryResponse(200, {"Content-Length": "1"}, str(n).encode())

    rig = await listener(slower_first)
    reader, writer = await rig.connect()
    writer.write(b"".join(b"GET /%d HTTP/1.1\r\nHost: users\r\n\r\n" % n for n in range(3)))
    bodies = [(await read_response(reader))[2] for _ in range(3)]
    assert bodies == [b"0", b"1", b"2"]
    writer.close()


async def test_a_reader_cancelled_while_waiting_leaves_the_next_one_its_wake_up() -> None:
    # The review's finding: an upload writer stopped (cancelled) while it waited for the
    # app's body, just as the replay of a refused request began reading the same body,
    # cleared the replay's waiter on its way out; the rest of the body woke nobody, and the
    # request hung until its timeout, unanswered.
    async def unused(exchange: object) -> None:
        raise AssertionError("no request here")

    body = RequestBody(H1Connection(unused), False)  # a connection never connected
    writer = asyncio.create_task(body.readany())
    await asyncio.sleep(0)

    async def replay() -> bytes:
        writer.cancel()
        return await body.readany()

    reading = asyncio.create_task(replay())
    await asyncio.sleep(0.01)
    body.feed(b"rest")
    assert await asyncio.wait_for(reading, 1) == b"rest"


async def test_deep_pipelining_by_a_reading_client_is_answered_whole(
        listener: MakeListener) -> None:
    # A helper's finding: past 16 requests parsed ahead, reading pauses; the next read held
    # many whole requests and the start of one more, and all of its bytes were counted as
    # that last head's (the previous read had ended inside a head): over 64 KiB, 431, reset.
    rig = await listener()
    reader, writer = await rig.connect()
    count = 20000  # 620 KB of requests in one write (reads of 256 KiB end inside a head)
    writer.write(GET * count)
    answers = [await read_response(reader) for _ in range(count)]
    assert [status for status, _, _ in answers] == [200] * count
    assert rig.sample("equilibrium_http1_rejected_requests_total",
                      reason="head-too-large") == 0
    writer.close()


@pytest.mark.parametrize("ask_close", [
    b"GET /a HTTP/1.1\r\nHost: users\r\nConnection: close\r\n\r\n",
    b"GET /a HTTP/1.0\r\nHost: users\r\n\r\n",
])
async def test_bytes_after_a_request_that_asked_to_close_lose_nothing_before_it(
        listener: MakeListener, ask_close: bytes) -> None:
    # A helper's finding: any byte after a request asking to close (Connection: close, or
    # HTTP/1.0) in the same read made llhttp fail, and the connection was cut with no
    # answer at all, the valid requests before it lost too. They are answered; what follows
    # the close is not processed (RFC 9112 §9.6).
    rig = await listener()
    reader, writer = await rig.connect()
    writer.write(GET + ask_close + GET + b"garbage")
    first = await read_response(reader)
    second = await read_response(reader)
    assert first[0] == 200 and second[0] == 200
    assert await closed(reader)
    assert [r.url.path for r in rig.seen] == ["/x", "/a"]
    assert rig.sample("equilibrium_http1_rejected_requests_total", reason="malformed") == 0


async def test_chunked_request_and_response_bodies(listener: MakeListener) -> None:
    async def stream_back(request: UpstreamRequest) -> MemoryResponse:
        if request.body is None:
            return await hello(request)
        got = b"".join([chunk async for chunk in request.body])

        async def chunks() -> AsyncIterator[bytes]:
            for part in (b"got:", got, b"!"):
                yield part
                await asyncio.sleep(0)

        return MemoryResponse(200, {}, chunks())

    rig = await listener(stream_back)
    reader, writer = await rig.connect()
    writer.write(b"POST /up HTTP/1.1\r\nHost: users\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    assert body == b"got:abcdefg!"
    writer.write(GET)  # the connection is still good for the next request
    assert (await read_response(reader))[2] == b"hello"
    writer.close()


async def test_trailers_are_relayed_both_ways_and_game_headers_in_them_are_not(
    listener: MakeListener,
) -> None:
    upstream_got: list[list[tuple[str, str]] | None] = []

    async def trailed(request: UpstreamRequest) -> MemoryResponse:
        if request.body is None:
            return await hello(request)
        got = b"".join([chunk async for chunk in request.body])
        upstream_got.append(getattr(request.body, "trailers", None))

        async def chunks() -> AsyncIterator[bytes]:
            yield b"sum of " + got

        return MemoryResponse(200, {}, chunks(), trailers=[
            ("X-Sum", "abc"), ("grpc-status", "0"), ("Content-Length", "99"),
            ("X-GT-Price", "5"), ("grpc-message", "caf\u00e9"),
        ])

    rig = await listener(trailed)
    reader, writer = await rig.connect()
    writer.write(b"POST /up HTTP/1.1\r\nHost: users\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"3\r\nabc\r\n0\r\nX-Checksum: 900150983cd24fb0\r\nX-GT-Bid: 9\r\n"
                 b"Host: elsewhere\r\n\r\n")
    trailers: list[tuple[str, str]] = []
    status, headers, body = await read_response(reader, trailers)
    assert (status, body) == (200, b"sum of abc") and headers["transfer-encoding"] == "chunked"
    assert upstream_got == [[("X-Checksum", "900150983cd24fb0")]]
    assert trailers == [("X-Sum", "abc"), ("grpc-status", "0"), ("grpc-message", "caf\u00e9")]
    assert rig.sample("equilibrium_rejected_headers_total", header="X-GT-Bid",
                      reason="from-app") == 1
    assert rig.sample("equilibrium_rejected_headers_total", header="X-GT-Price",
                      reason="in-trailers") == 1
    writer.write(GET)  # the connection is at a request boundary: still good
    assert (await read_response(reader))[2] == b"hello"
    # an HTTP/1.0 app's answer ends by closing: no trailer section can follow it
    writer.write(b"POST /up HTTP/1.0\r\nHost: users\r\nContent-Length: 1\r\n\r\nz")
    rest = await asyncio.wait_for(reader.read(), 5)
    assert rest.endswith(b"\r\n\r\nsum of z") and b"X-Sum" not in rest
    writer.close()


async def test_an_oversized_trailer_section_cuts_the_request_and_is_counted(
    listener: MakeListener,
) -> None:
    bodies: list[bytes | BaseException] = []

    async def reading(request: UpstreamRequest) -> MemoryResponse:
        if request.body is not None:
            try:
                bodies.append(b"".join([chunk async for chunk in request.body]))
            except BrokenBody as exc:  # as the real transport says it (H1Transport)
                bodies.append(exc)
                raise RequestBodyFailed(f"the request body failed: {exc!r}") from exc
        return await hello(request)

    rig = await listener(reading, limits=H1Limits(max_head=8192))
    reader, writer = await rig.connect()
    writer.write(b"POST /up HTTP/1.1\r\nHost: users\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"3\r\nabc\r\n")
    for _ in range(100):  # the request is on its way upstream, its body streaming
        if rig.seen:
            break
        await asyncio.sleep(0.02)
    writer.write(b"0\r\n" + b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 500) for i in range(20))
                 + b"\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)  # the answer, then the close
    assert answer.startswith(b"HTTP/1.1 400") and b"app-hung-up" in answer
    assert rig.sample("equilibrium_http1_rejected_requests_total",
                      reason="trailers-too-large") == 1
    for _ in range(100):
        if bodies:
            break
        await asyncio.sleep(0.02)
    # the request's body is broken: never a whole body upstream
    assert len(bodies) == 1 and isinstance(bodies[0], BrokenBody)
    writer.close()


@pytest.mark.parametrize("tail", [
    b"0\r\nX-Long: ",  # a trailer line that never ends
    b"1;ext=",  # a chunk extension that never ends
])
async def test_an_endless_line_between_body_bytes_is_cut_at_the_head_limit(
    listener: MakeListener, tail: bytes,
) -> None:
    """llhttp buffers an unfinished field line whole; the listener counts the raw bytes since
    the body's last byte instead, so neither memory nor parsing time grows without bound."""
    async def reading(request: UpstreamRequest) -> MemoryResponse:
        if request.body is not None:
            try:
                async for _ in request.body:
                    pass
            except BrokenBody as exc:  # as the real transport says it (H1Transport)
                raise RequestBodyFailed(f"the request body failed: {exc!r}") from exc
        return await hello(request)

    rig = await listener(reading, limits=H1Limits(max_head=8192))
    reader, writer = await rig.connect()
    writer.write(b"POST /up HTTP/1.1\r\nHost: users\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"3\r\nabc\r\n" + tail)
    answered = asyncio.ensure_future(reader.read())  # the answer, until the close
    sent = 0
    with contextlib.suppress(ConnectionError):
        while sent < 1024 * 1024 and not answered.done():  # at most 1 MiB, in 4 KiB pieces
            writer.write(b"a" * 4096)
            await writer.drain()
            sent += 4096
            await asyncio.sleep(0)
    answer = await asyncio.wait_for(answered, 5)
    assert answer.startswith(b"HTTP/1.1 400") and b"app-hung-up" in answer
    assert sent < 512 * 1024  # cut long before the bound of this loop
    assert rig.sample("equilibrium_http1_rejected_requests_total",
                      reason="trailers-too-large") == 1
    writer.close()


async def test_an_early_answer_is_not_lost_to_the_rest_of_the_body(
    listener: MakeListener,
) -> None:
    """An answer given before the request's body ended (the request is refused unread) is
    followed by a half-close and a linger: the app, still sending, reads the whole answer."""
    rig = await listener()
    reader, writer = await rig.connect()
    writer.write(b"POST /x HTTP/1.1\r\nHost: nowhere\r\nContent-Length: 1000000\r\n\r\n"
                 + b"a" * 65536)  # an unknown upstream: 404 without reading the body
    with contextlib.suppress(ConnectionError):
        for _ in range(8):  # and more body after the answer is out
            writer.write(b"a" * 65536)
            await writer.drain()
    status, headers, _ = await read_response(reader)
    assert status == 404 and headers["connection"] == "close"
    assert await closed(reader)
    writer.close()


async def test_an_upstream_answer_relayed_before_the_body_ended_says_connection_close(
    listener: MakeListener,
) -> None:
    """The upstream answers before reading the body: the relayed answer ends the connection
    and says so, so the app does not send a pipelined request into a connection that drops
    it (it is read and dropped, and never reaches the upstream)."""
    async def early(request: UpstreamRequest) -> MemoryResponse:
        return MemoryResponse(200, {"Content-Length": "5"}, b"early")

    rig = await listener(early)
    reader, writer = await rig.connect()
    writer.write(b"POST /early HTTP/1.1\r\nHost: users\r\nContent-Length: 10\r\n\r\nhello")
    status, headers, body = await read_response(reader)
    assert (status, body) == (200, b"early") and headers["connection"] == "close"
    with contextlib.suppress(ConnectionError):
        writer.write(b"world" + GET)
    assert await closed(reader)
    assert [r.url.path for r in rig.seen] == ["/early"]
    writer.close()


async def test_expect_100_continue_is_answered_before_the_body_is_sent(
    listener: MakeListener,
) -> None:
    rig = await listener()
    reader, writer = await rig.connect()
    writer.write(b"PUT /doc HTTP/1.1\r\nHost: users\r\nContent-Length: 5\r\n"
                 b"Expect: 100-continue\r\n\r\n")
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"world")
    status, _, body = await read_response(reader)
    assert (status, body) == (200, b"helloworld")
    assert "Expect" not in rig.seen[0].headers
    writer.close()


async def test_head_and_http10_answers_are_framed_right(listener: MakeListener) -> None:
    async def unsized(request: UpstreamRequest) -> MemoryResponse:
        return MemoryResponse(200, {}, b"whole body")

    rig = await listener(unsized)
    reader, writer = await rig.connect()
    writer.write(b"HEAD / HTTP/1.1\r\nHost: users\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    writer.write(b"GET / HTTP/1.0\r\nHost: users\r\n\r\n")  # no length: ends by closing
    rest = await asyncio.wait_for(reader.read(), 5)
    assert rest.startswith(b"HTTP/1.1 200") and rest.endswith(b"\r\n\r\nwhole body")
    assert b"connection: close" in rest.lower()
    writer.close()


async def test_a_204_goes_out_without_content_length_or_body_and_the_next_is_served(
    listener: MakeListener,
) -> None:
    async def stray(request: UpstreamRequest) -> MemoryResponse:
        if request.url.path == "/none":  # a 204 that claims (and carries) a body
            return MemoryResponse(204, {"Content-Length": "5"}, b"stray")
        return await hello(request)

    rig = await listener(stray)
    reader, writer = await rig.connect()
    writer.write(b"GET /none HTTP/1.1\r\nHost: users\r\n\r\n" + GET)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 204") and b"content-length" not in head.lower()
    assert (await read_response(reader))[:3:2] == (200, b"hello")  # nothing stray between
    writer.close()


async def test_an_upgrade_after_a_request_is_handed_to_aiohttp_with_its_head(
    listener: MakeListener,
) -> None:
    rig = await listener()
    reader, writer = await rig.connect()
    writer.write(GET + b"GET /ws HTTP/1.1\r\nHost: users\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n")
    assert (await read_response(reader))[2] == b"hello"
    status, headers, body = await read_response(reader)  # aiohttp's handler: the same proxy
    assert status == 501 and b"websocket-not-supported" in body
    assert headers["connection"] == "close" and await closed(reader)
    writer.close()


@pytest.mark.parametrize("upgrade", [
    b"CONNECT users:443 HTTP/1.1\r\nHost: users:443\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: users\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
], ids=["connect", "websocket"])
async def test_bytes_after_an_upgrade_waiting_its_turn_are_bounded(
    listener: MakeListener, upgrade: bytes,
) -> None:
    """Behind a slow request, what follows an upgrade's head waits for the hand-over: after a
    CONNECT it is dropped (nobody will read it), after a WebSocket head it is kept up to the
    head limit and the socket stops being read, never buffered without bound."""
    release = asyncio.Event()

    async def slow(request: UpstreamRequest) -> MemoryResponse:
        await release.wait()
        return await hello(request)

    rig = await listener(slow, limits=H1Limits(max_head=8192))
    reader, writer = await rig.connect()
    writer.write(b"GET /slow HTTP/1.1\r\nHost: users\r\n\r\n" + upgrade)
    with contextlib.suppress(TimeoutError):
        for _ in range(64):  # up to 4 MiB, as long as the sidecar reads it
            writer.write(b"z" * 65536)
            await asyncio.wait_for(writer.drain(), 0.2)
    await asyncio.sleep(0.1)
    assert rig.site is not None
    [conn] = list(rig.site._shared.http1)
    held = len(conn._handover)
    if upgrade.startswith(b"CONNECT"):
        assert held == 0
    else:
        assert 0 < held <= 8192 + 256 * 1024  # the limit, overshot by one read at most
    release.set()
    assert (await read_response(reader))[:3:2] == (200, b"hello")
    writer.close()


async def test_an_upgrade_that_does_not_happen_ends_the_connection(
    listener: MakeListener,
) -> None:
    """aiohttp's protocol, which serves handed-over upgrades, has neither the listener's
    header timeout nor its idle timeout: a connection whose upgrade did not happen must not
    stay open on its terms (a slow-loris way around both)."""
    rig = await listener(limits=H1Limits(header_timeout=0.5, idle_timeout=0.5))
    reader, writer = await rig.connect()
    writer.write(b"GET /x HTTP/1.1\r\nHost: users\r\nConnection: Upgrade\r\n"
                 b"Upgrade: foo\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert (status, body) == (200, b"hello") and headers["connection"] == "close"
    with contextlib.suppress(ConnectionError):
        writer.write(b"GET /drip")  # a next head, dripped: nobody waits for it
    assert await closed(reader, within=2.0)
    assert [r.url.path for r in rig.seen] == ["/x"]
    writer.close()


async def test_an_app_hanging_up_mid_body_is_not_charged_to_the_endpoint(
    listener: MakeListener,
) -> None:
    sent_head = asyncio.Event()

    async def long_body(request: UpstreamRequest) -> MemoryResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(20):  # less than the drain limit in all
                yield b"x" * 8192
                sent_head.set()
                await asyncio.sleep(0.02)

        return MemoryResponse(200, {}, chunks())

    rig = await listener(long_body)
    reader, writer = await rig.connect()
    writer.write(GET)
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    await sent_head.wait()
    writer.transport.abort()  # the app goes away mid-body
    for _ in range(100):  # the rest of the body is drained, then the answer released
        if rig.answers[0].released:
            break
        await asyncio.sleep(0.05)
    assert rig.sample("equilibrium_errors_total", upstream="users", reason="app-hung-up") == 1
    assert rig.sample("equilibrium_errors_total", upstream="users",
                      reason="body-relay-failed") == 0
    assert rig.sample("equilibrium_requests_total", upstream="users",
                      endpoint="http://10.0.0.1:8080", code="200") == 1
    assert rig.answers[0].released and not rig.answers[0].closed



async def test_a_large_upload_is_read_only_as_fast_as_the_upstream_takes_it(
    listener: MakeListener,
) -> None:
    release = asyncio.Event()

    async def late_reader(request: UpstreamRequest) -> MemoryResponse:
        await release.wait()
        assert request.body is not None
        total = 0
        async for chunk in request.body:
            total += len(chunk)
        return MemoryResponse(200, {"Content-Length": str(len(str(total)))}, str(total).encode())

    rig = await listener(late_reader)
    reader, writer = await rig.connect()
    size = 16 * 1024 * 1024
    writer.write(b"POST /up HTTP/1.1\r\nHost: users\r\nContent-Length: %d\r\n\r\n" % size)

    async def send() -> None:
        for _ in range(size // 65536):
            writer.write(b"x" * 65536)
            await writer.drain()

    sending = asyncio.create_task(send())
    await asyncio.sleep(1.0)
    assert rig.site is not None
    [conn] = rig.site._shared.http1
    receiving = conn._receiving
    assert receiving is not None
    # reading paused near the high-water mark; the rest waits in TCP, the app is held back
    assert receiving.content.buffered <= BODY_HIGH_WATER + 256 * 1024
    assert not sending.done()
    release.set()
    await asyncio.wait_for(sending, 20)
    status, _, body = await read_response(reader)
    assert (status, body) == (200, str(size).encode())
    writer.close()
