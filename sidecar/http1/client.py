"""The production upstream transport: HTTP/1.1 over a keep-alive pool per endpoint.

Owns how the sidecar's requests leave for an endpoint or the local app
(:class:`sidecar.transport.Transport`): a pool of idle connections per endpoint ``(host,
port)`` (IPv4, ``[IPv6]`` literals and names), reused last-in first-out so the fewest stay warm,
and closed after ``keepalive_timeout`` idle by one timer per pool (one whose upstream announced
a shorter ``Keep-Alive: timeout=N`` is not reused within a second of it); a new connection within
``connect_timeout`` (:class:`ConnectTimeout`, or :class:`ConnectError` when refused or
unresolvable: nothing was sent); the request head serialised in one write with exactly the
headers given plus the framing (``Content-Length`` as given, else ``Transfer-Encoding:
chunked`` for a body; ``Host`` from the URL only when the caller gave none, as HTTP/1.1
requires it). The bytes of one exchange are :mod:`sidecar.http1.client_connection`'s.

It never re-sends a request on its own: a reused connection the upstream had closed shows up as
:class:`UpstreamReset` (nothing answered), and whether to try another endpoint is the
listener's decision, as are routing, deadlines and header rules. WebSockets (and any scheme
other than ``http``) are dialled through an :class:`AiohttpTransport` opened on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterable

import aiohttp

from sidecar.forward import CHUNK_SIZE
from sidecar.http1.client_connection import UpstreamConnection
from sidecar.transport import (
    KEEPALIVE_TIMEOUT,
    AiohttpTransport,
    ConnectError,
    ConnectTimeout,
    TransportError,
    UpstreamRequest,
    UpstreamResponse,
    local_address,
)
from sidecar.websocket import DEFAULT_MAX_MESSAGE

HIGH_WATER = 2 * CHUNK_SIZE  # body bytes buffered per answer before reading pauses


class EndpointPool:
    """The idle connections to one endpoint, newest last; one timer closes the stale ones
    (those idle for the transport's keep-alive timeout; one the upstream announced a shorter
    timeout for is dropped when it comes up instead)."""

    __slots__ = ("_timer", "authority", "closed", "host", "idle", "keepalive", "port")

    def __init__(self, host: str, port: int, keepalive: float) -> None:
        self.host = host
        self.port = port
        self.authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.keepalive = keepalive
        self.idle: deque[UpstreamConnection] = deque()
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None

    def take(self) -> UpstreamConnection | None:
        """The most recently used idle connection that is still open, if any."""
        idle = self.idle
        now: float | None = None
        while idle:
            conn = idle.pop()
            if not conn.usable:
                continue
            limit = conn.idle_limit
            if limit is not None:  # the upstream said how long it keeps an idle connection
                if now is None:
                    now = asyncio.get_running_loop().time()
                if now - conn.idle_since >= limit:
                    conn.abort()
                    continue
            return conn
        return None

    def put(self, conn: UpstreamConnection) -> None:
        if self.closed:  # the transport closed while this answer was being read
            conn.abort()
            return
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        self.idle.append(conn)
        if self._timer is None:
            self._timer = loop.call_at(conn.idle_since + self.keepalive, self._expire)

    def forget(self, conn: UpstreamConnection) -> None:
        """A connection closed (or misbehaved) while idle: it is no longer offered."""
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def _expire(self) -> None:
        self._timer = None
        idle = self.idle
        if not idle:
            return
        loop = asyncio.get_running_loop()
        stale = loop.time() - self.keepalive
        while idle and idle[0].idle_since <= stale:
            idle.popleft().abort()
        if idle:
            self._timer = loop.call_at(idle[0].idle_since + self.keepalive, self._expire)

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self.idle:
            self.idle.pop().abort()


class H1Transport:
    """Sends requests over pooled HTTP/1.1 connections (see the module docstring).

    ``high_water``: body bytes an answer buffers before the socket stops being read, so a slow
    reader never makes the sidecar hold a whole body.
    """

    def __init__(
        self,
        *,
        connect_timeout: float,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        high_water: int = HIGH_WATER,
        source_address: str | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.source_address = source_address  # None: the kernel picks (sidecar.config)
        self.keepalive_timeout = keepalive_timeout
        self.high_water = high_water
        self._pools: dict[tuple[str, int], EndpointPool] = {}
        self._dialer: AiohttpTransport | None = None
        self.websocket_max_message = DEFAULT_MAX_MESSAGE  # bytes of one upstream message
        self._closed = False

    async def start(self) -> None:
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        if self._dialer is not None:
            dialer, self._dialer = self._dialer, None
            await dialer.close()

    def idle_connections(self) -> int:
        """Idle pooled connections over all endpoints (what the pool holds right now)."""
        return sum(len(pool.idle) for pool in self._pools.values())

    async def _aiohttp(self) -> AiohttpTransport:
        if self._dialer is None:
            self._dialer = AiohttpTransport(
                connect_timeout=self.connect_timeout, keepalive_timeout=self.keepalive_timeout,
                source_address=self.source_address)
            self._dialer.websocket_max_message = self.websocket_max_message
            await self._dialer.start()
        return self._dialer

    async def handle_request(self, request: UpstreamRequest) -> UpstreamResponse:
        url = request.url
        if url.scheme != "http":
            return await (await self._aiohttp()).handle_request(request)
        if self._closed:
            raise ConnectError("the transport is closed")
        host = url.raw_host or ""
        port = url.port or 80
        pool = self._pools.get((host, port))
        if pool is None:
            pool = self._pools[(host, port)] = EndpointPool(host, port, self.keepalive_timeout)
        head, length = request_head(request, pool)
        conn = pool.take()
        if conn is None:
            conn = await self._connect(pool)
        try:
            return await conn.send(request.method, head, request.body, length)
        except BaseException:
            conn.finish(reuse=False)
            raise

    async def _connect(self, pool: EndpointPool) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        conn = UpstreamConnection(pool, self.high_water)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(
                    lambda: conn, pool.host, pool.port,
                    local_addr=local_address(self.source_address, pool.host))
        except TimeoutError as exc:
            raise ConnectTimeout(
                f"connecting to {pool.authority} took over {self.connect_timeout:g} s") from exc
        except OSError as exc:
            raise ConnectError(
                f"cannot connect to {pool.authority}: {exc.strerror or exc}") from exc
        return conn

    async def open_websocket(self, request: UpstreamRequest) -> aiohttp.ClientWebSocketResponse:
        return await (await self._aiohttp()).open_websocket(request)


def request_head(request: UpstreamRequest, pool: EndpointPool) -> tuple[bytes, int | None]:
    """The request head's bytes, and the body's length (None: chunked, or no body)."""
    headers = request.headers
    url = request.url
    fields: Iterable[tuple[str, str]] = headers.items()
    if "Transfer-Encoding" in headers:  # the framing is this transport's
        fields = [(name, value) for name, value in fields
                  if name.lower() != "transfer-encoding"]
    # (each field "name: value" by str.join, in C: no bytecode per field)
    lines = [f"{request.method} {url.raw_path_qs or '/'} HTTP/1.1", *map(": ".join, fields)]
    if "Host" not in headers:
        default_port = url.port == 80 or url.port is None
        lines.append(f"Host: {pool.host if ':' not in pool.host else f'[{pool.host}]'}"
                     f"{'' if default_port else f':{pool.port}'}")
    length: int | None = None
    if request.body is not None:
        given = headers.get("Content-Length")
        if given is None:
            lines.append("Transfer-Encoding: chunked")
        elif given.isdigit() and given.isascii():
            length = int(given)
        else:
            raise TransportError(f"the request's Content-Length {given[:32]!r} is not a number")
    head = "\r\n".join(lines) + "\r\n\r\n"
    # a field value with a line break in it would smuggle a header or a request in
    breaks = len(lines) + 1
    if head.count("\n") != breaks or head.count("\r") != breaks:
        raise TransportError("a request header has a line break in it")
    return head.encode("utf-8", "surrogateescape"), length
