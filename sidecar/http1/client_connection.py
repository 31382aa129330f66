"""One HTTP/1.1 connection from the sidecar to an upstream, and the answer read from it.

Owns the bytes of one keep-alive connection (RFC 9112): writing a request head in one write
and its body with write flow control (``pause_writing`` / ``resume_writing``), parsing the
answer with httptools (llhttp), skipping 1xx interim answers (§15.2 of RFC 9110), handing the
body out as it arrives with read backpressure (reading pauses above a high-water mark and
resumes once the reader took what was buffered), and saying whether the connection may carry
another request once the answer is done. Bodies end by ``Content-Length``, by the last chunk
(whose trailer fields are kept: :attr:`H1Response.trailers`) or by the connection's close;
answers to HEAD and 1xx/204/304 answers have none (RFC 9110 §6.4.1). A chunked request body
ends with the trailer fields its source offers as ``trailers`` once it is exhausted.

Failures are :mod:`sidecar.transport`'s: a connection that closes before any byte of the
answer came back is :class:`UpstreamReset` (nothing was answered: the caller may send an
idempotent request elsewhere); anything after that is a :class:`TransportError`. This module
must not pick or pool connections (:mod:`sidecar.http1.client` does), retry, time anything
(the caller's deadline cancels it) or change a header.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable
from typing import TYPE_CHECKING, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.exchange import SocketIps
from sidecar.http1.trailers import last_chunk
from sidecar.transport import TransportError, UpstreamReset, reset_on_close

if TYPE_CHECKING:
    from sidecar.http1.client import EndpointPool

# the most bytes an answer's head (with any 1xx before it) or its trailers may take; aiohttp's
# client allows 8 KiB per line, and an upstream that sends more is broken or hostile
MAX_HEAD = 64 * 1024
# an idle connection is not reused within this long of the upstream's announced keep-alive
# timeout (``Keep-Alive: timeout=N``): it may close it just as the next request goes out
KEEPALIVE_MARGIN = 1.0


def _codings(value: bytes) -> list[bytes]:
    """A Transfer-Encoding value's codings, lower-cased (RFC 9112 §6.1)."""
    return [c.strip().lower() for c in value.split(b",") if c.strip()]


class MalformedResponse(TransportError):
    """The upstream's bytes are not an HTTP/1.1 answer (or an answer nobody asked for)."""


class BodyCut(TransportError):
    """The connection ended (or was cut) before the body of the answer did."""


class RequestBodyFailed(TransportError):
    """The request's own body could not be sent whole (its source broke or lied about its
    length): the upstream got a truncated request, the connection is cut."""


def _decode(pairs: list[tuple[bytes, bytes]]) -> CIMultiDictProxy[str]:
    # surrogateescape: bytes that are not UTF-8 go back out exactly as they came in
    return CIMultiDictProxy(CIMultiDict(
        [(name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
         for name, value in pairs]
    ))


class H1Response:
    """An answer whose head arrived; it is its own body reader (``content.readany()``).

    ``release()`` hands the connection back to its pool if the whole answer came in and the
    connection may be reused, and closes it otherwise; ``close()`` cuts it. ``trailers``: the
    trailer fields of a chunked body, once the body has ended (None before, or when none).
    """

    __slots__ = ("_buffered", "_chunks", "_conn", "_eof", "_error", "_headers", "_waiter",
                 "reason", "status", "trailers", "wire_fields")

    def __init__(self, conn: UpstreamConnection, status: int, reason: str | None,
                 fields: list[tuple[bytes, bytes]]) -> None:
        self._conn: UpstreamConnection | None = conn
        self.status = status
        self.reason = reason
        self.wire_fields = fields  # the head's fields as parsed (sidecar.forward reads them so)
        self._headers: CIMultiDictProxy[str] | None = None
        self.trailers: CIMultiDictProxy[str] | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def peer_ip(self) -> str:
        """The address this answer came from (its connection's peer; "" once released):
        what the answering sidecar's signed signals must say it was reached at
        (:mod:`wire.signals`)."""
        conn = self._conn
        return conn.peer_ip() if conn is not None else ""

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        """The head's fields, decoded on first use."""
        headers = self._headers
        if headers is None:
            headers = self._headers = _decode(self.wire_fields)
        return headers

    @property
    def content(self) -> H1Response:
        return self

    @property
    def complete(self) -> bool:
        """The whole answer arrived (the reader may not have taken it all yet)."""
        return self._eof

    async def readany(self) -> bytes:
        """What has arrived of the body (all of it, joined), or ``b""`` at its end."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                conn = self._conn
                if conn is not None and conn.reading_paused:
                    conn.resume_reading()
                return data
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finish(reuse=self._eof and self._error is None)

    def close(self) -> None:
        if not self._eof and self._error is None:
            self._error = BodyCut("the answer was closed before its end")
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finish(reuse=False)

    # ------------------------------------------------------------ fed by the connection

    def _feed(self, data: bytes) -> int:
        self._chunks.append(data)
        self._buffered += len(data)
        self._wake()
        return self._buffered

    def _end(self) -> None:
        self._eof = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if not self._eof and self._error is None:
            self._error = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to an endpoint, carrying one request at a time.

    The httptools parser calls the ``on_*`` methods; they fill the current exchange: the
    head's future (``send`` returns it), then the :class:`H1Response`'s body.
    """

    def __init__(self, pool: EndpointPool, high_water: int) -> None:
        self.pool = pool
        self.high_water = high_water
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.reusable = False  # this exchange may be followed by another
        self.idle_since = 0.0
        self.idle_limit: float | None = None  # from the upstream's Keep-Alive header
        self.reading_paused = False
        self._parser = httptools.HttpResponseParser(self)
        self._renew_parser = False
        self._ips = SocketIps()  # peer_ip()
        self._head: asyncio.Future[H1Response] | None = None
        self._response: H1Response | None = None
        self._method = ""
        self._got_bytes = False
        self._head_bytes = 0
        self._feeding = 0  # the bytes of the read being parsed
        self._trailer_bytes = 0
        self._in_trailers = False
        self._interim = False
        self._until_eof = False
        self._reason = b""
        self._fields: list[tuple[bytes, bytes]] = []
        self._trailers: list[tuple[bytes, bytes]] = []
        self._writer: asyncio.Task[None] | None = None
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None

    def peer_ip(self) -> str:
        """The endpoint's address as connected to ("" unknown; read once)."""
        return self._ips.of(self.transport, "peername")

    @property
    def usable(self) -> bool:
        transport = self.transport
        return not self.lost and transport is not None and not transport.is_closing()

    # ------------------------------------------------------------ one exchange

    def send(self, method: str, head: bytes, body: AsyncIterable[bytes] | None,
             length: int | None) -> asyncio.Future[H1Response]:
        """Write the request (the body in a task, so an early answer is not held up behind
        it); returns the future of the answer's head. ``length`` None: the body is chunked."""
        transport = self.transport
        assert transport is not None and self._head is None and self._response is None
        loop = asyncio.get_running_loop()
        head_future: asyncio.Future[H1Response] = loop.create_future()
        self._head = head_future
        self._method = method
        self._got_bytes = False
        self._head_bytes = 0
        self.reusable = False
        transport.write(head)
        if body is not None:
            self._writer = loop.create_task(self._write_body(transport, body, length))
        return head_future

    def finish(self, *, reuse: bool) -> None:
        """The caller is done with the answer: back to the pool, or closed."""
        self._response = None
        writer, self._writer = self._writer, None
        if writer is not None and not writer.done():
            writer.cancel()
            reuse = False
        if reuse and self.reusable and self._head is None and self.usable:
            if self.reading_paused:  # the last bytes of the body went over the mark
                self.resume_reading()
            self.pool.put(self)
        elif self._head is not None:  # abandoned before its answer came
            self.reset()
        else:
            self.abort()

    def abort(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()

    def reset(self) -> None:
        """Cut with a TCP reset rather than a FIN: the request is abandoned, not ended (a
        FIN reads as a half-close, after which a server may still answer; an inbound
        sidecar takes a reset request out of its queue, or drops the app's answer to it)."""
        reset_on_close(self.transport)
        self.abort()

    def _fail(self, exc: BaseException) -> None:
        """The exchange broke: whoever waits for it hears ``exc``; the connection is cut."""
        self.reusable = False
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(exc)
        response = self._response
        if response is not None:
            response._fail(exc)
        if self.transport is not None:
            self.transport.abort()

    async def _write_body(self, transport: asyncio.Transport, body: AsyncIterable[bytes],
                          length: int | None) -> None:
        sent = 0
        try:
            async for chunk in body:
                if not chunk:
                    continue
                if self.lost:
                    return  # connection_lost told the waiters already
                sent += len(chunk)
                if length is None:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                elif sent > length:
                    raise RequestBodyFailed(
                        f"the request body is longer than its Content-Length ({length})")
                else:
                    transport.write(chunk)
                if self._write_paused:
                    await self._drained()
            if self.lost:
                return
            if length is None:  # the last chunk, with the body's trailer fields if it has any
                transport.write(last_chunk(getattr(body, "trailers", None)))
            elif sent != length:
                raise RequestBodyFailed(
                    f"the request body ended after {sent} of its {length} bytes")
        except asyncio.CancelledError:
            raise
        except (TransportError, TimeoutError) as exc:
            self._fail(exc)
        except Exception as exc:  # the body's source broke (e.g. the app hung up)
            self._fail(RequestBodyFailed(f"the request body failed: {exc!r}"))

    async def _drained(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._drain = waiter
        try:
            await waiter
        finally:
            self._drain = None

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a cast, not an isinstance check: uvloop's TCP transport is no asyncio.Transport
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._head is None and self._response is None:
            # an idle connection has nothing to say: whatever this is, it is not ours
            self.reusable = False
            self.pool.forget(self)
            self.abort()
            return
        self._got_bytes = True
        self._feeding = len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(MalformedResponse("the upstream switched protocols unasked (101)"))
        except httptools.HttpParserError as exc:
            cause = exc.__context__  # raised in a callback: its own words
            self._fail(cause if isinstance(cause, MalformedResponse)
                       else MalformedResponse(f"malformed response: {exc}"))
        if self._head is not None:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._fail(MalformedResponse(f"the answer's head is over {MAX_HEAD} bytes"))
        if self._renew_parser:
            # the answer to a HEAD ended with its head, whatever framing it announced: a
            # fresh parser reads the next answer
            self._renew_parser = False
            self._parser = httptools.HttpResponseParser(self)

    def eof_received(self) -> bool:
        return False  # close: an upstream that stops sending is done with this connection

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.reusable = False
        self.pool.forget(self)
        head, self._head = self._head, None
        if head is not None and not head.done():
            detail = f": {exc}" if exc is not None else ""
            if not self._got_bytes:
                head.set_exception(
                    UpstreamReset(f"the connection closed before any answer{detail}"))
            else:
                head.set_exception(MalformedResponse(
                    f"the connection closed in the middle of the answer's head{detail}"))
        response = self._response
        if response is not None:
            if self._until_eof:
                response._end()  # a body delimited by the connection's close
            else:
                response._fail(BodyCut("the connection closed before the body ended"))
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)
        writer = self._writer
        if writer is not None and not writer.done() and writer is not asyncio.current_task():
            writer.cancel()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    def resume_reading(self) -> None:
        self.reading_paused = False
        if self.transport is not None:
            self.transport.resume_reading()

    # ------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        self._fields = []
        self._in_trailers = False
        self._reason = b""

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_trailers:
            self._trailer_bytes += len(name) + len(value)
            if self._trailer_bytes > MAX_HEAD:
                raise MalformedResponse(f"the answer's trailers are over {MAX_HEAD} bytes")
            self._trailers.append((name, value))
        else:
            self._fields.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 100:  # no such status (RFC 9110 §15): a broken answer, not an interim one
            raise MalformedResponse(f"status {status} in the answer's status line")
        if status < 200:  # 100 Continue, 103 Early Hints, ...: the answer is still to come
            self._interim = True
            return
        self._interim = False
        head = self._head
        if head is None or head.done():  # an answer after the caller gave up on this one
            raise MalformedResponse("an answer nobody waits for")
        fields = self._fields
        if self._head_bytes + self._feeding > MAX_HEAD and \
                len(self._reason) + sum(len(n) + len(v) + 4 for n, v in fields) > MAX_HEAD:
            # a head that ends in the bytes of this read, past the cap with them (counted
            # in data_received only while the head is still to come, heads up to twice the
            # cap went through: a stranger's finding)
            raise MalformedResponse(f"the answer's head is over {MAX_HEAD} bytes")
        until_eof, announced = _framing(status, fields, relayed=True)
        self._head = None
        response = H1Response(self, status, self._reason.decode("latin-1") or None, fields)
        self._response = response
        self.reusable = parser.should_keep_alive()
        self._in_trailers = True
        self._trailers = []
        self._trailer_bytes = 0
        if announced is not None:
            self.idle_limit = announced - KEEPALIVE_MARGIN
            if self.idle_limit <= 0:
                self.reusable = False
        if self._method == "HEAD":
            self._renew_parser = True
            self._until_eof = False
            response._end()
        else:
            self._until_eof = until_eof
        head.set_result(response)

    def on_body(self, data: bytes) -> None:
        response = self._response
        if response is None or response._eof:
            self.reusable = False  # body bytes where none belong (e.g. after a HEAD's head)
            return
        if response._feed(data) > self.high_water and not self.reading_paused:
            self.reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        response = self._response
        if response is None or response._eof:
            return
        if self._trailers:
            response.trailers = _decode(self._trailers)
        response._end()


# The fields _framing reads, by name as spelled on the wire (a table of the short spellings
# seen, bounded: a flood of made-up names fills it once, then they are lower-cased each time).
_OTHER, _LENGTH, _CODING, _KEEP_ALIVE = range(4)
_FRAMING_FIELDS = {b"content-length": _LENGTH, b"transfer-encoding": _CODING,
                   b"keep-alive": _KEEP_ALIVE}
_FRAMING_CACHE_SIZE = 1024
_framing_kinds: dict[bytes, int] = {}


def _framing(status: int, fields: list[tuple[bytes, bytes]],
             relayed: bool = False) -> tuple[bool, float | None]:
    """Whether an answer's body ends only with the connection (RFC 9112 §6.3 item 8), and the
    idle timeout the upstream announced in ``Keep-Alive: timeout=N`` (RFC 2068 §19.7.1.1).
    ``relayed``: the answer is to be relayed, so a transfer coding other than chunked alone
    raises :class:`MalformedResponse` (the body would go on re-chunked without its other
    coding: corrupt); checked in the same pass over the fields."""
    until_eof = status not in (204, 304)
    announced: float | None = None
    kinds = _framing_kinds
    for name, value in fields:
        kind = kinds.get(name)
        if kind is None:
            kind = _FRAMING_FIELDS.get(name.lower(), _OTHER)
            if len(kinds) < _FRAMING_CACHE_SIZE and len(name) <= 64:
                kinds[name] = kind
        if kind == _OTHER:
            continue
        if kind == _LENGTH:
            until_eof = False
        elif kind == _CODING:
            if relayed and _codings(value) != [b"chunked"]:
                raise MalformedResponse(
                    f"transfer coding {value.decode('latin-1')!r} is not relayed")
            if value.lower().rstrip().endswith(b"chunked"):
                until_eof = False
        else:  # Keep-Alive
            for part in value.split(b","):
                key, _, number = part.partition(b"=")
                number = number.strip()
                if key.strip().lower() == b"timeout" and number.isdigit() and len(number) < 10:
                    announced = float(number)
    return until_eof, announced
