"""The outbound listener's socket: HTTP/1.1 and prior-knowledge h2c on one port.

Owns the per-connection protocol decision: the first bytes of each accepted connection are
peeked; the 24-byte HTTP/2 connection preface (``PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n``,
RFC 9113 §3.4) hands it to an :class:`H2ServerConnection` (:mod:`sidecar.h2_server`), anything
else to the sidecar's HTTP/1.1 server connection (:mod:`sidecar.http1.server`, which hands
WebSocket upgrades on to aiohttp's protocol of the app runner), with the bytes already read.
Without an HTTP/1.1 handler, aiohttp's protocol serves HTTP/1.1 from the first byte.

Also the listener's first defences (docs/grpc.md, "Defences"): a connection that sends neither
a byte of an HTTP/1.1 request nor the whole preface within ``sniff_timeout`` is closed; one
accepted while ``max_connections`` are open (HTTP/1.1, h2c and still sniffing, over both
sockets) is closed at once. The HTTP/1.1 connection's own timers and limits are
:mod:`sidecar.http1.server`'s.

On stop: the socket stops accepting, HTTP/2 connections get GOAWAY and HTTP/1.1 ones
``Connection: close`` (idle ones are closed), with up to the drain timeout to finish what is in
flight, then are closed. Transparent interception has its own site
(:mod:`sidecar.transparent`), which tells h2c apart with :func:`sniff_preface` too. The
inbound listener uses this site as well (its handlers: :mod:`sidecar.h2_inbound` and
``InboundProxy.serve``), with :mod:`sidecar.inbound_site`'s connection caps over both
protocols and its guard around the WebSocket upgrades handed to aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import cast

from aiohttp import web

from sidecar.h2_server import H2Limits, H2ServerConnection, Handler
from sidecar.http1.server import H1Connection, H1Limits
from sidecar.http1.server import Handler as H1Handler
from sidecar.inbound_site import InboundGuards, quiet_accept_errors
from sidecar.local_callers import PeerCheck
from sidecar.metrics import H2Metrics

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULT_SNIFF_TIMEOUT = 10.0  # seconds for the first bytes (or the whole HTTP/2 preface)
DEFAULT_MAX_CONNECTIONS = 4096  # open connections on the outbound listener (both sockets)


class Connections:
    """What the sockets of one listener share: its HTTP/2 connections (to drain) and the
    count of connections still being sniffed; with aiohttp's own, the open count."""

    __slots__ = ("h2", "http1", "servers", "sniffing")

    def __init__(self) -> None:
        self.h2: set[H2ServerConnection] = set()
        self.http1: set[H1Connection] = set()
        self.sniffing = 0
        # the listening sockets: on stop all of them stop accepting before the drain
        self.servers: list[asyncio.AbstractServer] = []


def sniff_preface(data: bytes) -> bool | None:
    """True if ``data`` starts with the HTTP/2 preface, False if it cannot, None: too short."""
    if len(data) >= len(PREFACE):
        return data.startswith(PREFACE)
    return None if PREFACE.startswith(data) else False


class OutboundSite(web.BaseSite):
    """An aiohttp site that serves HTTP/1.1 with the runner's app and h2c with ``handler``.

    One instance per socket (the ``[::]`` twin of a ``0.0.0.0`` listener is another one);
    ``connections`` may be shared between them so one drain covers both.
    """

    __slots__ = ("_accept_from", "_conns", "_drain_timeout", "_guards", "_h1_limits", "_handler",
                 "_host", "_http1", "_limits", "_max_connections", "_metrics", "_port", "_shared",
                 "_sniff_timeout")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        handler: Handler,
        metrics: H2Metrics,
        drain_timeout: float,
        limits: H2Limits | None = None,
        sniff_timeout: float = DEFAULT_SNIFF_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        connections: Connections | None = None,
        http1: H1Handler | None = None,
        http1_limits: H1Limits | None = None,
        accept_from: PeerCheck | None = None,
        guards: InboundGuards | None = None,
    ) -> None:
        super().__init__(runner)
        self._http1 = http1
        self._h1_limits = http1_limits or H1Limits()
        self._accept_from = accept_from  # who may connect (sidecar.local_callers)
        self._guards = guards  # the inbound listener's HTTP/1.1 defences (sidecar.inbound_site)
        self._host, self._port = host, port
        self._handler = handler
        self._metrics = metrics
        self._drain_timeout = drain_timeout
        self._limits = limits or H2Limits()
        self._sniff_timeout = sniff_timeout
        self._max_connections = max_connections
        self._shared = connections if connections is not None else Connections()
        self._conns = self._shared.h2

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port} (HTTP/1.1, h2c)"

    async def start(self) -> None:
        await super().start()
        self._metrics.connections_open.set_function(self.open_connections)
        loop = asyncio.get_running_loop()
        if self._guards is not None:
            quiet_accept_errors(loop, self._guards.metrics)
        self._server = await loop.create_server(
            lambda: _Sniff(self), self._host, self._port, backlog=self._backlog,
            reuse_address=True,
        )
        self._shared.servers.append(self._server)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for server in self._shared.servers:  # the [::] twin too: nothing new during the drain
            server.close()
        conns = list(self._conns)
        for conn in conns:
            conn.shutdown()
        http1 = self._shared.http1
        for h1 in list(http1):
            h1.shutdown()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._drain_timeout):
                for conn in conns:
                    await conn.lost.wait()
                while any(h1.busy for h1 in http1):
                    await asyncio.sleep(0.05)
        for conn in list(self._conns):
            conn.abort()
        for h1 in list(http1):
            h1.abort()
        await super().stop()

    def open_connections(self) -> float:
        server = self._runner.server
        http1 = len(server.connections) if server is not None else 0
        shared = self._shared
        return float(http1 + len(shared.http1) + len(self._conns) + shared.sniffing)

    def admit(self) -> bool:
        """A new connection may stay: fewer than ``max_connections`` are open (it included)."""
        if self.open_connections() <= self._max_connections:
            return True
        self._metrics.connections_rejected.inc()
        return False

    def sniff_expired(self) -> None:
        self._metrics.listener_timeouts.labels("first_bytes").inc()

    def protocol_for(self, h2c: bool, transport: asyncio.BaseTransport
                     ) -> asyncio.Protocol | None:
        """The protocol to serve the connection with; None: over the inbound listener's caps
        (closed at once)."""
        if h2c:
            on_close: Callable[[H2ServerConnection], None] = self._conns.discard
            if self._guards is not None:  # the inbound listener: its caps count h2c too
                closed = self._guards.admit_connection(transport)
                if closed is None:
                    return None

                def on_close(conn: H2ServerConnection, closed: Callable[[], None] = closed
                             ) -> None:
                    self._conns.discard(conn)
                    closed()

            self._metrics.connections.labels("h2c").inc()
            conn = H2ServerConnection(self._handler, limits=self._limits, metrics=self._metrics,
                                      on_close=on_close)
            self._conns.add(conn)
            return conn
        self._metrics.connections.labels("http1").inc()
        server = self._runner.server
        assert server is not None
        guards = self._guards
        if self._http1 is None:  # aiohttp's HTTP/1.1 protocol for this connection
            return server() if guards is None else guards.wrap(server())
        h1_closed: Callable[[H1Connection], None] = self._shared.http1.discard
        fallback: Callable[[], asyncio.Protocol] = server
        if guards is not None:  # the inbound listener: its caps count this connection
            closed = guards.admit_connection(transport)
            if closed is None:
                return None

            def h1_closed(conn: H1Connection, closed: Callable[[], None] = closed) -> None:
                self._shared.http1.discard(conn)
                closed()

            def fallback() -> asyncio.Protocol:  # an upgrade: aiohttp's, under a guard
                return guards.wrap(server())

        h1 = H1Connection(self._http1, limits=self._h1_limits, metrics=self._metrics,
                          fallback=fallback, on_close=h1_closed,
                          hangup_cancels=guards is None)  # the inbound's slot stays held
        self._shared.http1.add(h1)
        return h1


def outbound_site(
    handler: Handler, metrics: H2Metrics, *, drain_timeout: float,
    limits: H2Limits | None = None,
    sniff_timeout: float = DEFAULT_SNIFF_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    http1: H1Handler | None = None,
    http1_limits: H1Limits | None = None,
    accept_from: PeerCheck | None = None,
    guards: InboundGuards | None = None,
) -> Callable[[web.AppRunner, str, int], web.BaseSite]:
    """The runner's site factory for the outbound listener: its sockets (``0.0.0.0`` and the
    ``[::]`` twin) share the metrics, one set of HTTP/2 connections to drain and one
    connection cap."""
    connections = Connections()

    def site(runner: web.AppRunner, host: str, port: int) -> web.BaseSite:
        return OutboundSite(runner, host, port, handler=handler, metrics=metrics,
                            drain_timeout=drain_timeout, limits=limits,
                            sniff_timeout=sniff_timeout, max_connections=max_connections,
                            connections=connections, http1=http1, http1_limits=http1_limits,
                            accept_from=accept_from, guards=guards)

    return site


class _Sniff(asyncio.Protocol):
    """Reads up to the preface's length, then hands the transport and the bytes over; closes
    a connection that is over the cap, or silent (or half a preface) past the timeout."""

    def __init__(self, site: OutboundSite) -> None:
        self.site = site
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.timer: asyncio.TimerHandle | None = None
        self.counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        check = self.site._accept_from
        if check is not None and not check(transport):
            transport.abort()
            return
        self._count(True)
        if not self.site.admit():
            self._count(False)
            transport.close()
            return
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(
            self.site._sniff_timeout, self._expired)

    def _count(self, sniffing: bool) -> None:
        if sniffing != self.counted:
            self.counted = sniffing
            self.site._shared.sniffing += 1 if sniffing else -1

    def _expired(self) -> None:
        self.timer = None
        transport, self.transport = self.transport, None
        self._count(False)
        if transport is not None and not transport.is_closing():
            self.site.sniff_expired()
            transport.close()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        verdict = sniff_preface(self.buffer)
        if verdict is not None:
            self._hand_over(verdict)

    def eof_received(self) -> bool:
        self._cancel_timer()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._count(False)
        self.transport = None

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _hand_over(self, h2c: bool) -> None:
        self._cancel_timer()
        self._count(False)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.transport = None
        protocol = self.site.protocol_for(h2c, transport)
        if protocol is None:
            transport.abort()
            return
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.buffer and not transport.is_closing():
            protocol.data_received(self.buffer)
        self.buffer = b""
