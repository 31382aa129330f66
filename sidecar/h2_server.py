"""The app's HTTP/2 connection to the outbound listener: each stream is one request.

Owns the downstream side of prior-knowledge h2c (RFC 9113 §3.3): the SETTINGS it announces
(a cap on concurrent streams per connection), one task per request stream running the
handler it is given (:class:`sidecar.h2_proxy.H2Outbound`), cancelling that task when the app
resets the stream or hangs up (the app's doing: other streams go on), and the graceful end
(GOAWAY, then close once the streams in flight are done).

Also owns the connection's defences (docs/grpc.md, "Defences"): a stream opened beyond the
announced SETTINGS_MAX_CONCURRENT_STREAMS is refused alone (RST_STREAM REFUSED_STREAM, RFC 9113
§5.1.2) instead of ``h2``'s rule of ending the connection; frame floods and the rapid-reset
pattern (budgets of :mod:`sidecar.h2_guard`) end it with GOAWAY(ENHANCE_YOUR_CALM); a
connection with no request in flight for ``idle_timeout`` gets GOAWAY(NO_ERROR) and is closed.

It does not route or forward: the handler does. Protocol detection is
:mod:`sidecar.h2_site`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from sidecar import nghttp2
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
from sidecar.h2_guard import (
    DEFAULT_ALLOWANCES,
    DEFAULT_BUDGETS,
    EMPTY_DATA,
    PING,
    PREMATURE_LIFETIME,
    PRIORITY,
    RAPID_RESET,
    SETTINGS,
    UNKNOWN_FRAME,
    WINDOW_UPDATE,
    Allowance,
    Budget,
    FloodGuard,
)
from sidecar.metrics import H2Metrics
from wire import grpc_status as grpc

log = logging.getLogger(__name__)

DEFAULT_MAX_STREAMS = 256  # concurrent streams one app connection may open (SETTINGS)
DEFAULT_IDLE_TIMEOUT = 300.0  # seconds an app connection may stay open with no request


@dataclass(frozen=True, slots=True)
class H2Limits:
    """The defences of one app connection (docs/grpc.md, "Defences")."""

    max_streams: int = DEFAULT_MAX_STREAMS
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT  # 0: never
    budgets: Mapping[str, Budget] = field(default_factory=lambda: dict(DEFAULT_BUDGETS))
    allowances: Mapping[str, Allowance] = field(
        default_factory=lambda: dict(DEFAULT_ALLOWANCES))


#: Frames libnghttp2 acknowledges by itself, counted as they are read on that engine.
_ACKED_KINDS = {0x4: SETTINGS, 0x6: PING}


def _counted_kind(frame_type: int | None) -> str | None:
    """The flood kind a frame counts under at the frame level (RFC 9113 §6 types)."""
    if frame_type == 0x2:
        return PRIORITY
    if frame_type == 0x8:
        return WINDOW_UPDATE
    if frame_type is not None and frame_type > 0x9:  # ALTSVC, ORIGIN, anything undefined:
        return UNKNOWN_FRAME  # a server ignores them
    return None


class _RefusingH2(h2.connection.H2Connection):
    """``h2``'s server connection, except that a HEADERS frame opening a stream beyond the
    announced limit is decoded (the HPACK state must stay in step with the peer's) and its
    stream opened, then listed in ``over_limit`` for the owner to refuse, where ``h2`` would
    raise TooManyStreamsError and end the connection."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.over_limit: set[int] = set()
        self._lift = False
        # frames counted one by one, before h2 sees them (it drops some without an event:
        # WINDOW_UPDATE on a closed stream, ALTSVC to a server): the owner's budget check,
        # and the first kind it refused (nothing after it is processed)
        self.frame_budget: Callable[[str], bool] | None = None
        self.flooded: str | None = None
        # called as a HEADERS frame opens a stream within the limit, in the same read as
        # the frames it entitles (a burst of new streams, each with its updates)
        self.stream_opened: Callable[[], None] | None = None

    def _receive_frame(self, frame: Any) -> Any:
        frame_type = getattr(frame, "type", None)
        kind = _counted_kind(frame_type)
        if kind is not None and self.flooded is None and self.frame_budget is not None \
                and not self.frame_budget(kind):
            self.flooded = kind
        if self.flooded is not None:
            return []  # over a budget: the owner ends the connection (GOAWAY)
        opens = frame_type == 0x1 and frame.stream_id not in self.streams
        events = super()._receive_frame(frame)
        if opens and frame.stream_id in self.streams and frame.stream_id not in self.over_limit \
                and self.stream_opened is not None:
            self.stream_opened()
        return events

    @property
    def open_inbound_streams(self) -> int:
        count: int = super().open_inbound_streams
        return 0 if self._lift else count

    def _receive_headers_frame(self, frame: Any) -> Any:
        new = frame.stream_id not in self.streams
        if new and self.open_inbound_streams >= self.local_settings.max_concurrent_streams:
            self._lift = True
            self.over_limit.add(frame.stream_id)
        try:
            return super()._receive_headers_frame(frame)
        finally:
            self._lift = False


class ServerStream(H2Stream):
    """A request stream: its request head, and its response side."""

    __slots__ = ("_index", "opened_at", "request")

    def __init__(self, conn: H2Connection, stream_id: int, request: Headers,
                 opened_at: float = 0.0) -> None:
        super().__init__(conn, stream_id)
        self.request = request
        self.opened_at = opened_at  # loop time
        self._index: dict[bytes, bytes] | None = None  # name -> first value (header())

    def header(self, name: bytes) -> bytes | None:
        """The value of the request's first field named ``name``."""
        index = self._index
        if index is None:  # built once, on the first look (a proxied call makes several)
            index = self._index = dict(reversed(self.request))
        return index.get(name)

    def peer_host(self) -> str | None:
        """The client's address (no port), None once the connection is gone."""
        transport = self._conn.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return str(peer[0]) if peer else None

    def local_ip(self) -> str:
        """The address the client reached this listener at ("" unknown)."""
        conn = self._conn
        if isinstance(conn, H2ServerConnection):
            return conn.local_ip()
        return socket_ip(conn.transport, "sockname")


Handler = Callable[[ServerStream], Awaitable[None]]


class H2ServerConnection(H2Connection):
    """One app connection; ``on_close`` is called once when the socket is gone."""

    def __init__(
        self,
        handler: Handler,
        *,
        limits: H2Limits | None = None,
        metrics: H2Metrics | None = None,
        on_close: Callable[[H2ServerConnection], None] | None = None,
    ) -> None:
        super().__init__(client_side=False)
        self.handler = handler
        self.limits = limits or H2Limits()
        self.max_streams = self.limits.max_streams
        self.metrics = metrics
        self.on_close = on_close
        self.loop = asyncio.get_running_loop()
        self.guard = FloodGuard(self.loop.time(), self.limits.budgets, self.limits.allowances)
        self.idle_timer: asyncio.TimerHandle | None = None
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.draining = False
        self.idle = asyncio.Event()  # set whenever no request is in flight
        self.idle.set()
        self._ips = SocketIps()  # local_ip()

    def local_ip(self) -> str:
        """The address the peer reached this listener at ("" unknown; read once)."""
        return self._ips.of(self.transport, "sockname")

    def new_state_machine(self, config: h2.config.H2Configuration) -> _RefusingH2:
        machine = _RefusingH2(config=config)
        # h2 ends the connection when a block exceeds what its decoder allows; decoding
        # blocks up to the hard limit keeps HPACK in step, so one stream can be refused alone
        machine.decoder.max_header_list_size = HEADER_LIST_HARD_LIMIT
        machine.frame_budget = self._frame_within_budget
        machine.stream_opened = self._stream_opened
        return machine

    def configure_engine(self, engine: nghttp2.NgConnection) -> None:
        engine.frame_budget = self._frame_over_budget
        engine.reset_budget = self._reset_over_budget
        engine.stream_opened = self._stream_opened

    def _frame_over_budget(self, frame_type: int) -> str | None:
        """(libnghttp2) The kind a frame just begun is over the budget of, if any. PING and
        SETTINGS are counted here too, as they are read, not from their events after the
        read: the library acknowledges each as it reads it, and a read of over 1,000 of them
        ends the connection with its own flood error before any event comes out, as a
        protocol error the flood metric did not count (the binding's review)."""
        kind = _ACKED_KINDS.get(frame_type) or _counted_kind(frame_type)
        return kind if kind is not None and not self._frame_within_budget(kind) else None

    def _reset_over_budget(self, stream_id: int, opened_now: bool) -> str | None:
        """(libnghttp2) A RST_STREAM counted as it is read, before the library's own limit on
        resets sees it (``dispatch`` counts them for ``h2``). A stream opened in the same
        read is not served yet (its request is dispatched after the read): premature."""
        if (opened_now or self._premature_reset(stream_id)) \
                and not self.guard.spend(RAPID_RESET, self.loop.time()):
            return RAPID_RESET
        return None

    def _refused(self, _stream_id: int) -> None:
        """A stream opened past SETTINGS_MAX_CONCURRENT_STREAMS, refused (REFUSED_STREAM)."""
        if self.metrics is not None:
            self.metrics.refused_streams.inc()

    def _stream_opened(self) -> None:
        # a stream served (not one refused beyond the limit: that costs nothing) earns its
        # own PRIORITY and WINDOW_UPDATE frames
        self.guard.earn(PRIORITY)
        self.guard.earn(WINDOW_UPDATE)

    def _frame_within_budget(self, kind: str) -> bool:
        return self.guard.spend(kind, self.loop.time())

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        kind = self.conn.flooded
        if kind is not None and not self.ending:
            self._flooded(kind)
        elif self.engine == "nghttp2" and self.conn.library_goaway is not None \
                and not self.draining:
            self._library_goaway(self.conn.library_goaway)

    def _library_goaway(self, code: int) -> None:
        """libnghttp2 sent GOAWAY by itself: its own limit on resets (CVE-2023-44487; in
        Debian's 1.52, 1,000 at once, then 33 a second), which can come before ours
        (h2_guard's allowance grows with the calls answered). The GOAWAY is graceful: the
        calls in flight finish, then the connection closes; the peer opens another."""
        if self.metrics is not None:
            self.metrics.flood_goaways.labels(RAPID_RESET).inc()
        log.warning("HTTP/2 connection from %s: the HTTP/2 library's own limit on stream "
                    "resets sent GOAWAY (code %d); the calls in flight finish", self.peer(), code)
        self.draining = True
        if not self.tasks:
            self.close()

    def _flooded(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.flood_goaways.labels(kind).inc()
        log.warning("HTTP/2 connection from %s over its %s budget: GOAWAY ENHANCE_YOUR_CALM",
                    self.peer(), kind)
        self.close(ErrorCodes.ENHANCE_YOUR_CALM, linger=True)

    @property
    def refusing(self) -> _RefusingH2:
        assert isinstance(self.conn, _RefusingH2)
        return self.conn

    def prepare(self) -> None:
        self.conn.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams})
        self._arm_idle_timer()

    # ------------------------------------------------------------ defences

    def _arm_idle_timer(self) -> None:
        # not once the connection is lost: the timer would keep it (and what it holds) for
        # the whole idle timeout, for nothing
        if self.limits.idle_timeout > 0 and self.idle_timer is None and self.transport:
            self.idle_timer = self.loop.call_later(self.limits.idle_timeout, self._idle_expired)

    def _disarm_idle_timer(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def _idle_expired(self) -> None:
        self.idle_timer = None
        if self.tasks or self.transport is None:
            return
        if self.metrics is not None:
            self.metrics.listener_timeouts.labels("h2_idle").inc()
        log.info("HTTP/2 connection from %s idle for %.0fs: closed", self.peer(),
                 self.limits.idle_timeout)
        self.close()

    def _flood_kind(self, event: h2.events.Event) -> str | None:
        if isinstance(event, h2.events.StreamReset):
            if self.engine != "h2":
                return None  # counted as it was read (_reset_over_budget)
            return RAPID_RESET if (event.remote_reset
                                   and self._premature_reset(event.stream_id)) else None
        if isinstance(event, h2.events.PingReceived | h2.events.RemoteSettingsChanged):
            if self.engine != "h2":
                return None  # counted as they were read (_frame_over_budget)
            return PING if isinstance(event, h2.events.PingReceived) else SETTINGS
        if isinstance(event, h2.events.DataReceived):
            return EMPTY_DATA if not event.data and event.stream_ended is None else None
        return None  # PRIORITY, WINDOW_UPDATE and ignored frames: counted as frames

    def _premature_reset(self, stream_id: int) -> bool:
        """Whether the peer's reset of this stream is premature: a request being served,
        younger than PREMATURE_LIFETIME, whose answer had not begun (sidecar/h2_guard.py)."""
        stream = self.streams.get(stream_id)
        return (isinstance(stream, ServerStream) and stream_id in self.tasks
                and not stream.head_sent
                and self.loop.time() - stream.opened_at < PREMATURE_LIFETIME)

    def dispatch(self, event: h2.events.Event) -> None:
        if self.ending:
            return  # ended (e.g. by a flood) while the rest of the read was in the queue
        kind = self._flood_kind(event)
        if kind is not None and not self.guard.spend(kind, self.loop.time()):
            self._flooded(kind)
            return
        super().dispatch(event)

    def send_data_now(self, stream: H2Stream, data: bytes, end_stream: bool) -> None:
        super().send_data_now(stream, data, end_stream)
        if data:  # the app's flow control answers it with WINDOW_UPDATE frames
            self.guard.earn(WINDOW_UPDATE)

    def other_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            over_limit: set[int] = self.conn.over_limit
            if event.stream_id in over_limit:  # past SETTINGS_MAX_CONCURRENT_STREAMS
                over_limit.discard(event.stream_id)
                self._refused(event.stream_id)
                with contextlib.suppress(*H2_ERRORS):
                    self.conn.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
                return
            if self.draining:  # after our GOAWAY: not processed, the app may retry elsewhere
                self.conn.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
                return
            size = header_list_size(event.headers)
            if size > MAX_HEADER_LIST:
                self._refuse_oversized(event, size)
                return
            stream = ServerStream(self, event.stream_id, list(event.headers),
                                  self.loop.time())
            self.streams[event.stream_id] = stream
            self.idle.clear()
            self._disarm_idle_timer()
            task = asyncio.get_running_loop().create_task(self._serve(stream))
            self.tasks[event.stream_id] = task
            task.add_done_callback(functools.partial(self._served, stream))

    def _refuse_oversized(self, event: h2.events.RequestReceived, size: int) -> None:
        """A header block over the announced SETTINGS_MAX_HEADER_LIST_SIZE: answered 431
        (RFC 9113 §10.5.1; RESOURCE_EXHAUSTED to a gRPC caller) and the stream closed; the
        connection and its other streams go on."""
        if self.metrics is not None:
            self.metrics.oversized_headers.inc()
        log.info("HTTP/2 stream %d from %s: header block of %d bytes refused", event.stream_id,
                 self.peer(), size)
        content_type = next((v for k, v in event.headers if k == b"content-type"), None)
        if grpc.is_grpc(content_type):
            answer = grpc.trailers_only(grpc.RESOURCE_EXHAUSTED, f"header block of {size} "
                                        f"bytes is over the limit of {MAX_HEADER_LIST}")
        else:
            answer = [(b":status", b"431"), (b"content-length", b"0")]
        with contextlib.suppress(*H2_ERRORS):
            self.conn.send_headers(event.stream_id, answer, end_stream=True)
            if event.stream_ended is None:  # its body is not wanted (RFC 9113 §8.1)
                self.conn.reset_stream(event.stream_id, ErrorCodes.NO_ERROR)

    async def _serve(self, stream: ServerStream) -> None:
        try:
            await self.handler(stream)
        except (asyncio.CancelledError, StreamGone):
            pass  # the app reset the stream or hung up
        except Exception:
            log.exception("HTTP/2 stream %d from %s failed", stream.id, self.peer())
            stream.reset(ErrorCodes.INTERNAL_ERROR)

    def _served(self, stream: ServerStream, task: asyncio.Task[None]) -> None:
        """A stream's task ended, also one cancelled before it started (the app reset the
        stream in the same read that opened it), whose ``_serve`` never ran."""
        stream.discard()  # what nobody read gives its credit back
        if stream.local_ended and stream.reset_code is None:  # answered to its end: each
            self.guard.earn(RAPID_RESET)  # such call allows one more reset (h2_guard)
        if self.tasks.get(stream.id) is task:
            del self.tasks[stream.id]
        if not self.tasks:
            self.idle.set()
            self._arm_idle_timer()
            if self.draining or self.goaway_received is not None:
                self.close()

    def stream_closed(self, stream: H2Stream) -> None:
        # The app reset the stream or the connection is gone: stop its request.
        if stream.reset_code is not None or self.ending:
            task = self.tasks.get(stream.id)
            if task is not None and not task.done():
                task.cancel()

    def terminated(self, event: h2.events.ConnectionTerminated) -> None:
        # Graceful (NO_ERROR): the app opens no more streams, the ones it started go on, then
        # we close. Otherwise the connection is over.
        if event.error_code != ErrorCodes.NO_ERROR or not self.tasks:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_idle_timer()
        super().connection_lost(exc)
        for task in list(self.tasks.values()):
            task.cancel()
        if self.on_close is not None:
            self.on_close(self)

    def shutdown(self) -> None:
        """Graceful end: GOAWAY (no new streams), close once the streams in flight finish."""
        if self.draining or self.transport is None:
            return
        self.draining = True
        if not self.tasks:
            self.close()
            return
        with contextlib.suppress(*H2_ERRORS):
            self.conn.close_connection(error_code=ErrorCodes.NO_ERROR,
                                       last_stream_id=self.conn.highest_inbound_stream_id)
        self.flush()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
