"""The upstream transport: the one seam between a listener's request path and the network.

Owns how a request leaves the sidecar for an upstream (an endpoint, for the outbound
listener; the local app, for the inbound one) and how the answer comes back. A transport has
one method, ``handle_request(request) -> response`` (httpx's transports are the model):
:class:`UpstreamRequest` is the method, URL, headers and a streamed body; an
:class:`UpstreamResponse` is the status, headers, a streamed body (``content.readany()``) and
``release()`` / ``close()`` (back to the pool / cut the connection). The production one is
:class:`sidecar.http1.client.H1Transport` (HTTP/1.1 on asyncio protocols and httptools); here:

- :class:`AiohttpTransport`: an aiohttp client session (keep-alive pool, connect timeout, no
  cookies, no automatic headers or decompression, no environment proxies), with aiohttp's
  hidden same-endpoint re-send switched off. ``H1Transport`` keeps one to dial WebSockets
  (:class:`WebSocketDialer`) and for any scheme but ``http``.
- :class:`MemoryTransport`, which awaits an async handler function instead of the network:
  unit tests, the simulator and the benchmarks stand in for upstreams with it, and drive the
  real proxy, not a mock of it.

Failures come out in this module's terms whatever the implementation: a
:class:`TransportError` subclass, or ``TimeoutError``; :func:`classify` says what each means
for the app's answer and whether the attempt may be retried. This module must not route,
retry, bound a request's time, or change headers: those are the listeners'
(:mod:`sidecar.outbound`, :mod:`sidecar.inbound`) and :mod:`sidecar.forward`'s.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import aiohttp
from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar.errors import ErrorReason
from sidecar.forward import CHUNK_SIZE, BodyReader, without
from sidecar.websocket import DEFAULT_MAX_MESSAGE, WS_HANDSHAKE_HEADERS, requested_protocols

# headers aiohttp would add on its own; a proxy sends only what the app sent
CLIENT_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
KEEPALIVE_TIMEOUT = 30.0


# ---------------------------------------------------------------- request and response


@dataclass(slots=True)
class UpstreamRequest:
    """One request to send: ``url`` is absolute and already encoded; ``body`` is streamed
    (None: no body)."""

    method: str
    url: URL
    headers: CIMultiDict[str]
    body: AsyncIterable[bytes] | None = None


class UpstreamResponse(Protocol):
    """An answer whose head has arrived; the body is read from ``content`` as it comes.

    The caller calls ``release()`` when done (the connection may be reused) or ``close()``
    when it gives up half-way (the connection is cut). aiohttp's ``ClientResponse`` is one.
    An implementation that reads trailer fields (a chunked HTTP/1.1 body's) exposes them as
    ``trailers`` once the body has ended (``getattr(response, "trailers", None)``).
    """

    @property
    def status(self) -> int: ...

    @property
    def reason(self) -> str | None: ...

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def content(self) -> BodyReader: ...

    def release(self) -> object: ...

    def close(self) -> None: ...


class Transport(Protocol):
    """Sends a request upstream and returns the answer once its head arrived.

    Raises :class:`TransportError` (or a subclass) when the attempt failed, ``TimeoutError``
    if an implementation's own timer ran out; never hangs beyond its connect timeout before
    the request is out (bounding the wait for the answer is the caller's job).
    """

    async def handle_request(self, request: UpstreamRequest) -> UpstreamResponse: ...


@runtime_checkable
class WebSocketDialer(Protocol):
    """A transport that can also open a WebSocket to the upstream (same errors, plus
    :class:`HandshakeRefused`). ``request.headers`` may still carry the caller's handshake
    headers: the dialer makes its own handshake and offers the caller's subprotocols."""

    async def open_websocket(self, request: UpstreamRequest) -> aiohttp.ClientWebSocketResponse:
        ...


UPGRADE_ANSWER_MAX = 64 * 1024  # bytes of a refused upgrade's body relayed (more: none)


async def _answer_refused_upgrades(
    request: aiohttp.ClientRequest,
    handler: Callable[[aiohttp.ClientRequest], Awaitable[aiohttp.ClientResponse]],
) -> aiohttp.ClientResponse:
    """A WebSocket handshake the upstream answers with anything but 101 is raised here as
    :class:`HandshakeRefused`, with the answer: before aiohttp's ``ws_connect`` would follow
    a redirect to wherever it points (it has no switch for that), and so that the caller gets
    the answer, not a 502."""
    response = await handler(request)
    if response.status == 101 or hdrs.UPGRADE not in request.headers:
        return response
    chunks: list[bytes] = []
    size, broken = 0, False
    try:
        while size <= UPGRADE_ANSWER_MAX and not response.content.at_eof():
            chunk = await response.content.read(UPGRADE_ANSWER_MAX + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except (aiohttp.ClientError, OSError):
        broken = True
    finally:
        response.release()
    # not whole (broken off, or longer than the limit): the head alone
    body = b"" if broken or size > UPGRADE_ANSWER_MAX else b"".join(chunks)
    raise HandshakeRefused(response.status, response.headers, body)


# ---------------------------------------------------------------- failures


def local_address(source: str | None, host: str) -> tuple[str, int] | None:
    """``local_addr`` for a connection to ``host`` from the sidecar's configured source
    address (``source_address``: the address its connections to endpoints leave from, as
    Envoy's ``upstream_bind_config``, HAProxy's ``source`` or nginx's ``proxy_bind``): None
    without one, and None for an IP literal of the other family (an IPv4 source cannot reach
    an IPv6 endpoint); a name is resolved with the source's family preferred by asyncio."""
    if source is None:
        return None
    try:
        target = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return (source, 0)
    return (source, 0) if target.version == ipaddress.ip_address(source).version else None


def reset_on_close(transport: Any) -> None:
    """Make closing ``transport`` send a TCP reset (SO_LINGER 0) rather than a FIN: the
    connection is abandoned, not ended (a FIN reads as the peer's clean end)."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    with contextlib.suppress(AttributeError, OSError, ValueError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class TransportError(Exception):
    """An attempt failed; the upstream may have received (part of) the request."""


class ConnectError(TransportError):
    """No connection to the endpoint could be made: nothing was sent."""


class ConnectTimeout(ConnectError):
    """The connection was not established within the connect timeout: nothing was sent."""


class UpstreamReset(TransportError):
    """The connection was closed or reset before any of the answer came back."""


class HandshakeRefused(TransportError):
    """The upstream answered a WebSocket upgrade with ``status`` instead of 101: its answer
    (``headers``, and ``body`` when it came whole within :data:`UPGRADE_ANSWER_MAX`) goes
    back to the caller as it is, as nginx, HAProxy and Envoy relay it (a 401 with its
    ``WWW-Authenticate``, a redirect the client may follow, ...)."""

    def __init__(self, status: int, headers: Any = None, body: bytes = b"") -> None:
        super().__init__(f"upstream answered the upgrade with {status}")
        self.status = status
        self.headers = headers  # the answer's header map (None when unknown)
        self.body = body


@dataclass(frozen=True, slots=True)
class AttemptFailure:
    """Why one attempt failed, and whether anything may have reached the upstream's app."""

    reason: ErrorReason
    status: int
    nothing_received: bool
    detail: str


def classify(exc: BaseException) -> AttemptFailure:
    """What a failed attempt means: the error reason and HTTP status for the app, and whether
    the upstream's app can have seen the request (only if not may it be re-sent)."""
    if isinstance(exc, ConnectTimeout):
        return AttemptFailure(ErrorReason.CONNECT_TIMEOUT, 502, True,
                              str(exc) or "connect timed out")
    if isinstance(exc, ConnectError):
        return AttemptFailure(ErrorReason.CONNECT_ERROR, 502, True, str(exc))
    if isinstance(exc, TimeoutError):
        return AttemptFailure(ErrorReason.UPSTREAM_TIMEOUT, 504, False, "no response head in time")
    if isinstance(exc, UpstreamReset):
        return AttemptFailure(ErrorReason.UPSTREAM_RESET, 502, True, str(exc) or "connection reset")
    return AttemptFailure(ErrorReason.UPSTREAM_PROTOCOL_ERROR, 502, False,
                          str(exc) or type(exc).__name__)


def from_aiohttp(exc: BaseException) -> TransportError | TimeoutError:
    """aiohttp's (or the socket's) exception in this module's terms, with the same meaning.

    A timeout other than the connect timeout stays a ``TimeoutError``.
    """
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return ConnectTimeout(str(exc))
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ConnectError(str(exc))
    if isinstance(exc, TimeoutError):
        return exc
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return UpstreamReset(str(exc))
    return TransportError(str(exc) or type(exc).__name__)


# What reading an UpstreamResponse's content may raise: AiohttpTransport hands out aiohttp's
# own stream (no wrapper per chunk on the hot path), so its errors are aiohttp's.
BODY_READ_ERRORS: tuple[type[BaseException], ...] = (
    TransportError, aiohttp.ClientError, TimeoutError,
)


# ---------------------------------------------------------------- aiohttp


class AiohttpTransport:
    """A transport on one aiohttp client session, opened by :meth:`start`.

    ``connect_timeout`` bounds the TCP connect; nothing bounds the whole request here (the
    caller wraps the call in its own deadline). aiohttp silently re-sends an idempotent request
    once, to the SAME endpoint, after a reset; the listeners' retries are explicit, budgeted
    and go to another endpoint instead (linkerd2#11669), so that re-send is switched off
    (aiohttp has no public switch for it).
    """

    def __init__(
        self,
        *,
        connect_timeout: float,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        read_bufsize: int = CHUNK_SIZE,
        source_address: str | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.source_address = source_address
        self.keepalive_timeout = keepalive_timeout
        self.websocket_max_message = DEFAULT_MAX_MESSAGE  # bytes of one upstream message
        self.read_bufsize = read_bufsize
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is not None:
            return
        session = aiohttp.ClientSession(
            middlewares=(_answer_refused_upgrades,),
            connector=aiohttp.TCPConnector(
                limit=0, keepalive_timeout=self.keepalive_timeout, ttl_dns_cache=10,
                # one connector for every endpoint: bound to the source whatever the target
                local_addr=(self.source_address, 0) if self.source_address else None,
            ),
            auto_decompress=False,
            skip_auto_headers=CLIENT_AUTO_HEADERS,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            timeout=aiohttp.ClientTimeout(
                total=None, connect=self.connect_timeout, sock_connect=self.connect_timeout
            ),
        )
        if hasattr(session, "_retry_connection"):
            session._retry_connection = False
        self._session = session

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("AiohttpTransport.start() was not awaited")
        return self._session

    async def handle_request(self, request: UpstreamRequest) -> aiohttp.ClientResponse:
        session = self.session
        try:
            return await session.request(
                request.method,
                request.url,
                headers=request.headers,
                data=request.body,
                allow_redirects=False,
                read_bufsize=self.read_bufsize,
            )
        except (aiohttp.ClientError, OSError) as exc:
            error = from_aiohttp(exc)
            if error is exc:
                raise
            raise error from exc

    async def open_websocket(self, request: UpstreamRequest) -> aiohttp.ClientWebSocketResponse:
        session = self.session
        try:
            return await session.ws_connect(
                request.url,
                method=request.method,
                headers=without(request.headers, WS_HANDSHAKE_HEADERS),
                protocols=requested_protocols(request.headers),
                max_msg_size=self.websocket_max_message,  # larger: closed with 1009
                autoclose=False,
            )
        except aiohttp.WSServerHandshakeError as exc:  # a 101 whose handshake is wrong
            raise HandshakeRefused(exc.status) from exc
        except (aiohttp.ClientError, OSError) as exc:
            error = from_aiohttp(exc)
            if error is exc:
                raise
            raise error from exc


# ---------------------------------------------------------------- in memory


class MemoryBody:
    """A response body from bytes or from an async iterable of chunks (empty chunks are
    skipped; an exception raised by the iterable comes out of ``readany``, as a broken
    connection would)."""

    __slots__ = ("_chunks", "_stream")

    def __init__(self, body: bytes | AsyncIterable[bytes]) -> None:
        self._chunks: list[bytes] | None = None
        self._stream: AsyncIterator[bytes] | None = None
        if isinstance(body, bytes | bytearray | memoryview):
            self._chunks = [bytes(body)] if body else []
        else:
            self._stream = aiter(body)

    async def readany(self) -> bytes:
        if self._stream is None:
            assert self._chunks is not None
            return self._chunks.pop(0) if self._chunks else b""
        async for chunk in self._stream:
            if chunk:
                return bytes(chunk)
        return b""


class MemoryResponse:
    """An :class:`UpstreamResponse` built by hand (what a :class:`MemoryTransport`'s handler
    returns); ``released`` / ``closed`` record how the caller finished with it; ``trailers``
    stand in for a chunked body's trailer fields."""

    __slots__ = ("closed", "content", "headers", "reason", "released", "status", "trailers")

    def __init__(
        self,
        status: int = 200,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        body: bytes | AsyncIterable[bytes] = b"",
        *,
        reason: str | None = None,
        trailers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict(headers or ()))
        self.trailers: CIMultiDictProxy[str] | None = (
            CIMultiDictProxy(CIMultiDict(trailers)) if trailers is not None else None)
        self.content: BodyReader = MemoryBody(body)
        self.released = False
        self.closed = False

    def release(self) -> None:
        self.released = True

    def close(self) -> None:
        self.closed = True


MemoryHandler = Callable[[UpstreamRequest], Awaitable[MemoryResponse]]


class MemoryTransport:
    """A transport that awaits ``handler(request)`` instead of opening a connection.

    The handler plays every upstream: it may look at ``request.url`` to tell endpoints apart,
    read ``request.body``, wait, return a :class:`MemoryResponse`, or raise what a network
    would (:class:`ConnectError` for a dead endpoint, :class:`UpstreamReset`, ...). No
    WebSockets: a listener given this transport refuses upgrades.
    """

    __slots__ = ("handler",)

    def __init__(self, handler: MemoryHandler) -> None:
        self.handler = handler

    async def handle_request(self, request: UpstreamRequest) -> MemoryResponse:
        return await self.handler(request)
