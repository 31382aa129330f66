"""The sidecar's HTTP/2 (h2c) connections to endpoints: a small multiplexed pool per endpoint.

Owns the upstream side of forwarding over HTTP/2: opening prior-knowledge h2c connections to
an endpoint (``http://HOST:PORT``) within the connect timeout, keeping up to
``max_connections`` of them per endpoint, and placing each new stream on a connection that
has room under the peer's ``SETTINGS_MAX_CONCURRENT_STREAMS`` (RFC 9113 §5.1.2); when every
connection is full a caller waits for a slot (its own deadline bounds the wait). A connection
that got GOAWAY or lost its socket takes no new streams and leaves the pool.

Errors keep the one distinction retries need: :class:`H2ConnectError` means nothing was sent
(no connection could be had), every later failure is a :class:`StreamGone`. Routing,
retrying and gRPC are :mod:`sidecar.h2_proxy`'s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import h2.config
import h2.connection
import h2.events
from h2.errors import ErrorCodes

from sidecar.exchange import SocketIps, socket_ip
from sidecar.h2_connection import (
    H2_ERRORS,
    HEADER_LIST_HARD_LIMIT,
    MAX_HEADER_LIST,
    H2Connection,
    H2Stream,
    Headers,
    StreamGone,
    header_list_size,
)
from sidecar.transport import local_address

log = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS = 4
MAX_STREAMS_PER_CONNECTION = 1000  # whatever larger number the endpoint allows


class H2ConnectError(Exception):
    """No connection to the endpoint could be had: nothing of the request was sent."""


class H2NotSpoken(H2ConnectError):
    """The endpoint answered the HTTP/2 preface in HTTP/1.x: it does not speak h2c. No fault
    of the endpoint for its HTTP/1.1 callers: the upstream cannot take HTTP/2 calls."""


class ClientStream(H2Stream):
    """A request stream the sidecar opened; the response head arrives in ``head``."""

    __slots__ = ("head", "head_ended")

    def __init__(self, conn: H2Connection, stream_id: int) -> None:
        super().__init__(conn, stream_id)
        self.head: asyncio.Future[Headers] = asyncio.get_running_loop().create_future()
        self.head_ended = False  # the head carried END_STREAM: a trailers-only answer

    def peer_ip(self) -> str:
        """The endpoint's address as connected to ("" unknown): what its sidecar's signed
        signals must say it was reached at (:mod:`wire.signals`)."""
        conn = self._conn
        if isinstance(conn, H2ClientConnection):
            return conn.peer_ip()
        return socket_ip(conn.transport, "peername")

    def _gone(self, exc: StreamGone) -> None:
        super()._gone(exc)
        if not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()  # retrieved: a caller that left early is no error


class H2ClientConnection(H2Connection):
    """One h2c connection to an endpoint."""

    def __init__(self, pool: H2Pool) -> None:
        super().__init__(client_side=True)
        self.pool = pool
        self.settings_seen = asyncio.Event()  # the endpoint's first SETTINGS arrived
        self.speaks_http1 = False  # it answered the preface with an HTTP/1.x status line
        self._ips = SocketIps()  # peer_ip()

    def peer_ip(self) -> str:
        """The endpoint's address as connected to ("" unknown; read once)."""
        return self._ips.of(self.transport, "peername")

    def data_received(self, data: bytes) -> None:
        if not self.settings_seen.is_set() and data[:7] == b"HTTP/1.":
            self.speaks_http1 = True
        super().data_received(data)

    def new_state_machine(self, config: h2.config.H2Configuration) -> h2.connection.H2Connection:
        machine = h2.connection.H2Connection(config=config)
        machine.decoder.max_header_list_size = HEADER_LIST_HARD_LIMIT  # see dispatch
        return machine

    @property
    def usable(self) -> bool:
        return not self.ending and self.goaway_received is None

    def room(self) -> int:
        """Streams this connection may still open (its SETTINGS are known: see _connect)."""
        limit = self.conn.remote_settings.max_concurrent_streams
        return min(limit, MAX_STREAMS_PER_CONNECTION) - len(self.streams)

    def open_stream(self, headers: Headers, end_stream: bool) -> ClientStream:
        stream_id = self.conn.get_next_available_stream_id()
        stream = ClientStream(self, stream_id)
        self.streams[stream_id] = stream
        try:
            stream.send_headers(headers, end_stream)
        except StreamGone:
            self.streams.pop(stream_id, None)
            raise
        return stream

    def other_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if isinstance(stream, ClientStream) and not stream.head.done():
                stream.head_ended = event.stream_ended is not None
                stream.head.set_result(list(event.headers))
        # InformationalResponseReceived (1xx): nothing to relay for gRPC; dropped

    def dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self.settings_seen.set()
        elif (isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived)
              and header_list_size(event.headers) > MAX_HEADER_LIST):
            # over what we announced: that stream fails alone, the connection goes on
            stream = self.streams.get(event.stream_id)
            log.info("%s:%d: stream %d: header block over %d bytes refused", self.pool.host,
                     self.pool.port, event.stream_id, MAX_HEADER_LIST)
            if stream is not None:
                self.reset(stream, ErrorCodes.PROTOCOL_ERROR)
            return
        super().dispatch(event)

    def settings_changed(self) -> None:
        self.pool.slot_freed()

    def terminated(self, event: h2.events.ConnectionTerminated) -> None:
        # Streams above the last one the endpoint processed were not processed (§6.8).
        last = event.last_stream_id or 0
        for stream_id, stream in list(self.streams.items()):
            if stream_id > last:
                del self.streams[stream_id]
                stream._gone(StreamGone(ErrorCodes.REFUSED_STREAM, "endpoint sent GOAWAY"))
        self.pool.forget(self)
        if not self.streams and self.transport is not None:
            self.transport.close()

    def stream_closed(self, stream: H2Stream) -> None:
        if self.goaway_received is not None and not self.streams and self.transport is not None:
            self.transport.close()
        self.pool.slot_freed()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.pool.forget(self)


class H2Pool:
    """The h2c connections to one endpoint."""

    def __init__(self, host: str, port: int, *, connect_timeout: float,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 source_address: str | None = None) -> None:
        self.host, self.port = host, port
        self.connect_timeout = connect_timeout
        self.source_address = source_address
        self.max_connections = max_connections
        self.connections: list[H2ClientConnection] = []
        self._connecting = 0
        self._slot = asyncio.Event()

    def open_ready(self, headers: Headers, end_stream: bool) -> ClientStream | None:
        """A new stream carrying ``headers`` on a connection with room now, or None (nothing
        sent): :meth:`open_stream` without waiting, and so without a timeout to arm."""
        for conn in self.connections:
            if conn.usable and conn.room() > 0:
                try:
                    return conn.open_stream(headers, end_stream)
                except H2_ERRORS as exc:  # e.g. the stream ids ran out
                    log.info("%s:%d: cannot open a stream: %s", self.host, self.port, exc)
                    self.forget(conn)
                    conn.close()
        return None

    async def open_stream(self, headers: Headers, end_stream: bool) -> ClientStream:
        """A new stream carrying ``headers`` on a connection with room; raises
        :class:`H2ConnectError` when no connection could be had (nothing sent)."""
        while True:
            if (stream := self.open_ready(headers, end_stream)) is not None:
                return stream
            if len(self.connections) + self._connecting < self.max_connections:
                conn = await self._connect()
                if conn.room() > 0:
                    return conn.open_stream(headers, end_stream)
                continue
            self._slot.clear()
            await self._slot.wait()

    async def _connect(self) -> H2ClientConnection:
        loop = asyncio.get_running_loop()
        self._connecting += 1
        conn: H2ClientConnection | None = None
        try:
            # Connected means: the endpoint's SETTINGS arrived, so its stream limit is known
            # before any stream is opened (until then only the preface was sent).
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: H2ClientConnection(self), self.host, self.port,
                    local_addr=local_address(self.source_address, self.host))
                lost = asyncio.ensure_future(conn.lost.wait())
                settings = asyncio.ensure_future(conn.settings_seen.wait())
                try:
                    await asyncio.wait((lost, settings), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    lost.cancel()
                    settings.cancel()
                if not conn.settings_seen.is_set():
                    if conn.speaks_http1:
                        raise H2NotSpoken(f"{self.host}:{self.port} answered the HTTP/2 "
                                          "preface in HTTP/1.1: it does not speak h2c")
                    raise ConnectionResetError("closed before its SETTINGS")
        except H2NotSpoken:
            if conn is not None:
                conn.close()
            raise
        except (OSError, TimeoutError) as exc:
            if conn is not None:
                conn.close()
            reason = "connect timeout" if isinstance(exc, TimeoutError) else str(exc)
            raise H2ConnectError(f"{self.host}:{self.port}: {reason}") from exc
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        finally:
            self._connecting -= 1
        self.connections.append(conn)
        self._slot.set()  # callers waiting for room may use it too
        return conn

    def slot_freed(self) -> None:
        self._slot.set()

    def forget(self, conn: H2ClientConnection) -> None:
        if conn in self.connections:
            self.connections.remove(conn)
        self._slot.set()

    def close(self) -> None:
        for conn in list(self.connections):
            conn.close()
        self.connections.clear()


class H2Upstreams:
    """One :class:`H2Pool` per endpoint URL (``http://HOST:PORT``), made on first use."""

    def __init__(self, *, connect_timeout: float,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 source_address: str | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self.source_address = source_address
        self._pools: dict[str, H2Pool] = {}

    def pool(self, endpoint: str) -> H2Pool:
        pool = self._pools.get(endpoint)
        if pool is None:
            host, port = endpoint_address(endpoint)
            pool = self._pools[endpoint] = H2Pool(
                host, port, connect_timeout=self.connect_timeout,
                max_connections=self.max_connections, source_address=self.source_address)
        return pool

    def retain(self, endpoints: Iterable[str]) -> None:
        """Close the pools of endpoints no longer in use, once their streams are done."""
        keep = set(endpoints)
        for endpoint in [e for e in self._pools if e not in keep]:
            if not any(conn.streams for conn in self._pools[endpoint].connections):
                self._pools.pop(endpoint).close()

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


def endpoint_address(endpoint: str) -> tuple[str, int]:
    """(host, port) of an endpoint URL ``http://HOST[:PORT]`` (IPv6 hosts in brackets)."""
    rest = endpoint.split("://", 1)[-1].split("/", 1)[0]
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port = tail.lstrip(":")
    else:
        host, _, port = rest.partition(":")
    return host, int(port) if port else 80
