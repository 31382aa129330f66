"""Transparent interception: what the outbound listener does with a REDIRECTed connection.

Owns the per-connection decision and the TCP relay. With ``equilibrium init``'s rules the
app's outbound TCP lands on the outbound listener whatever address it dialled; for each
accepted connection ``TransparentSite`` reads the original destination (``SO_ORIGINAL_DST``,
:mod:`sidecar.original_dst`) and picks a route:

- ``direct``: not redirected (the app dialled the listener itself, e.g. ``HTTP_PROXY``):
  the ordinary HTTP proxy, routed by ``Host``.
- ``service``: the destination is a Service's cluster IP and port known to discovery (or a
  static upstream named by that IP) and the connection speaks HTTP (HTTP/1.1 or h2c): the
  HTTP proxy, with
  the upstream pinned to that Service port whatever the ``Host`` says
  (``TransparentRouter.pinned_upstream``), so the mesh policy picks the endpoint exactly as
  for Host-based routing. ``Host`` is sent on untouched.
- ``passthrough``: anything else -- no Service, or a Service port that does not speak
  HTTP (a database, TLS, gRPC over TLS): a byte-for-byte TCP relay to the original destination,
  with half-close and flow control, untouched (a cluster IP is then balanced by kube-proxy).

Whether a Service port speaks HTTP comes from discovery (``appProtocol`` or the port name,
see :func:`sidecar.discovery.port_protocol`). For a port without such a hint the first bytes
are sniffed: an HTTP/1.x request line means HTTP; other bytes, or silence for
``sniff_timeout`` (a server-first protocol such as MySQL or SMTP), mean pass-through.

HTTP/1.1 on those connections is served by the sidecar's own server
(:mod:`sidecar.http1.server`, :meth:`TransparentOutbound.serve_http1`) with the outbound
listener's header and keep-alive timeouts and head limit; it hands WebSocket upgrades on to
aiohttp's protocol. A request is pinned by its connection's original destination (read from
the exchange's transport).

HTTP/2: on every connection that may carry HTTP (``direct``, ``service`` and sniffed ones)
the prior-knowledge h2c preface (RFC 9113 §3.4) is told apart from HTTP/1.1 by the first
bytes, and such a connection is served by an :class:`sidecar.h2_server.H2ServerConnection`
whose streams are routed one by one (:meth:`TransparentOutbound.serve_h2` gives the handler,
:class:`sidecar.h2_proxy.H2Outbound`), each pinned to the original destination's upstream as
HTTP/1.1 requests are; a direct connection is routed by ``:authority``. A gRPC Service port is
therefore balanced per call, not passed through. Until the whole preface (or a byte that
is not one) arrived on a ``direct``/``service`` connection, it waits up to ``header_timeout``,
then is closed.

Both families: ``equilibrium init`` installs the same rules with ip6tables, so redirected
IPv6 connections arrive at ``[::1]``, on the ``[::]`` twin of a ``0.0.0.0`` listener
(:mod:`sidecar.dual_stack`), with their IPv6 original destination. The two sockets share one
``RelayBook``: one loop guard, one open-relay gauge, one drain.

The sidecar's own upstream connections are not redirected again because the init rules
exempt its UID/GID; if they are not exempt, a relay that comes back to the listener is
refused (metric ``equilibrium_passthrough_failures{reason="loop"}``) instead of looping. On
drain, the listener stops accepting, relays get up to the drain timeout, then are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, cast

from aiohttp import web

from sidecar.exchange import Exchange
from sidecar.h2_server import H2Limits, H2ServerConnection, ServerStream
from sidecar.h2_site import DEFAULT_SNIFF_TIMEOUT as DEFAULT_HEADER_TIMEOUT
from sidecar.h2_site import sniff_preface
from sidecar.http1.server import H1Connection, H1Limits
from sidecar.http1.server import Handler as H1Handler
from sidecar.local_callers import PeerCheck
from sidecar.metrics import H2Metrics, TransparentMetrics
from sidecar.original_dst import Address, redirected_to
from sidecar.transport import reset_on_close

log = logging.getLogger(__name__)

# (ip, port) -> (upstream group, protocol: http | opaque | unknown), or None for no Service
DestinationLookup = Callable[[str, int], tuple[str, str] | None]
HTTP_METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE")
SNIFF_BYTES = 8  # "OPTIONS " is the longest method + space
PASSTHROUGH_CONNECT_TIMEOUT = 10.0
"""The least a pass-through connection waits to reach its original destination (Envoy's and
Istio's default connect timeout). Unlike an HTTP request, it has no other endpoint to go to,
and the app would have waited for its own connect: a lost SYN is resent after 1 s."""
DEFAULT_SNIFF_TIMEOUT = 0.2


class PassthroughFailure(StrEnum):
    """Why a pass-through connection did not reach its original destination: the ``reason``
    label of ``equilibrium_passthrough_failures`` (docs/operations.md, "Error reasons")."""

    LOOP = "loop"
    """The relay came back to this listener: the sidecar's own traffic is being redirected."""
    TIMEOUT = "timeout"
    """No connection within the connect timeout."""
    UNREACHABLE = "refused-or-unreachable"
    """The destination refused the connection or could not be reached."""


def sniff_http(data: bytes) -> bool | None:
    """True if ``data`` starts an HTTP/1.x request, False if it cannot, None if too short."""
    for method in HTTP_METHODS:
        token = method + b" "
        if data.startswith(token):
            return True
        if len(data) < len(token) and token.startswith(data):
            return None  # a prefix of a method: wait for more bytes
    return False


class TransparentRouter:
    """Maps an original destination to an upstream group (or to nothing: pass through)."""

    def __init__(self, table: Any, lookup: DestinationLookup | None = None) -> None:
        self.table = table
        self.lookup = lookup

    def route(self, dst: Address) -> tuple[str, str] | None:
        """(upstream group, protocol) for an original destination, or None: pass through."""
        host, port = dst
        if self.lookup is not None:
            found = self.lookup(host, port)
            if found is not None and self.table.get(found[0]) is not None:
                return found
        # Without discovery: a static upstream named by the IP itself, e.g. `10.96.0.10=URL`
        # (its own name, not discovery's alias of a cluster IP, which covers one port only).
        ip = _canonical_ip(host)
        group = self.table.get(ip)
        return (ip, "unknown") if group is not None and group.name == ip else None

    def upstream_for(self, dst: Address) -> str | None:
        found = self.route(dst)
        return found[0] if found is not None else None

    def pinned_upstream(self, request: Exchange) -> str | None:
        """The upstream a request's connection is bound to by its original destination."""
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None:
            return None
        try:
            dst = redirected_to(sock)
        except OSError:
            return None
        return self.upstream_for(dst) if dst is not None else None


# the HTTP/2 handler: a stream, and the upstream its connection is pinned to (None: direct)
PinnedHandler = Callable[[ServerStream, str | None], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class H1Serving:
    """How HTTP/1.1 connections (redirected and direct) are served: by the sidecar's own
    server (:mod:`sidecar.http1.server`) with ``handler``, WebSocket upgrades handed on to
    aiohttp's protocol."""

    handler: H1Handler
    metrics: H2Metrics
    limits: H1Limits = field(default_factory=H1Limits)


@dataclass(frozen=True, slots=True)
class H2Serving:
    """How redirected (and direct) h2c connections are served."""

    handler: PinnedHandler
    metrics: H2Metrics
    limits: H2Limits = field(default_factory=H2Limits)


class RelayBook:
    """The open relays of one outbound listener, shared by its sockets (``0.0.0.0`` and its
    ``[::]`` twin, :mod:`sidecar.dual_stack`): one count, one loop guard, one drain; and its
    HTTP/2 connections."""

    h2: H2Serving | None = None  # set by TransparentOutbound.serve_h2; None: no h2c detection
    http1: H1Serving | None = None  # set by TransparentOutbound.serve_http1; None: aiohttp's

    def __init__(self) -> None:
        self.h2_connections: set[H2ServerConnection] = set()
        self.http1_connections: set[H1Connection] = set()
        self.sides: set[_RelaySide] = set()  # downstream ends of open relays
        self.idle = asyncio.Event()  # set whenever no relay is open
        self.idle.set()
        # (local port, destination) of each relay's own upstream socket: if one of them comes
        # back to us, the init rules do not exempt this process and we would relay forever.
        self.origins: set[tuple[int, Address]] = set()
        self.servers: list[asyncio.AbstractServer] = []


class TransparentSite(web.BaseSite):
    """An aiohttp site that routes each accepted connection by its original destination."""

    __slots__ = (
        "_accept_from",
        "_book",
        "_connect_timeout",
        "_drain_timeout",
        "_header_timeout",
        "_host",
        "_metrics",
        "_port",
        "_router",
        "_sniff_timeout",
    )

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        router: TransparentRouter,
        metrics: TransparentMetrics,
        connect_timeout: float,
        drain_timeout: float,
        sniff_timeout: float = DEFAULT_SNIFF_TIMEOUT,
        book: RelayBook | None = None,
        header_timeout: float = DEFAULT_HEADER_TIMEOUT,
        accept_from: PeerCheck | None = None,
    ) -> None:
        super().__init__(runner)
        self._accept_from = accept_from  # who may connect (sidecar.local_callers)
        self._sniff_timeout = sniff_timeout
        self._header_timeout = header_timeout
        self._host, self._port = host, port
        self._router = router
        self._metrics = metrics
        self._connect_timeout = connect_timeout
        self._drain_timeout = drain_timeout
        self._book = book if book is not None else RelayBook()

    @property
    def name(self) -> str:
        return f"transparent://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._accept, self._host, self._port, backlog=self._backlog, reuse_address=True
        )
        self._book.servers.append(self._server)

    async def stop(self) -> None:
        for server in self._book.servers:  # the IPv4 and IPv6 sockets stop accepting together
            server.close()
        h2 = list(self._book.h2_connections)
        for conn in h2:
            conn.shutdown()  # GOAWAY: the streams in flight finish
        http1 = self._book.http1_connections
        for h1 in list(http1):
            h1.shutdown()  # the request in flight is answered with Connection: close
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._drain_timeout):
                await self._book.idle.wait()
                for conn in h2:
                    await conn.lost.wait()
                while any(h1.busy for h1 in http1):
                    await asyncio.sleep(0.05)
        for side in list(self._book.sides):
            side.abort()
        for conn in list(self._book.h2_connections):
            conn.abort()
        for h1 in list(http1):
            h1.abort()
        await super().stop()

    # ------------------------------------------------------------ per connection

    def _accept(self) -> asyncio.Protocol:
        return _Dispatch(self)

    def classify(self, transport: asyncio.Transport) -> tuple[str, Address | None]:
        """The route of a freshly accepted connection: direct, http, passthrough, sniff or
        loop; with its original destination (None when not redirected)."""
        sock = transport.get_extra_info("socket")
        try:
            dst = redirected_to(sock) if sock is not None else None
        except OSError as exc:
            log.warning("cannot read the original destination: %s", exc)
            dst = None
        if dst is None:
            return "direct", None
        peer = transport.get_extra_info("peername")
        if peer is not None and (peer[1], dst) in self._book.origins:
            return "loop", dst
        found = self._router.route(dst)
        if found is None:
            return "passthrough", dst
        protocol = found[1]
        return ("http" if protocol == "http" else "passthrough" if protocol == "opaque"
                else "sniff"), dst

    def protocol_for(self, route: str, dst: Address | None) -> asyncio.BaseProtocol:
        """The protocol that serves a connection once its route is decided."""
        if route == "loop":
            assert dst is not None
            self._metrics.passthrough_failures.labels(PassthroughFailure.LOOP).inc()
            log.error("pass-through to %s:%d came back to the sidecar: its own connections are "
                      "being redirected (run it as the proxy UID/GID the init rules exempt)",
                      *dst)
            return _Refuse()
        if route in ("direct", "http", "h2"):
            self._metrics.connections.labels("direct" if dst is None else "service").inc()
            if route == "h2":
                return self._h2_connection(dst)
            server = self._runner.server
            assert server is not None
            serving = self._book.http1
            if serving is None:
                return server()  # aiohttp's HTTP protocol for this connection
            conns = self._book.http1_connections
            h1 = H1Connection(serving.handler, limits=serving.limits, metrics=serving.metrics,
                              fallback=server, on_close=conns.discard)
            conns.add(h1)
            return h1
        assert dst is not None
        self._metrics.connections.labels("passthrough").inc()
        return _RelaySide(self, dst, downstream=True)

    def _h2_connection(self, dst: Address | None) -> H2ServerConnection:
        """An h2c connection whose every stream goes to ``dst``'s upstream (by
        ``:authority`` when not redirected)."""
        serving = self._book.h2
        assert serving is not None
        serving.metrics.connections.labels("h2c").inc()
        pinned = self._router.upstream_for(dst) if dst is not None else None
        handler = serving.handler

        async def handle(stream: ServerStream) -> None:
            await handler(stream, pinned)

        conns = self._book.h2_connections
        conn = H2ServerConnection(handle, limits=serving.limits, metrics=serving.metrics,
                                  on_close=conns.discard)
        conns.add(conn)
        return conn

    # ------------------------------------------------------------ relay bookkeeping

    def relay_opened(self, side: _RelaySide) -> None:
        self._book.sides.add(side)
        self._book.idle.clear()
        self._metrics.relays_open.set(len(self._book.sides))

    def relay_closed(self, side: _RelaySide) -> None:
        self._book.sides.discard(side)
        if not self._book.sides:
            self._book.idle.set()
        self._metrics.relays_open.set(len(self._book.sides))


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        transport.abort()


class _Dispatch(asyncio.Protocol):
    """Decides the route (sniffing the first bytes when needed), then hands the transport
    and any bytes already read to the chosen protocol."""

    def __init__(self, site: TransparentSite) -> None:
        self.site = site
        self.transport: asyncio.Transport | None = None
        self.dst: Address | None = None
        self.route = ""
        self.buffer = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        check = self.site._accept_from
        if check is not None and not check(transport):
            transport.abort()
            return
        self.transport = transport
        route, self.dst = self.site.classify(transport)
        self.route = route
        loop = asyncio.get_running_loop()
        if route == "sniff":
            self.timer = loop.call_later(
                self.site._sniff_timeout, self._hand_over, "passthrough")  # server speaks first
        elif route in ("direct", "http") and self.site._book.h2 is not None:
            # HTTP/1.1 or h2c: told apart by the first bytes (a client speaks first)
            self.timer = loop.call_later(self.site._header_timeout, self._silent)
        else:
            self._hand_over(route)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        h2c = sniff_preface(self.buffer) if self.site._book.h2 is not None else False
        if h2c:
            self._hand_over("h2")
        elif self.route != "sniff":  # direct or http: HTTP/1.1 unless it is the preface
            if h2c is False:
                self._hand_over(self.route)
        else:
            verdict = sniff_http(self.buffer[:SNIFF_BYTES])
            if verdict:
                self._hand_over("http")
            elif verdict is False and h2c is False:
                self._hand_over("passthrough")

    def _silent(self) -> None:
        """Neither a byte of HTTP/1.1 nor the whole preface in time: closed."""
        self.timer = None
        transport, self.transport = self.transport, None
        if transport is not None and not transport.is_closing():
            transport.close()

    def eof_received(self) -> bool:
        self._cancel_timer()
        return False  # the app left before saying anything: nothing to relay

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _hand_over(self, route: str) -> None:
        self._cancel_timer()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.transport = None
        protocol = self.site.protocol_for(route, self.dst)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.buffer and not transport.is_closing():
            assert isinstance(protocol, asyncio.Protocol)
            protocol.data_received(self.buffer)
        self.buffer = b""


class _RelaySide(asyncio.Protocol):
    """One end of a byte relay; the downstream end (the app) opens the upstream end."""

    def __init__(self, site: TransparentSite, dst: Address, *, downstream: bool) -> None:
        self.site = site
        self.dst = dst
        self.downstream = downstream
        self.transport: asyncio.Transport | None = None
        self.peer: _RelaySide | None = None
        self.eof = False
        self.origin: tuple[int, Address] | None = None  # upstream end: its (port, destination)
        self.pending: list[bytes] = []  # downstream bytes read before the upstream connected
        self._connect: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport = transport
        if self.downstream:
            self.site.relay_opened(self)
            transport.pause_reading()  # nothing is read until the upstream is connected
            self._connect = asyncio.get_running_loop().create_task(self._open_upstream())

    async def _open_upstream(self) -> None:
        loop = asyncio.get_running_loop()
        upstream = _RelaySide(self.site, self.dst, downstream=False)
        upstream.peer, self.peer = self, upstream
        host, port = self.dst
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        origin: tuple[int, Address] | None = None
        try:
            sock.setblocking(False)
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))  # port known now
            origin = (sock.getsockname()[1], self.dst)
            self.site._book.origins.add(origin)
            async with asyncio.timeout(self.site._connect_timeout):
                await loop.sock_connect(sock, (host, port))
            await loop.create_connection(lambda: upstream, sock=sock)
        except (OSError, TimeoutError) as exc:
            sock.close()
            timeout = isinstance(exc, TimeoutError)
            reason = PassthroughFailure.TIMEOUT if timeout else PassthroughFailure.UNREACHABLE
            self.site._metrics.passthrough_failures.labels(reason).inc()
            why = (f"no connection within {self.site._connect_timeout:g} s" if timeout
                   else exc.strerror or str(exc) or type(exc).__name__)
            log.info("pass-through to %s:%d failed: %s (%s); the app's connection is reset",
                     host, port, why, reason)
            self.peer = None
            self.reset()  # what the app would have seen without the sidecar: not a clean end
            return
        except BaseException:
            sock.close()
            raise
        finally:
            if upstream.transport is None and origin is not None:  # not connected
                self.site._book.origins.discard(origin)
        upstream.origin = origin
        if self.transport is None or self.transport.is_closing():
            upstream.abort()
            return
        pending, self.pending = self.pending, []
        for data in pending:
            self.data_received(data)
        self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            if self.downstream:
                self.pending.append(data)  # sniffed bytes, handed over before the connect
            return
        if not peer.transport.is_closing():
            peer.transport.write(data)
            direction = "to-destination" if self.downstream else "to-app"
            self.site._metrics.relayed_bytes.labels(direction).inc(len(data))

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.transport is None or peer.transport.is_closing():
            return False
        if peer.eof:  # both directions finished
            peer.transport.close()
            return False
        if peer.transport.can_write_eof():
            peer.transport.write_eof()
        return True  # keep our write side open: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.origin is not None:
            self.site._book.origins.discard(self.origin)
        if self.downstream:
            self.site.relay_closed(self)
            if self._connect is not None and not self._connect.done():
                self._connect.cancel()
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            if exc is None:
                peer.transport.close()  # flushes what is buffered, then FIN
            else:
                peer.transport.abort()
        self.transport = None

    def pause_writing(self) -> None:  # our buffer is full: stop reading the other side
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.abort()

    def reset(self) -> None:
        """Cut this side with a TCP reset (SO_LINGER 0), not a FIN: a connection that never
        reached its destination must not read as one the destination ended cleanly."""
        reset_on_close(self.transport)
        self.abort()


def _canonical_ip(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


@dataclass(frozen=True, slots=True)
class TransparentOutbound:
    """What makes the outbound listener transparent: the site every accepted connection goes
    through (it reads the original destination first) and the upstream a request is pinned to."""

    router: TransparentRouter
    site: Callable[[web.AppRunner, str, int], web.BaseSite]
    pinned_upstream: Callable[[Exchange], str | None]
    book: RelayBook

    def serve_http1(self, handler: H1Handler, metrics: H2Metrics,
                    limits: H1Limits | None = None) -> None:
        """Serve the listener's HTTP/1.1 connections with the sidecar's own server and
        ``handler`` (aiohttp's protocol takes only the WebSocket upgrades it hands over).
        Before the listener starts."""
        self.book.http1 = H1Serving(handler, metrics, limits or H1Limits())

    def serve_h2(self, handler: PinnedHandler, metrics: H2Metrics,
                 limits: H2Limits | None = None) -> None:
        """Detect h2c on the listener's connections and serve each stream with ``handler``
        (given the stream and the upstream its connection is pinned to). Before the
        listener starts."""
        self.book.h2 = H2Serving(handler, metrics, limits or H2Limits())


def transparent_outbound(
    table: Any,
    metrics: TransparentMetrics,
    *,
    connect_timeout: float,
    drain_timeout: float,
    lookup: DestinationLookup | None = None,
    sniff_timeout: float = DEFAULT_SNIFF_TIMEOUT,
    fallback: Callable[[Exchange], str | None] | None = None,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    accept_from: PeerCheck | None = None,
) -> TransparentOutbound:
    """The outbound listener's site and pin for transparent interception (built by the runner
    before the proxy, which takes ``pinned_upstream``, and the listener, which takes ``site``).

    Requests on redirected connections are pinned to their destination's upstream; on
    direct ones, ``fallback(request)`` may pin one (else ``Host`` routing decides).
    """
    router = TransparentRouter(table, lookup)
    book = RelayBook()

    def site(app_runner: web.AppRunner, host: str, port: int) -> web.BaseSite:
        return TransparentSite(
            app_runner, host, port, router=router, metrics=metrics,
            connect_timeout=connect_timeout, drain_timeout=drain_timeout,
            sniff_timeout=sniff_timeout, book=book, header_timeout=header_timeout,
            accept_from=accept_from,
        )

    def pinned(request: Exchange) -> str | None:
        name = router.pinned_upstream(request)
        if name is None and fallback is not None:
            name = fallback(request)
        return name

    return TransparentOutbound(router, site, pinned, book)
