"""One HTTP/2 connection driven by a protocol engine, and its streams' inboxes.

The engine is libnghttp2 (:mod:`sidecar.nghttp2`, which offers the :mod:`h2` library's
interface and events) where it loads, else the pure-Python :mod:`h2` state machine
(``EQUILIBRIUM_H2_ENGINE`` chooses; docs/grpc.md, "The HTTP/2 engine"). Owns what both ends
of the sidecar's HTTP/2 (h2c, RFC 9113) connections share: feeding the socket's bytes to the
engine and writing what it wants sent; each stream's inbox (DATA with its
flow-controlled length, trailers, end, reset) read by one consumer; sending DATA within the
peer's flow-control windows (stream and connection, RFC 9113 §5.2) and the socket's write
buffer; and giving credit back (WINDOW_UPDATE) only when the consumer says it passed the bytes
on (:meth:`H2Stream.ack`), so a slow reader slows its writer instead of filling memory.

Subclasses say what a new stream is: :mod:`sidecar.h2_server` (the app's connection: a
request opens a stream) and :mod:`sidecar.h2_client` (a connection to an endpoint: the
sidecar opens streams). Nothing here routes, retries, or knows gRPC.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Iterable
from itertools import chain
from typing import Any, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from h2.connection import ConnectionInputs, ConnectionState, H2ConnectionStateMachine
from h2.errors import ErrorCodes

from sidecar import nghttp2

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]
H2_ERRORS = (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError)
# The connection-level receive window: large, so that one stalled stream (whose own window,
# the SETTINGS default of 64 KiB, bounds what it holds) cannot block the others.
CONNECTION_WINDOW = 16 * 1024 * 1024
LINGER = 2.0  # seconds a connection ended for an error still reads (and drops) what comes
# SETTINGS_MAX_HEADER_LIST_SIZE as announced (h2's default): a larger block is refused for its
# stream alone; blocks are decoded at all (keeping HPACK in step) up to the hard limit, past
# which h2 ends the connection.
MAX_HEADER_LIST = 64 * 1024
HEADER_LIST_HARD_LIMIT = nghttp2.HEADER_BLOCK_LIMIT  # 1 MiB, on either engine


def header_list_size(headers: Iterable[tuple[bytes, bytes]]) -> int:
    """A header block's size as SETTINGS_MAX_HEADER_LIST_SIZE counts it (RFC 9113 §6.5.2):
    each field's name and value plus 32 octets."""
    fields = headers if isinstance(headers, list) else list(headers)
    return sum(map(len, chain.from_iterable(fields))) + 32 * len(fields)


class _GracefulGoaway(H2ConnectionStateMachine):
    """``h2``'s connection state machine, except that a GOAWAY (sent or received) leaves an
    open connection open: ``h2`` closes it at once and refuses every later frame, so the
    streams already in flight could never finish as RFC 9113 §6.8 says they should. Not
    opening new streams after a GOAWAY is then this module's users' job (``goaway_received``,
    draining)."""

    _transitions = {  # noqa: RUF012 (h2's own table, extended)
        **H2ConnectionStateMachine._transitions,
        **{(state, given): (None, state)
           for state in (ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN)
           for given in (ConnectionInputs.SEND_GOAWAY, ConnectionInputs.RECV_GOAWAY)},
    }


class StreamGone(Exception):
    """The stream was reset (by the peer or by us) or its connection closed."""

    def __init__(self, code: int | None, detail: str) -> None:
        super().__init__(detail)
        self.code = code  # the RST_STREAM / GOAWAY error code; None when the socket closed


class H2Stream:
    """One stream's inbound side (an inbox of events) and its sending side."""

    __slots__ = ("_conn", "_inbox", "_more", "closed", "ended", "head_sent", "id",
                 "local_ended", "reset_code", "window")

    def __init__(self, conn: H2Connection, stream_id: int) -> None:
        self._conn = conn
        self.id = stream_id
        self._inbox: collections.deque[tuple[str, Any, int]] = collections.deque()
        self._more = asyncio.Event()
        self.window = asyncio.Event()  # set when the peer may have given send credit
        self.ended = False  # the peer finished its side (END_STREAM seen)
        self.local_ended = False  # we finished ours
        self.head_sent = False  # we sent a header block on it (an answer began, or a request)
        self.reset_code: int | None = None
        self.closed: StreamGone | None = None

    # ------------------------------------------------------------ inbound (h2 events)

    def _push(self, kind: str, payload: Any = None, size: int = 0) -> None:
        self._inbox.append((kind, payload, size))
        self._more.set()

    def _gone(self, exc: StreamGone) -> None:
        if self.closed is None:
            self.closed = exc
        self._more.set()
        self.window.set()

    async def read(self) -> tuple[str, Any, int]:
        """The next inbound item: ``("data", bytes, flow_len)``, ``("trailers", headers, 0)``
        or ``("end", None, 0)``; raises :class:`StreamGone` once the stream is reset."""
        while not self._inbox:
            if self.closed is not None:
                raise self.closed
            self._more.clear()
            await self._more.wait()
        return self._inbox.popleft()

    def ready(self) -> bool:
        """Whether :meth:`read` has an item already (it would not wait)."""
        return bool(self._inbox)

    def take_whole(self, room: int) -> list[tuple[str, Any, int]] | None:
        """Everything :meth:`read` would still return, taken out of the inbox, if the peer's
        side has all come (its last item is its end or its trailers) and its DATA holds at
        most ``room`` bytes; else None, nothing taken."""
        inbox = self._inbox
        if not inbox or inbox[-1][0] == "data" or sum(
                len(payload) for kind, payload, _ in inbox if kind == "data") > room:
            return None
        items = list(inbox)
        inbox.clear()
        return items

    def put_back(self, items: list[tuple[str, Any, int]]) -> None:
        """Items :meth:`take_whole` took and nobody read: unread again, first in line."""
        self._inbox.extendleft(reversed(items))

    def ack(self, size: int) -> None:
        """``size`` flow-controlled bytes were passed on (or dropped): give the peer that much
        credit. Also after the stream closed: the connection's window must get its share."""
        if size:
            self._conn.acknowledge(self.id, size)

    def discard(self) -> Headers | None:
        """Drop what is still unread, giving its credit back (a reset or abandoned stream);
        the trailers among it, if any, are returned: a proxy still counts what they held
        (the peer sent them, though nobody will relay them)."""
        size, trailers = 0, None
        for kind, payload, n in self._inbox:
            if kind == "data":
                size += n
            elif kind == "trailers":
                trailers = payload
        self._inbox.clear()
        self.ack(size)
        return trailers

    # ------------------------------------------------------------ outbound

    def send_headers(self, headers: Headers, end_stream: bool = False) -> None:
        self._conn.send_headers(self, headers, end_stream)

    async def send_data(self, data: bytes, end_stream: bool = False) -> None:
        await self._conn.send_data(self, data, end_stream)

    def send_framed(self, data: bytes, end_stream: bool = False) -> None:
        self._conn.send_framed(self, data, end_stream)

    def window_now(self) -> int | None:
        """The bytes this stream may send now without waiting, or None when the socket is
        full (:meth:`H2Connection.send_data` would wait for it)."""
        return self._conn.window_now(self)

    def end(self) -> None:
        self._conn.send_data_now(self, b"", True)

    def reset(self, code: int = ErrorCodes.CANCEL) -> None:
        self._conn.reset(self, code)


class H2Connection(asyncio.Protocol):
    """The shared half of an HTTP/2 connection; see the module docstring."""

    def __init__(self, *, client_side: bool) -> None:
        # What arrives is validated and normalised by h2 (RFC 9113 §8.2: a malformed block is
        # refused); what is sent is built from such blocks plus the sidecar's own lower-case
        # fields, so checking it again on the way out would only cost CPU (about a tenth of
        # the HTTP/2 path's, measured with h2-overhead).
        self.client_side = client_side
        engine = nghttp2.connection(client_side=client_side)
        if engine is not None:  # libnghttp2, with h2's interface (sidecar/nghttp2.py)
            self.engine = "nghttp2"
            self.conn: Any = engine
            self.configure_engine(engine)
        else:
            config = h2.config.H2Configuration(
                client_side=client_side, header_encoding=None,
                validate_outbound_headers=False, normalize_outbound_headers=False)
            self.engine = "h2"
            self.conn = self.new_state_machine(config)
            self.conn.state_machine = _GracefulGoaway()
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Stream] = {}
        # streams waiting for send credit: what a WINDOW_UPDATE or SETTINGS wakes (not every
        # open stream, so a peer's stream of connection-level updates costs O(1) each)
        self._starved: set[H2Stream] = set()
        self._writable = asyncio.Event()
        self._writable.set()
        self.goaway_received: int | None = None  # the peer's last stream id, once it sent GOAWAY
        self.lost = asyncio.Event()  # set when the socket is closed
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the connection's, once made
        self.lingering = False  # ended with an error: GOAWAY sent, reading what still comes

    def new_state_machine(self, config: h2.config.H2Configuration) -> h2.connection.H2Connection:
        """The ``h2`` connection this one drives; subclasses may give their own kind."""
        return h2.connection.H2Connection(config=config)

    def configure_engine(self, engine: nghttp2.NgConnection) -> None:
        """Subclasses set the libnghttp2 connection's hooks here (its ``h2`` counterpart:
        :meth:`new_state_machine`)."""

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.prepare()
        self.flush()

    def prepare(self) -> None:
        """Called once the preface is queued; subclasses change their SETTINGS here."""

    @property
    def ending(self) -> bool:
        """The connection is closed or being closed: nothing more is handled on it."""
        return self.transport is None or self.transport.is_closing() or self.lingering

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # after our GOAWAY for an error: dropped (see _shut)
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.info("HTTP/2 protocol error from %s: %s", self.peer(), exc)
            self.flush_now()  # the engine queued a GOAWAY
            self._shut(linger=True)
            return
        for event in events:
            self.dispatch(event)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._writable.set()
        self._fail_streams(f"connection closed: {exc}" if exc else "connection closed")
        self.lost.set()

    def _fail_streams(self, detail: str) -> None:
        """Every open stream ends with :class:`StreamGone` (the connection is over)."""
        gone = StreamGone(None, detail)
        for stream in list(self.streams.values()):
            stream._gone(gone)
            self.stream_closed(stream)
        self.streams.clear()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # ------------------------------------------------------------ events

    def dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:  # we reset it already: give the credit straight back
                self.acknowledge(event.stream_id, event.flow_controlled_length)
            else:
                stream._push("data", event.data, event.flow_controlled_length)
        elif isinstance(event, h2.events.TrailersReceived):
            if (stream := self.streams.get(event.stream_id)) is not None:
                stream._push("trailers", list(event.headers))
        elif isinstance(event, h2.events.StreamEnded):
            if (stream := self.streams.get(event.stream_id)) is not None:
                stream.ended = True
                stream._push("end")
                self._maybe_done(stream)
        elif isinstance(event, h2.events.StreamReset):
            if (stream := self.streams.pop(event.stream_id, None)) is not None:
                stream.reset_code = event.error_code
                if not (self.client_side and stream.ended
                        and event.error_code == ErrorCodes.NO_ERROR):
                    stream.discard()
                # else a server sent its whole answer, then asked us to stop sending the
                # request (RFC 9113 §8.1): the answer stays readable, and reading raises
                # only after the inbox runs dry
                stream._gone(StreamGone(event.error_code, f"stream reset ({event.error_code!r})"))
                self.stream_closed(stream)
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id == 0:
                self._wake_starved()
            elif (stream := self.streams.get(event.stream_id)) is not None:
                stream.window.set()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._wake_starved()
            self.settings_changed()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway_received = event.last_stream_id or 0
            self.terminated(event)
        else:
            self.other_event(event)

    def other_event(self, event: h2.events.Event) -> None:
        """Events the subclass handles (a request, a response head)."""

    def settings_changed(self) -> None:
        """The peer changed its SETTINGS (e.g. SETTINGS_MAX_CONCURRENT_STREAMS)."""

    def terminated(self, event: h2.events.ConnectionTerminated) -> None:
        """The peer sent GOAWAY."""

    def stream_closed(self, stream: H2Stream) -> None:
        """A stream left ``self.streams`` (finished, reset or its connection lost)."""

    # ------------------------------------------------------------ sending

    def flush(self) -> None:
        """Write what h2 has queued, once per turn of the event loop: the frames that the
        streams of this connection produce in one turn go out in one write."""
        if not self._flush_scheduled and self.transport is not None:
            self._flush_scheduled = True
            (self._loop or asyncio.get_running_loop()).call_soon(self.flush_now)

    def flush_now(self) -> None:
        self._flush_scheduled = False
        data = self.conn.data_to_send()
        if data and not self.ending:
            assert self.transport is not None
            self.transport.write(data)
        if self.engine == "nghttp2":  # streams the library closed while it sent (see
            for event in self.conn.take_events():  # NgConnection.take_events)
                self.dispatch(event)

    def peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return f"{peer[0]}:{peer[1]}" if peer else "?"

    def _check(self, stream: H2Stream) -> None:
        if stream.closed is not None:
            raise stream.closed
        if self.transport is None:
            raise StreamGone(None, "connection closed")

    def send_headers(self, stream: H2Stream, headers: Headers, end_stream: bool) -> None:
        self._check(stream)
        try:
            self.conn.send_headers(stream.id, headers, end_stream=end_stream)
        except H2_ERRORS as exc:
            raise StreamGone(None, f"cannot send headers: {exc}") from exc
        stream.head_sent = True
        self.flush()
        if end_stream:
            stream.local_ended = True
            self._maybe_done(stream)

    def send_data_now(self, stream: H2Stream, data: bytes, end_stream: bool) -> None:
        self._check(stream)
        try:
            if data:
                self.conn.send_data(stream.id, data, end_stream=end_stream)
            elif end_stream:
                self.conn.end_stream(stream.id)
        except H2_ERRORS as exc:
            raise StreamGone(None, f"cannot send data: {exc}") from exc
        self.flush()
        if end_stream:
            stream.local_ended = True
            self._maybe_done(stream)

    async def send_data(self, stream: H2Stream, data: bytes, end_stream: bool) -> None:
        """Send ``data`` as the windows allow, waiting for credit and for the socket."""
        view = memoryview(data)
        while True:
            self._check(stream)
            if not self._writable.is_set():
                await self._writable.wait()
                continue
            try:
                window = self.conn.local_flow_control_window(stream.id)
            except H2_ERRORS as exc:
                raise StreamGone(None, f"stream closed: {exc}") from exc
            size = min(window, self.conn.max_outbound_frame_size, len(view))
            if size == 0 and view:
                stream.window.clear()
                self._starved.add(stream)
                try:
                    await stream.window.wait()
                finally:
                    self._starved.discard(stream)
                continue
            last = size == len(view)
            self.send_data_now(stream, bytes(view[:size]), end_stream and last)
            view = view[size:]
            if last:
                return

    def window_now(self, stream: H2Stream) -> int | None:
        """:meth:`H2Stream.window_now`."""
        self._check(stream)
        if not self._writable.is_set():
            return None
        try:
            return int(self.conn.local_flow_control_window(stream.id))
        except H2_ERRORS as exc:
            raise StreamGone(None, f"stream closed: {exc}") from exc

    def send_framed(self, stream: H2Stream, data: bytes, end_stream: bool) -> None:
        """:meth:`send_data` without waiting, for a caller that saw :meth:`window_now` take
        it all: ``data`` queued now, in frames of the peer's size."""
        frame = max(1, int(self.conn.max_outbound_frame_size))
        view = memoryview(data)
        while True:
            chunk, view = view[:frame], view[frame:]
            self.send_data_now(stream, bytes(chunk), end_stream and not view)
            if not view:
                return

    def _wake_starved(self) -> None:
        for stream in self._starved:
            stream.window.set()

    def acknowledge(self, stream_id: int, size: int) -> None:
        if self.transport is None:
            return
        try:
            self.conn.acknowledge_received_data(size, stream_id)
        except H2_ERRORS:
            return  # the stream is gone: h2 has already counted the connection's share
        self.flush()

    def unacknowledged(self) -> int:
        """Bytes of DATA received on this connection that were not yet given credit back
        (:meth:`H2Stream.ack`): what the peer may not send again until they are."""
        if self.engine != "h2":
            return int(self.conn.unacknowledged())
        window = self.conn._inbound_flow_control_window_manager
        return int(window.max_window_size - window.current_window_size
                   - window._bytes_processed)

    def reset(self, stream: H2Stream, code: int) -> None:
        stream.discard()
        if self.streams.pop(stream.id, None) is None:
            stream._gone(StreamGone(code, "stream reset by the sidecar"))
            return
        stream._gone(StreamGone(code, "stream reset by the sidecar"))
        with contextlib.suppress(*H2_ERRORS):
            self.conn.reset_stream(stream.id, error_code=code)
        self.flush()
        self.stream_closed(stream)

    def _maybe_done(self, stream: H2Stream) -> None:
        """Both sides ended: the stream is closed and leaves the table."""
        if stream.ended and stream.local_ended and self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
            stream._gone(StreamGone(None, "stream closed"))
            self.stream_closed(stream)

    def close(self, code: int = ErrorCodes.NO_ERROR, *, linger: bool = False) -> None:
        """Send GOAWAY and close the socket (``linger``: see :meth:`_shut`)."""
        if self.transport is None:
            return
        with contextlib.suppress(*H2_ERRORS):
            self.conn.close_connection(error_code=code)
        self.flush_now()
        self._shut(linger)

    def _shut(self, linger: bool) -> None:
        """Close the socket; with ``linger`` (a connection ended for an error, whose peer may
        still be sending) first end our side and drop what still comes for LINGER seconds:
        closing a socket with unread bytes sends a reset, which can destroy the GOAWAY that
        says why before the peer reads it."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if linger and transport.can_write_eof():
            self.lingering = True
            self._writable.set()
            transport.write_eof()
            asyncio.get_running_loop().call_later(LINGER, transport.close)
            self._fail_streams("connection ended for an HTTP/2 error")
        else:
            transport.close()
