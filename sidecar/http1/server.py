"""The outbound listener's HTTP/1.1 server connection: an asyncio protocol on llhttp.

Owns one app connection speaking HTTP/1.1 (RFC 9112) after :mod:`sidecar.h2_site` decided it
is not h2c: parsing with ``httptools.HttpRequestParser`` (llhttp), handing each request to
the handler (``OutboundProxy.serve``) as an :class:`H1Exchange` (:mod:`sidecar.exchange`), and
writing the answer back. Keep-alive; pipelined requests answered one at a time, in order;
request bodies (``Content-Length`` or chunked) streamed to the handler, reading paused above a
high-water mark; ``Expect: 100-continue`` answered when the handler first reads the body;
HEAD, 1xx, 204 and 304 answers without a body; other answers framed by their
``Content-Length``, else chunked (HTTP/1.1) or by closing (HTTP/1.0); a response head sent in
the same write as the first chunk (or the whole small body); writes wait while the socket's
buffer is above its limit (``pause_writing``/``resume_writing``). Trailer fields: a chunked
request body's are kept for the handler (``content.trailers``), a chunked answer ends with
the handler's (:meth:`H1Exchange.finish`).

Also owns the connection's defences (docs/operations.md, "Outbound listener defences"), each
counted: a request head not complete within ``header_timeout`` is answered 408 and the
connection closed (``equilibrium_listener_timeouts{phase="http1_header"}``); a keep-alive
connection idle for ``idle_timeout`` is closed (``{phase="http1_idle"}``); a head larger
than ``max_head`` bytes is answered 431, a malformed request 400, both closing the
connection (``equilibrium_http1_rejected_requests{reason}``); a request body's trailer
section (or chunk framing between body bytes) over ``max_head`` bytes, or a body that is
not valid chunked framing, ends the request's body (``{reason="trailers-too-large"}``,
``{reason="malformed"}``): its handler reads a :class:`BrokenBody` and may still answer
(400), the rest is dropped, and the connection closes after; an answer given before its
request's body ended is
followed by a linger (the rest read and dropped, then the close). The
connection cap is the site's. The timers are one ``loop.call_at`` handle per connection, moved
rather than re-created: a request whose head arrives in one read costs no timer operation.

A CONNECT request is refused here, in its turn: 501 with the reason
``connect-not-supported``, then the close (no listener opens tunnels). WebSocket upgrades
and any other request llhttp reports as an upgrade are not
served here: once the requests before it are answered, the connection is handed to
``fallback()`` (aiohttp's own HTTP/1.1 protocol) together with the request's head, rebuilt
from what was parsed, and every byte read after it, so :mod:`sidecar.websocket` serves it.

An app that hangs up is not the request's failure. Once its answer has begun, its handler is
not cancelled: its next write raises ``ConnectionResetError``, and the handler decides what
that means. Before that (the socket reset while the answer is still awaited, its body all
received), the outbound listener's handler is cancelled: nobody is left to read the answer,
and the upstream attempt should stop holding its endpoint (``hangup_cancels``; the inbound
listener cancels only a request still waiting for its slot, and lets an admitted one run, so
the app's slot is held as long as the app works on it). A half-close is no hang-up: the
request is answered. This module does not route, forward or
know about upstreams.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import fcntl
import http
import logging
import struct
import termios
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.errors import BrokenBody
from sidecar.exchange import Answer, SocketIps
from sidecar.http1.trailers import last_chunk
from sidecar.metrics import H2Metrics

log = logging.getLogger(__name__)

DEFAULT_HEADER_TIMEOUT = 10.0  # seconds to receive a whole request head once it began
DEFAULT_IDLE_TIMEOUT = 300.0  # seconds a keep-alive connection may wait for its next request
DEFAULT_MAX_HEAD = 64 * 1024  # bytes of request line and headers
BODY_HIGH_WATER = 256 * 1024  # request body bytes buffered before reading pauses
MAX_PIPELINED = 16  # requests parsed ahead of the one being answered before reading pauses
_AFTER_CLOSE = "Data after `Connection: close`"  # llhttp's HPE_CLOSED_CONNECTION
LINGER = 2.0  # seconds a refused connection is read (and dropped) after our error answer
# bytes a reader must take per stall bound while a write waits for it, to count as moving
# (H1Connection.reader_moving): about 4 KB/s at the default bound of 15 s
READER_MIN_TAKEN = 64 * 1024

REASONS = {status.value: status.phrase for status in http.HTTPStatus}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CRLF = b"\r\n"


@dataclass(frozen=True, slots=True)
class H1Limits:
    """The defences of one HTTP/1.1 app connection (docs/operations.md)."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT  # 0: never
    max_head: int = DEFAULT_MAX_HEAD
    #: an HTTP/1.1 request without Host is refused 400 (RFC 9112 §3.2): the inbound
    #: listener's rule; the outbound one answers its own `no-host` (it routes by Host, and
    #: takes a proxy's absolute-form target without one)
    require_host: bool = False


class TrailersTooLarge(Exception):
    """A chunked request body's trailer section over ``max_head`` bytes (raised in the
    parser's callback, so parsing stops there)."""


class HeadRefused(Exception):
    """A request head the listener refuses with ``status`` and ``reason`` (raised in the
    parser's callback, so parsing stops there): a second ``Host`` (RFC 9112 §3.2: 400), a
    version other than HTTP/1.0 and 1.1 (505, as nginx answers HTTP/2.0 or HTTP/0.9 on a
    line that llhttp reads), a transfer coding other than ``chunked`` (501)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Framing(enum.Enum):
    NONE = 0  # no body (HEAD, 1xx, 204, 304)
    LENGTH = 1  # Content-Length: the chunks go out as they are
    CHUNKED = 2  # Transfer-Encoding: chunked
    CLOSE = 3  # HTTP/1.0 without a length: the body ends when the connection closes


class RequestBody:
    """A request body as it arrives (``readany()``; ``b""`` at its end). ``trailers``: the
    trailer fields of a chunked body, once it has ended (None before, or when none)."""

    __slots__ = ("_chunks", "_conn", "_continue", "_eof", "_exc", "_size", "_waiter",
                 "trailers")

    def __init__(self, conn: H1Connection, expect_continue: bool) -> None:
        self._conn = conn
        self._chunks: list[bytes] = []
        self._size = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._continue = expect_continue
        self.trailers: CIMultiDictProxy[str] | None = None

    @property
    def buffered(self) -> int:
        return self._size

    @property
    def received(self) -> bool:
        """The whole body has arrived (read or not)."""
        return self._eof

    @property
    def failed(self) -> bool:
        """The body will not arrive whole (it broke its framing, or the app left mid-way),
        whether or not a reader has met that yet."""
        return self._exc is not None

    def at_eof(self) -> bool:
        """The body has ended and all of it was read."""
        return self._eof and not self._chunks

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if not self._eof:
            self._exc = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def readany(self) -> bytes:
        if self._continue:  # the app waits for our go before it sends the body (RFC 9110 §10.1.1)
            self._continue = False
            self._conn.send_continue()
        while not self._chunks:
            if self._eof:
                return b""
            if self._exc is not None:
                raise self._exc
            waiter = self._waiter = self._conn.loop.create_future()
            try:
                await waiter
            finally:
                # only its own: a reader cancelled here (an upload writer stopped for a
                # replay) must not take away the waiter of the one reading after it
                if self._waiter is waiter:
                    self._waiter = None
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
        self._conn.body_consumed()
        return data


class H1Exchange:
    """One request on an :class:`H1Connection` and its response (an ``Exchange``)."""

    __slots__ = ("_conn", "_framing", "_head", "body_exists", "content", "done",
                 "hangup_cancels", "headers", "hung_up", "keep_alive", "method", "raw_path",
                 "remote", "started", "version")

    scheme = "http"

    def __init__(self, conn: H1Connection, method: str, raw_path: str,
                 headers: CIMultiDictProxy[str], version: str, keep_alive: bool,
                 body_exists: bool, expect_continue: bool) -> None:
        self._conn = conn
        self.method = method
        self.raw_path = raw_path
        self.headers = headers
        self.version = version
        self.keep_alive = keep_alive
        self.body_exists = body_exists
        self.remote = conn.remote
        self.content = RequestBody(conn, expect_continue)
        self.started = False  # a response head was produced
        self.done = False  # the response ended
        # whether the app's reset cancels this request (None: the connection's rule); the
        # inbound handler asks for it while the request waits for a slot
        self.hangup_cancels: bool | None = None
        self.hung_up = False  # it was cancelled because the app's socket was lost
        self._head = b""  # a response head not written yet
        self._framing = Framing.NONE

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._conn.transport

    def client_gone(self) -> bool:
        transport = self._conn.transport
        return transport is None or transport.is_closing()

    def abort(self) -> None:
        self._conn.abort()

    def reader_moving(self) -> bool:
        """See :meth:`H1Connection.reader_moving`."""
        return self._conn.reader_moving()

    def _keep(self) -> bool:
        return self.keep_alive and not self._conn.closing

    def head_unsent(self) -> bool:
        return bool(self._head)

    def local_ip(self) -> str:
        return self._conn.local_ip()

    async def answer(self, answer: Answer) -> None:
        self.started = True
        self._head, self._framing = b"", Framing.NONE  # replaces one begun and not sent
        # a body still on its way is not read for the sidecar's own answer: the connection
        # ends after it (_finished), and the answer says so
        keep = self.keep_alive = self._keep() and self.content.received
        lines = [f"HTTP/1.1 {answer.status} {REASONS.get(answer.status, '')}",
                 f"Content-Type: {answer.content_type}",
                 f"Content-Length: {len(answer.body)}"]
        lines.extend(map(": ".join, answer.headers.items()))
        if not keep:
            lines.append("Connection: close")
        elif self.version == "1.0":
            lines.append("Connection: keep-alive")
        head = _encode_head(lines)
        body = b"" if self.method == "HEAD" else answer.body
        self.done = True
        transport = self._conn.transport
        if transport is not None and not transport.is_closing():
            transport.write(head + body if body else head)

    async def refuse_body(self, answer: Answer | None) -> None:
        # not at a request boundary: the connection ends once this returns; after an answer
        # it lingers (half-closed, the rest read and dropped) so a reset does not lose it
        self.keep_alive = False
        if answer is not None and not self.client_gone():
            await self.answer(answer)
            self._conn._linger()

    async def start_response(self, status: int, reason: str | None,
                             headers: CIMultiDict[str]) -> None:
        self.started = True
        # an answer that starts before its request's body has all arrived (the upstream
        # answered early) ends the connection, and says so: what the app sends after it is
        # read and dropped (_finished), so it must not be sent as if it would be served
        keep = self._keep() and self.content.received
        extra: list[str] = []
        if self.method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            framing = Framing.NONE
        elif "Content-Length" in headers:
            framing = Framing.LENGTH
        elif self.version == "1.1":
            framing = Framing.CHUNKED
            extra.append("Transfer-Encoding: chunked")
        else:
            framing = Framing.CLOSE
            keep = False
        if not keep:
            extra.append("Connection: close")
        elif self.version == "1.0":
            extra.append("Connection: keep-alive")
        self.keep_alive = keep
        self._framing = framing
        fields: Iterable[tuple[str, str]] = headers.items()
        if (status == 204 or status < 200) and "Content-Length" in headers:
            # RFC 9110 §8.6: never on a 204 or 1xx (a lenient app would wait for the bytes)
            fields = [(k, v) for k, v in fields if k.lower() != "content-length"]
        # (each field "name: value" by str.join, in C: no bytecode per field)
        lines = [f"HTTP/1.1 {status} {reason or REASONS.get(status, '')}",
                 *map(": ".join, fields), *extra]
        self._head = _encode_head(lines)

    async def write(self, data: bytes) -> None:
        if not data or self._framing is Framing.NONE:
            return
        conn = self._conn
        transport = conn.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the app closed its connection")
        head, self._head = self._head, b""
        if self._framing is Framing.CHUNKED:
            parts = [head, b"%x\r\n" % len(data), data, CRLF]
            transport.writelines(parts if head else parts[1:])
        elif head:
            transport.writelines((head, data))
        else:
            transport.write(data)
        if conn.write_paused:
            await conn.drain()

    async def finish(self, trailers: list[tuple[str, str]] | None = None) -> None:
        """End the answer; ``trailers`` go out as the chunked body's trailer section (an
        answer framed otherwise has nowhere to carry them: they are dropped)."""
        transport = self._conn.transport
        head, self._head = self._head, b""
        tail = last_chunk(trailers) if self._framing is Framing.CHUNKED else b""
        if head or tail:
            if transport is None or transport.is_closing():
                raise ConnectionResetError("the app closed its connection")
            transport.write(head + tail if tail else head)
        # else the body was all written (an app may hang up as soon as it has all of it)
        self.done = True


def _decode(pairs: list[tuple[bytes, bytes]]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict([
        (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        for name, value in pairs
    ]))


def _encode_head(lines: list[str]) -> bytes:
    text = "\r\n".join(lines)
    # a CR or LF inside a value would end the head early (response splitting): refuse it
    if text.count("\n") != len(lines) - 1 or text.count("\r") != len(lines) - 1:
        raise ValueError("a response header carries a line break")
    return (text + "\r\n\r\n").encode("utf-8", "surrogateescape")


Handler = Callable[[H1Exchange], Awaitable[None]]


class H1Connection(asyncio.Protocol):
    """One app connection (see the module docstring). ``on_close`` is called once, when the
    socket is gone or handed to ``fallback``."""

    def __init__(
        self,
        handler: Handler,
        *,
        limits: H1Limits | None = None,
        metrics: H2Metrics | None = None,
        fallback: Callable[[], asyncio.Protocol] | None = None,
        on_close: Callable[[H1Connection], None] | None = None,
        hangup_cancels: bool = True,
    ) -> None:
        self.handler = handler
        # a reset before the answer began cancels the request (the outbound listener); the
        # inbound listener keeps it running, so the app's slot stays held until the app is
        # done: a reset does not stop the app's work, and a slot given back early would let
        # a caller that resets put any number of requests on the app
        self.hangup_cancels = hangup_cancels
        self.limits = limits or H1Limits()
        self.metrics = metrics
        self.fallback = fallback
        self.on_close = on_close
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self._ips = SocketIps()  # local_ip()
        self.parser = httptools.HttpRequestParser(self)
        self.closing = False  # answer what is in flight, then close
        self._lingering = False  # refused: our answer is out, the rest is read and dropped
        self._broken = False  # a request body broke its framing: the rest is dropped
        self._after_close = False  # bytes came after a request that asked to close: dropped
        self._cut = False  # abort() cut it (a drain's deadline, ...): no hang-up of the app's
        self.write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._untaken_mark: int | None = None  # untaken() as the current drain began
        self._reading_paused = False
        # the request being parsed
        self._in_head = False
        self._head_size = 0  # bytes of the head parsed so far
        self._head_raw = 0  # bytes read while the head was incomplete (a long line in parts)
        self._begun = 0  # requests begun on this connection (a read may begin several)
        self._head_too_large = False
        self._url = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._trailers: list[tuple[bytes, bytes]] = []  # of the body being received
        # bytes read since the body's last byte (chunk framing, extensions, trailers): llhttp
        # buffers an unfinished field line whole, so it is bounded here, by the raw bytes
        self._since_body = 0
        self._receiving: H1Exchange | None = None  # whose body the parser is feeding
        self._upgrade: H1Exchange | None = None
        self._handover = b""
        # the requests to answer, in order
        self._queue: collections.deque[H1Exchange] = collections.deque()
        self._active: H1Exchange | None = None
        self._task: asyncio.Task[None] | None = None  # the connection's worker (_work)
        self._parked: asyncio.Future[H1Exchange | None] | None = None  # it waits on this
        self._next: H1Exchange | None = None  # handed to it as it finishes a request
        # one timer: _phase says what it guards ("idle", "head"; None: a request is served)
        self._phase: str | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple | list) and peer:
            self.remote = str(peer[0])
        self._arm("idle", self.limits.idle_timeout)

    def local_ip(self) -> str:
        """The address the peer reached this listener at ("" unknown; read once)."""
        return self._ips.of(self.transport, "sockname")

    def data_received(self, data: bytes) -> None:
        if self._lingering or self._broken or self._after_close:
            return  # refused, not HTTP any more, or after a close: what still comes is dropped
        upgrade = self._upgrade
        if upgrade is not None:  # bytes after an upgrade's head, until its turn comes
            if upgrade.method == "CONNECT" or self.fallback is None:
                return  # refused in its turn: not HTTP, and nobody will read them
            self._handover += data
            self._update_reading()  # past max_head: paused until the hand-over
            return
        was_in_head = self._in_head
        begun = self._begun
        receiving = self._receiving
        if receiving is not None:
            self._since_body += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._on_upgrade(data[exc.args[0]:] if exc.args else b"")
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, TrailersTooLarge):
                self._reject(431, "trailers-too-large")
                return
            if isinstance(cause, HeadRefused):
                self._reject(cause.status, cause.reason)
                return
            log.exception("HTTP/1.1 connection from %s: parser callback failed", self.remote)
            self._reject(400, "malformed")
            return
        except httptools.HttpParserError as exc:
            if str(exc).startswith(_AFTER_CLOSE):
                # A request asked to close (Connection: close, or HTTP/1.0 without
                # keep-alive) and more bytes followed it: it and the requests before it are
                # answered, the rest is not processed (RFC 9112 §9.6), and the connection
                # lingers after the last answer so that no reset destroys it
                self._after_close = True
                if self._active is None and not self._queue:
                    self._linger()
                return
            if self._head_too_large:
                self._reject(431, "head-too-large")
            else:
                log.debug("HTTP/1.1 connection from %s: %s", self.remote, exc)
                self._reject(400, "malformed")
            return
        if self._in_head:
            # the whole read belongs to this head when it was under way before the read and
            # no request began in it (pipelined requests before it are not this head's)
            if was_in_head and self._begun == begun:
                self._head_raw += len(data)
            if self._head_raw > self.limits.max_head:
                self._head_too_large = True
            elif self._phase != "head" and self._active is None:
                self._arm("head", self.limits.header_timeout)
        if self._head_too_large:
            self._reject(431, "head-too-large")
        elif (self._receiving is not None and self._receiving is receiving
              and self._since_body > self.limits.max_head):
            self._reject(431, "trailers-too-large")  # or endless chunk framing

    def eof_received(self) -> bool | None:
        # the app half-closed: answer what it asked for, then close (no keep-alive)
        self.closing = True
        if self._receiving is not None:
            self._receiving.content.fail(ConnectionResetError("the app ended its request early"))
        return self.busy  # False: nothing to answer, let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self.transport = None
        self._phase = None
        gone = ConnectionResetError("the app closed its connection")
        if self._receiving is not None:
            self._receiving.content.fail(gone)
        active, task = self._active, self._task
        if (active is not None and not self._cut and self._cancels(active)
                and active is not self._receiving and not active.started
                and task is not None and not task.done()):
            active.hung_up = True
            # the socket is gone (a reset) before the answer began: nobody will read it, so
            # the request in flight is cancelled (its upstream attempt with it), as Envoy and
            # nginx do. A half-close is no hang-up (eof_received): that request is answered
            task.cancel()
        self._queue.clear()
        self._release_worker()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(gone)
        self._drain_waiters.clear()
        if self.on_close is not None:
            on_close, self.on_close = self.on_close, None
            on_close(self)

    def _cancels(self, exchange: H1Exchange) -> bool:
        """Whether losing the socket cancels ``exchange`` (its own rule, else the
        connection's)."""
        own = exchange.hangup_cancels
        return self.hangup_cancels if own is None else own

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    async def drain(self) -> None:
        if self.transport is None:
            raise ConnectionResetError("the app closed its connection")
        waiter = self.loop.create_future()
        self._drain_waiters.append(waiter)
        self._untaken_mark = self.untaken()
        await waiter

    def untaken(self) -> int | None:
        """Bytes written to this connection that its reader has not taken yet: the
        transport's buffer and the kernel's send queue (``SIOCOUTQ``); None if unknown."""
        transport = self.transport
        if transport is None:
            return None
        try:
            fd = transport.get_extra_info("socket").fileno()
            queued = struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
            return int(transport.get_write_buffer_size()) + queued
        except (AttributeError, OSError, RuntimeError, ValueError):
            return None

    def reader_moving(self) -> bool:
        """While a write waits for the reader: whether it took at least
        :data:`READER_MIN_TAKEN` bytes of what was written since the wait began (or since
        last asked). A reader that takes a little at a time wakes the writer only once the
        kernel has room for a good part of its buffer, which can take longer than a stall
        bound: this tells that reader from one that stopped, or that takes so little (a
        trickle holding the connection, and an app's slot behind it) that it might as well
        have."""
        if not self._drain_waiters:
            return False
        mark, now = self._untaken_mark, self.untaken()
        if now is None or mark is None or mark - now < READER_MIN_TAKEN:
            return False
        self._untaken_mark = now
        return True

    # ------------------------------------------------------------ llhttp callbacks

    def on_message_begin(self) -> None:
        self._begun += 1
        self._in_head = True
        self._head_size = 0
        self._head_raw = 0
        self._url = b""
        self._raw_headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:  # a chunked body's trailer field (bounded like a head)
            self._trailers.append((name, value))
            self._head_size += len(name) + len(value) + 4
            if self._head_size > self.limits.max_head:
                raise TrailersTooLarge
            return
        self._raw_headers.append((name, value))
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self.limits.max_head:
            self._head_too_large = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_size = 0  # from here on: the trailer section's bytes
        self._trailers = []
        self._since_body = 0
        if self._head_too_large:
            return
        parser = self.parser
        method = parser.get_method().decode("ascii", "replace")
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise HeadRefused(505, "version-not-supported")
        headers = _decode(self._raw_headers)
        hosts = len(headers.getall("Host", ()))
        if hosts > 1 or (hosts == 0 and version == "1.1" and self.limits.require_host):
            raise HeadRefused(400, "malformed")
        if (coding := headers.get("Transfer-Encoding")) is not None \
                and coding.strip().lower() != "chunked":
            # another coding (gzip, chunked) would reach the upstream re-chunked without it:
            # refused, as nginx does
            raise HeadRefused(501, "transfer-coding-not-supported")
        if coding is not None and version == "1.0":
            # RFC 9112 §6.1: faulty framing (a request-smuggling pattern: an HTTP/1.0 peer
            # on the way would read the body by its Content-Length, or to the end)
            raise HeadRefused(400, "malformed")
        chunked = coding is not None  # (only "chunked" is let through above)
        length = headers.get("Content-Length")
        body_exists = chunked or (length is not None and length.strip() != "0")
        expect = (body_exists and version == "1.1"
                  and headers.get("Expect", "").lower() == "100-continue")
        exchange = H1Exchange(self, method, self._url.decode("latin-1"), headers, version,
                              parser.should_keep_alive(), body_exists, expect)
        if parser.should_upgrade():
            self._upgrade = exchange  # handed over once it is its turn (_on_upgrade)
            return
        self._receiving = exchange
        self._queue.append(exchange)
        if self._active is None:
            self._start_next()
        elif len(self._queue) >= MAX_PIPELINED:
            self._update_reading()

    def on_body(self, body: bytes) -> None:
        self._since_body = 0
        receiving = self._receiving
        if receiving is not None:
            receiving.content.feed(body)
            if receiving.content.buffered > BODY_HIGH_WATER:
                self._update_reading()

    def on_message_complete(self) -> None:
        receiving, self._receiving = self._receiving, None
        if receiving is not None:
            if self._trailers:
                receiving.content.trailers = _decode(self._trailers)
                self._trailers = []
            receiving.content.feed_eof()

    # ------------------------------------------------------------ serving in order

    def _start_next(self) -> None:
        if self.transport is None:
            return
        if not self._queue:
            if self._upgrade is not None:
                self._hand_over()
            elif self.closing:
                self.close()
            elif self._in_head:
                self._arm("head", self.limits.header_timeout)
            else:
                self._arm("idle", self.limits.idle_timeout)
            return
        exchange = self._queue.popleft()
        self._active = exchange
        self._phase = None
        parked = self._parked
        if parked is not None and not parked.done():  # the worker waits for this request
            self._parked = None
            parked.set_result(exchange)
        elif self._task is None:
            self._task = self.loop.create_task(self._work(exchange))
        else:  # the worker is finishing the previous request: it takes this one next
            self._next = exchange
        if self._reading_paused:
            self._update_reading()

    async def _work(self, exchange: H1Exchange | None) -> None:
        """The connection's one task: serves its requests one after the other, waiting
        between them (a task per connection, not per request)."""
        task = self._task
        try:
            while exchange is not None:
                if not await self._serve(exchange):
                    return
                if task is None or task.cancelling():
                    return  # a cancellation nobody took back: this task serves no more
                exchange, self._next = self._next, None
                if exchange is None and self.transport is not None:
                    waiting: asyncio.Future[H1Exchange | None] = self.loop.create_future()
                    self._parked = waiting
                    exchange = await waiting
        except asyncio.CancelledError:
            pass  # cut while waiting for the next request (abort)
        finally:
            if self._task is task:
                self._task = None
            left, self._parked = self._parked, None
            if left is not None and not left.done():
                left.cancel()
            pending, self._next = self._next, None
            if pending is not None and self.transport is not None:  # handed over too late
                self._task = self.loop.create_task(self._work(pending))

    def _release_worker(self) -> None:
        """No request will come: a worker waiting for one ends."""
        parked, self._parked = self._parked, None
        if parked is not None and not parked.done():
            parked.set_result(None)

    async def _serve(self, exchange: H1Exchange) -> bool:
        """One request; False once the connection is done for."""
        try:
            await self.handler(exchange)
        except asyncio.CancelledError:
            self.abort()
            self._finished(exchange)
            return False
        except Exception:
            log.exception("HTTP/1.1 request %s %s from %s failed", exchange.method,
                          exchange.raw_path[:200], self.remote)
            if not exchange.started:
                exchange.keep_alive = False
                with contextlib.suppress(Exception):
                    await exchange.answer(Answer(500, b'{"error": "internal error"}'))
            else:
                self.abort()
        self._finished(exchange)
        return self.transport is not None

    def _finished(self, exchange: H1Exchange) -> None:
        self._active = None
        if self.transport is None or self._lingering:  # lingering: its timer closes it
            return
        if exchange.done and not exchange.content.received:
            # answered before its body ended (a refusal, an early answer): the rest is read
            # and dropped for a while, so closing with unread bytes does not reset the
            # connection under the answer
            self._linger()
            return
        if not (exchange.done and exchange.keep_alive and exchange.content.received):
            # an answer cut short, or a body still on its way that nobody will read: the
            # connection is not at a request boundary (or the request asked to close, and
            # bytes after it were dropped unread: lingering, so no reset destroys the answer)
            if self._after_close:
                self._linger()
            else:
                self.close()
            return
        self._start_next()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None:
            return
        receiving = self._receiving
        pause = (len(self._queue) >= MAX_PIPELINED
                 or (receiving is not None and receiving.content.buffered > BODY_HIGH_WATER)
                 or len(self._handover) > self.limits.max_head)
        if pause and not self._reading_paused:
            self._reading_paused = True
            transport.pause_reading()
        elif not pause and self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()

    def body_consumed(self) -> None:
        if self._reading_paused:
            self._update_reading()

    def send_continue(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(CONTINUE)

    # ------------------------------------------------------------ upgrades: aiohttp's

    def _on_upgrade(self, rest: bytes) -> None:
        exchange = self._upgrade
        if exchange is None:
            self._reject(400, "malformed")
            return
        if exchange.method != "CONNECT" and self.fallback is not None:
            lines = [b"%s %s HTTP/%s" % (exchange.method.encode("ascii"), self._url,
                                         exchange.version.encode("ascii"))]
            lines.extend(name + b": " + value for name, value in self._raw_headers)
            self._handover = CRLF.join(lines) + CRLF + CRLF + rest
        # else refused in its turn (_hand_over); what follows the head is not HTTP: dropped
        if self._active is None and not self._queue:
            self._hand_over()

    def _hand_over(self) -> None:
        upgrade = self._upgrade
        if upgrade is not None and (upgrade.method == "CONNECT" or self.fallback is None):
            # a tunnel, which neither listener opens (the outbound routes by Host, the inbound
            # serves one app): 501 once the requests before it are answered, then the close
            self._upgrade = None
            self._handover = b""
            self._reject(501, "connect-not-supported" if upgrade.method == "CONNECT"
                         else "malformed")
            return
        transport, fallback = self.transport, self.fallback
        if transport is None or fallback is None:
            return
        self._cancel_timer()
        self._phase = None
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        data, self._handover = self._handover, b""
        self.transport = None
        self._release_worker()
        if self.on_close is not None:  # first: what it held is free for the next protocol
            on_close, self.on_close = self.on_close, None
            on_close(self)
        protocol = fallback()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if data and not transport.is_closing():
            protocol.data_received(data)

    # ------------------------------------------------------------ defences and ending

    def _arm(self, phase: str, timeout: float) -> None:
        if timeout <= 0:
            self._phase = None
            return
        self._phase = phase
        when = self.loop.time() + timeout
        self._deadline = when
        if self._timer is None or when < self._timer_when:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(when, self._on_timer)
            self._timer_when = when

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self._phase is None or self.transport is None:
            return
        if self.loop.time() < self._deadline:
            self._timer = self.loop.call_at(self._deadline, self._on_timer)
            self._timer_when = self._deadline
            return
        if self._phase == "linger":
            self.close()
            return
        if self._phase == "head":
            self._count_timeout(0)
            log.info("HTTP/1.1 connection from %s: no complete request head within %gs: 408",
                     self.remote, self.limits.header_timeout)
            self._write_error(408, "header-timeout")
            self._linger()
            return
        else:
            self._count_timeout(1)
        self.close()

    def _count_timeout(self, which: int) -> None:
        """0: the head's timeout, 1: the idle one (their labels are the listener's)."""
        if self.metrics is not None:
            self.metrics.listener_timeouts.labels(self.metrics.http1_phases[which]).inc()

    def _reject(self, status: int, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.http1_rejected.labels(reason).inc()
        self._in_head = False
        active = self._active
        if active is not None and active is self._receiving and not active.started:
            # the body being received broke its framing: its handler is told (it answers,
            # 400, which the app can still read), what follows is dropped, and the
            # connection lingers and closes after that answer (_finished)
            self._receiving = None
            self._broken = True
            active.keep_alive = False
            active.content.fail(BrokenBody(f"the request body broke its framing ({reason})"))
            return
        if active is not None:  # an answer in progress would be garbled: just cut
            if not self._cancels(active):
                # the request runs on (the inbound listener: its app slot is held until the
                # app is done, so bad bytes after a request cannot free it early)
                self._broken = True
                self._phase = None
                self._cancel_timer()
                if self.transport is not None:
                    self.transport.abort()
                return
            self.abort()
            return
        self._write_error(status, reason)
        self._linger()

    def _linger(self) -> None:
        """Send what was written and a FIN, then read and drop for up to LINGER seconds: a
        close with unread bytes would reset the connection and lose the error answer."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.closing = self._lingering = True
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
        self._arm("linger", LINGER)

    def _write_error(self, status: int, reason: str) -> None:
        """The listener's own refusal, as JSON with the reason (the metric's label), as the
        proxy's errors are (``reason`` is one of this module's fixed words)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        body = b'{"error": "%s", "reason": "%s"}' % (REASONS.get(status, "").encode(),
                                                     reason.encode())
        transport.write(_encode_head([
            f"HTTP/1.1 {status} {REASONS.get(status, '')}",
            "Content-Type: application/json; charset=utf-8",
            f"Content-Length: {len(body)}", "Connection: close"]) + body)

    def close(self) -> None:
        """Close once what was written is sent."""
        self.closing = True
        self._phase = None
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()

    def shutdown(self) -> None:
        """Graceful end (drain): answer the request in flight with ``Connection: close``,
        close an idle connection now."""
        self.closing = True
        if self._active is None and not self._queue:
            self.close()

    def abort(self) -> None:
        """Cut the connection now; the request in flight is cancelled."""
        self._cut = True
        task = self._task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        self._phase = None
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()

    @property
    def busy(self) -> bool:
        return self._active is not None or bool(self._queue)
