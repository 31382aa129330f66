"""The inbound listener's socket defences: connection caps, and the timers of aiohttp's share.

Owns what happens to a connection on the inbound listener before and between requests
(issue 14, finding 3). The listener's socket is :mod:`sidecar.h2_site`'s: h2c is told apart by
its first bytes and served by :mod:`sidecar.h2_server`, HTTP/1.1 by the sidecar's own server
(:mod:`sidecar.http1.server`, with its header-read timeout, answered 408, and keep-alive idle
timeout), and a WebSocket upgrade is handed from there to aiohttp's protocol, wrapped by a
:class:`_Guard` (:meth:`InboundGuards.wrap`; aiohttp does the HTTP, the guard only watches
and closes, since aiohttp's server has no header-read timeout and keeps an idle connection
for an hour):

- **Header timeout** (``header_timeout``): the request head must be complete within this many
  seconds of its first byte (for aiohttp's share: of the connection's start, or of the first
  byte after an answer); else the connection is closed. (The body then has its own upload
  deadline: :mod:`sidecar.upload`.)
- **Idle timeout** (``idle_timeout``): a keep-alive connection with nothing in flight for this
  long is closed.
- **Connection caps**: at most ``max_connections`` open on the listener (lowered to half the
  process's file limit, so that idle callers can never take the descriptors the outbound side
  and the app connections need) and ``max_per_source`` from one peer address; a connection
  past either is closed at once. Every connection counts against both, whoever serves it
  (:meth:`InboundGuards.admit_connection`, called by the site when it hands a connection to
  the sidecar's own servers; :class:`_Guard` for aiohttp's).
- **Out of descriptors**: an ``accept()`` that fails with EMFILE/ENFILE/ENOBUFS/ENOMEM is
  counted and logged once per ``ACCEPT_LOG_INTERVAL`` (asyncio's own handler logs a
  traceback each time).

Each event has a metric (:class:`sidecar.metrics.InboundListenerMetrics`, shared with the
site's own connection counts) and a documented default
(docs/operations.md, "Inbound listener defences"). A guard learns that a request reached the
handler, and that its answer is done, from :meth:`InboundGuards.middleware`, which the runner
adds to the inbound app. It must not answer, police or read request bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web

from sidecar.metrics import InboundListenerMetrics

log = logging.getLogger(__name__)

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_MAX_CONNECTIONS = 4096
DEFAULT_MAX_PER_SOURCE = 512
ACCEPT_LOG_INTERVAL = 10.0
_ACCEPT_MESSAGE = "socket.accept() out of system resource"


@dataclass(frozen=True, slots=True)
class InboundLimits:
    """The inbound listener's defences (see the module docstring)."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_per_source: int = DEFAULT_MAX_PER_SOURCE


def effective_cap(max_connections: int) -> int:
    """``max_connections``, at most half the soft file limit (the rest stays for the
    outbound side, the app connections, Redis and files)."""
    with contextlib.suppress(ValueError, OSError):
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft > 0:
            return max(1, min(max_connections, soft // 2))
    return max_connections


class InboundGuards:
    """The shared state of the inbound listener's sockets: limits, metrics, open guards."""

    def __init__(self, limits: InboundLimits, metrics: InboundListenerMetrics) -> None:
        self.limits = limits
        self.metrics = metrics
        self.cap = effective_cap(limits.max_connections)
        if self.cap < limits.max_connections:
            log.warning("inbound listener: connection cap lowered from %d to %d (half the "
                        "file limit)", limits.max_connections, self.cap)
        self._cap_checked = time.monotonic()
        self.by_transport: dict[int, _Guard] = {}
        self.per_source: dict[str, int] = {}  # HTTP/1.1 and h2c connections, by peer address
        self.served = 0  # connections of the sidecar's own servers open (h2c, HTTP/1.1)

    def wrap(self, protocol: asyncio.Protocol) -> asyncio.Protocol:
        """Guard one HTTP/1.1 connection served by aiohttp's ``protocol``."""
        return _Guard(self, protocol)

    @web.middleware
    async def middleware(
        self, request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """A request reached the handler (its head is complete) until its answer is done."""
        guard = self.by_transport.get(id(request.transport))
        if guard is None:
            return await handler(request)
        guard.request_started()
        try:
            return await handler(request)
        finally:
            guard.request_done()

    def admit(self, guard: _Guard | None, source: str) -> str | None:
        """None if the new connection may stay, else why not (``cap``, ``per-source``)."""
        now = time.monotonic()
        if now - self._cap_checked >= 1.0:  # the file limit may be changed at run time
            self.cap, self._cap_checked = effective_cap(self.limits.max_connections), now
        if len(self.by_transport) + self.served >= self.cap:
            return "cap"
        if self.per_source.get(source, 0) >= self.limits.max_per_source:
            return "per-source"
        return None

    def enter(self, source: str) -> None:
        self.per_source[source] = self.per_source.get(source, 0) + 1

    def leave(self, source: str) -> None:
        left = self.per_source.get(source, 1) - 1
        if left > 0:
            self.per_source[source] = left
        else:
            self.per_source.pop(source, None)

    def admit_connection(self, transport: asyncio.BaseTransport) -> Callable[[], None] | None:
        """A connection served by the sidecar's own HTTP/1.1 or h2c server counts against the
        same caps: None (closed at once, counted) when it is over one, else the callback to
        run when it closes."""
        source = peer_address(transport)
        refused = self.admit(None, source)
        if refused is not None:
            self.metrics.rejected.labels(refused).inc()
            return None
        self.served += 1
        self.enter(source)

        def closed() -> None:
            self.served -= 1
            self.leave(source)

        return closed


def peer_address(transport: asyncio.BaseTransport) -> str:
    """The peer's address without its port ("" when the socket has none)."""
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


class _Guard(asyncio.Protocol):
    """Forwards everything to aiohttp's protocol; closes on the timers and caps."""

    def __init__(self, guards: InboundGuards, inner: Any) -> None:
        self.guards = guards
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.source = ""
        self.busy = 0
        self.phase = "header"
        self.timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.source = peer_address(transport)
        refused = self.guards.admit(self, self.source)
        if refused is not None:
            self.guards.metrics.rejected.labels(refused).inc()
            transport.abort()
            return
        self.transport = transport
        self.guards.by_transport[id(transport)] = self
        self.guards.enter(self.source)
        self._arm("header", self.guards.limits.header_timeout)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.phase == "idle":  # the next request's head starts
            self._arm("header", self.guards.limits.header_timeout)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self.transport is None:
            return None
        result: bool | None = self.inner.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        transport, self.transport = self.transport, None
        if transport is None:
            return
        self.guards.by_transport.pop(id(transport), None)
        self.guards.leave(self.source)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # --- request state (from the middleware) --------------------------------------------

    def request_started(self) -> None:
        self.busy += 1
        self.phase = "busy"
        self._cancel()

    def request_done(self) -> None:
        self.busy -= 1
        if self.busy == 0 and self.transport is not None:
            self._arm("idle", self.guards.limits.idle_timeout)

    # --- timers -------------------------------------------------------------------------

    def _arm(self, phase: str, delay: float) -> None:
        self._cancel()
        self.phase = phase
        if delay > 0:
            self.timer = asyncio.get_running_loop().call_later(delay, self._expired)

    def _cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expired(self) -> None:
        self.timer = None
        if self.busy or self.transport is None or self.transport.is_closing():
            return
        self.guards.metrics.listener_timeouts.labels(self.phase).inc()
        self.transport.close()


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, metrics: InboundListenerMetrics,
                        interval: float = ACCEPT_LOG_INTERVAL,
                        clock: Callable[[], float] = time.monotonic) -> None:
    """Count asyncio's "out of system resource" accept errors and log one line per
    ``interval`` instead of a traceback each; everything else goes to the previous handler.
    Installed once per loop."""
    previous = loop.get_exception_handler()
    if getattr(previous, "quiet_accept_errors", False):
        return
    last = [-float("inf")]
    suppressed = [0]

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if str(context.get("message", "")).startswith(_ACCEPT_MESSAGE):
            metrics.accept_errors.inc()
            suppressed[0] += 1
            now = clock()
            if now - last[0] >= interval:
                exc = context.get("exception")
                log.warning("accept() failed %d time(s) in the last %.0f s: %s (out of file "
                            "descriptors? raise the limit or lower the connection caps)",
                            suppressed[0], min(interval, now - last[0]), exc)
                last[0], suppressed[0] = now, 0
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handler.quiet_accept_errors = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)
