"""The app's HTTP/2 connection to the outbound listener: each stream is one request.

Owns the downstream side of prior-knowledge h2c (RFC 9113 §3.3): the SETTINGS it announces
(a cap on concurrent streams per connection), one task per request stream running the
handler it is given (:class:`sidecar.h2_proxy.H2Outbound`), cancelling that task when the app
resets the stream or hangs up (the app's doing: other streams go on), and the graceful end
(GOAWAY, then close once the streams in flight are done).

It does not route or forward: the handler does. Protocol detection is
:mod:`sidecar.h2_site`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import h2.events
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from sidecar.h2_connection import H2_ERRORS, H2Connection, H2Stream, Headers, StreamGone

log = logging.getLogger(__name__)

DEFAULT_MAX_STREAMS = 256  # concurrent streams one app connection may open (SETTINGS)


class ServerStream(H2Stream):
    """A request stream: its request head, and its response side."""

    __slots__ = ("request",)

    def __init__(self, conn: H2Connection, stream_id: int, request: Headers) -> None:
        super().__init__(conn, stream_id)
        self.request = request

    def header(self, name: bytes) -> bytes | None:
        return next((value for key, value in self.request if key == name), None)


Handler = Callable[[ServerStream], Awaitable[None]]


class H2ServerConnection(H2Connection):
    """One app connection; ``on_close`` is called once when the socket is gone."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_streams: int = DEFAULT_MAX_STREAMS,
        on_close: Callable[[H2ServerConnection], None] | None = None,
    ) -> None:
        super().__init__(client_side=False)
        self.handler = handler
        self.max_streams = max_streams
        self.on_close = on_close
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.draining = False
        self.idle = asyncio.Event()  # set whenever no request is in flight
        self.idle.set()

    def prepare(self) -> None:
        self.conn.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams})

    def other_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            if self.draining:  # after our GOAWAY: not processed, the app may retry elsewhere
                self.conn.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
                return
            stream = ServerStream(self, event.stream_id, list(event.headers))
            self.streams[event.stream_id] = stream
            self.idle.clear()
            self.tasks[event.stream_id] = asyncio.get_running_loop().create_task(
                self._serve(stream))

    async def _serve(self, stream: ServerStream) -> None:
        try:
            await self.handler(stream)
        except (asyncio.CancelledError, StreamGone):
            pass  # the app reset the stream or hung up
        except Exception:
            log.exception("HTTP/2 stream %d from %s failed", stream.id, self.peer())
            stream.reset(ErrorCodes.INTERNAL_ERROR)
        finally:
            self.tasks.pop(stream.id, None)
            if not self.tasks:
                self.idle.set()
                if self.draining or self.goaway_received is not None:
                    self.close()

    def stream_closed(self, stream: H2Stream) -> None:
        # The app reset the stream or the connection is gone: stop its request.
        if stream.reset_code is not None or self.transport is None:
            task = self.tasks.get(stream.id)
            if task is not None and not task.done():
                task.cancel()

    def terminated(self, event: h2.events.ConnectionTerminated) -> None:
        # Graceful (NO_ERROR): the app opens no more streams, the ones it started go on, then
        # we close. Otherwise the connection is over.
        if event.error_code != ErrorCodes.NO_ERROR or not self.tasks:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
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
