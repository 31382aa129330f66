"""The upload rule of :mod:`sidecar.upload`, for the inbound listener's HTTP/2 streams.

Owns how an h2c request stream's body is received (issue 14, finding 1, on the HTTP/2 side).
The rule is the HTTP/1.1 one, with the limits it shares (``policing.upload_timeout``,
``upload_buffer`` and the listener's one :class:`sidecar.upload.UploadMemory`):

- **Buffered first.** The stream's DATA is read *before* the stream asks for a slot, up to
  ``buffer_limit`` bytes or until the shared budget is spent, each frame's flow-control credit
  given back as it is buffered (the client may send up to the buffer without waiting for the
  app). A body that ends within it (every unary gRPC call below the buffer, nearly all API
  bodies) goes to the app whole: its upload time held no slot.
- **One deadline.** What is buffered must arrive within ``timeout`` of the request head.
- **gRPC streaming calls** cannot be buffered whole: a client-streaming or bidi call may wait
  for the app's answer before it sends more. For a gRPC stream (``application/grpc*``) the
  buffering also stops at the first *complete* request message when nothing more has arrived
  yet (:class:`GrpcFraming` follows the 5-byte length prefixes of gRPC's PROTOCOL-HTTP2);
  the stream then asks for its slot and the rest streams to the app as it comes. From then
  on each further request message must be complete within ``timeout`` of its first byte (a
  message trickled byte by byte fails with DEADLINE_EXCEEDED); between messages the client
  may be silent (waiting for the app is what a bidi call does).
- **Failures.** A miss is :attr:`UploadFailure.TIMEOUT` (408; DEADLINE_EXCEEDED to a gRPC
  caller); a client that resets its stream or hangs up before its body (or, for gRPC, the
  message under way) was complete is :attr:`UploadFailure.ABANDONED`. Both count against
  the caller, as on HTTP/1.1 (:mod:`sidecar.h2_inbound` does the counting).
- **Time held.** A streaming call holds its slot while its client still sends; that time
  counts against the caller (:meth:`mesh.admission.AdmissionGate.charge_hold`: as many
  requests as the slot could have served), so holding slots with silent streams is a heavy
  caller's behaviour, punished under congestion like one.

What it must not do: police, answer or count; it reads, relays, and records what happened
in the :class:`sidecar.upload.UploadDeadline`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from h2.errors import ErrorCodes

from sidecar.h2_client import ClientStream
from sidecar.h2_connection import Headers, StreamGone
from sidecar.h2_server import ServerStream
from sidecar.upload import UploadDeadline, UploadFailure, UploadMemory

GRPC_PREFIX = 5  # compressed flag (1 byte) + message length (4 bytes, big-endian)


class GrpcFraming:
    """Where the length-prefixed messages of a gRPC request stream begin and end."""

    __slots__ = ("_need", "_prefix", "messages", "started")

    def __init__(self) -> None:
        self._prefix = b""  # the prefix of the message under way, while incomplete
        self._need = 0  # payload bytes of the message under way still to come
        self.messages = 0  # complete messages seen
        self.started: float | None = None  # when the message under way began (loop time)

    @property
    def at_boundary(self) -> bool:
        """No message is under way (none begun, or the last one complete)."""
        return self.started is None

    def feed(self, data: bytes, now: float) -> None:
        i, n = 0, len(data)
        while i < n:
            if self.started is None:
                self.started = now
            if self._need:
                take = min(self._need, n - i)
                self._need -= take
                i += take
            else:
                take = min(GRPC_PREFIX - len(self._prefix), n - i)
                self._prefix += data[i:i + take]
                i += take
                if len(self._prefix) < GRPC_PREFIX:
                    continue
                self._need = int.from_bytes(self._prefix[1:], "big")
                self._prefix = b""
            if not self._need:
                self.messages += 1
                self.started = None


@dataclass(slots=True)
class H2Upload:
    """What a stream sent before it asked for a slot: ``("data", bytes)``,
    ``("trailers", headers)`` and ``("end", None)`` items; ``complete``: the request side
    ended among them."""

    items: list[tuple[str, Any]] = field(default_factory=list)
    complete: bool = False
    ended_at: float | None = None  # when the rest of it ended (relayed by :func:`pump_upload`)


async def receive_stream_upload(stream: ServerStream, deadline: UploadDeadline,
                                buffer_limit: int, memory: UploadMemory | None,
                                framing: GrpcFraming | None,
                                trailers: Callable[[Headers], Headers] | None = None,
                                ) -> H2Upload:
    """Read ``stream``'s request side until it ends, ``buffer_limit`` bytes, the shared
    ``memory`` is spent or (``framing``: a gRPC call) a complete message with nothing more
    arrived yet; record a miss of the deadline or a client gone in ``deadline.failure``
    (the caller checks it). Buffered bytes are recorded in ``deadline.held``; ``trailers``
    filters a trailer section as it is buffered (the game headers out, counted even if the
    app answers before they are relayed)."""
    upload = H2Upload()
    loop = asyncio.get_running_loop()
    size = 0
    try:
        async with asyncio.timeout(deadline.left()):
            while size < buffer_limit and (memory is None or not memory.spent()):
                if (framing is not None and framing.messages and framing.at_boundary
                        and not stream.ready()):
                    break  # a streaming call: the rest may wait for the app's answer
                kind, payload, flow = await stream.read()
                if kind != "data":
                    if kind == "trailers" and trailers is not None:
                        payload = trailers(payload)
                    upload.items.append((kind, payload))
                    upload.complete = True
                    return upload
                upload.items.append((kind, payload))
                size += len(payload)
                deadline.received = size
                if memory is not None:
                    memory.take(len(payload))
                    deadline.held += len(payload)
                stream.ack(flow)  # buffered here: the client may go on up to the buffer
                if framing is not None:
                    framing.feed(payload, loop.time())
    except TimeoutError:
        deadline.failure = UploadFailure.TIMEOUT
    except StreamGone:
        deadline.failure = UploadFailure.ABANDONED
    return upload


async def pump_upload(stream: ServerStream, upstream: ClientStream, upload: H2Upload,
                      deadline: UploadDeadline, framing: GrpcFraming | None,
                      timeout: float, clock: Callable[[], float],
                      trailers: Callable[[Headers], Headers] | None = None) -> None:
    """The request side to the app: the buffered items, then (if it has not ended) the rest
    as it arrives, acknowledged to the client only once the app's connection took it. A
    body (or, for gRPC, a message) that misses its deadline is recorded in
    ``deadline.failure`` and the app's stream is cancelled (the relay sees that and answers
    the caller). ``trailers`` filters a trailer section that arrives now (the game headers
    out; one buffered in ``upload`` was filtered as it was buffered)."""
    try:
        for kind, payload in upload.items:
            if kind == "data":
                await upstream.send_data(payload)
            elif kind == "trailers":  # filtered as they were buffered
                upstream.send_headers(payload, end_stream=True)
            else:
                upstream.end()
        if upload.complete:
            return
        loop = asyncio.get_running_loop()
        while True:
            if framing is None:
                by: float | None = deadline.at
            else:
                by = None if framing.started is None else framing.started + timeout
            try:
                async with asyncio.timeout_at(by):
                    kind, payload, size = await stream.read()
            except TimeoutError:
                if upstream.closed is not None:
                    # the app's side is closed already: it answered and declined the rest
                    # (RST_STREAM NO_ERROR, its answer still being relayed), or it is gone
                    # and the relay says so; either way no late upload of the caller's
                    return
                deadline.failure = UploadFailure.TIMEOUT
                upstream.reset(ErrorCodes.CANCEL)
                return
            if kind == "data":
                deadline.received += len(payload)
                if framing is not None:
                    framing.feed(payload, loop.time())
                try:
                    await upstream.send_data(payload)
                finally:  # passed on or dropped: either way the client gets its credit back
                    stream.ack(size)
            else:
                upload.ended_at = clock()
                if kind == "trailers":
                    upstream.send_headers(trailers(payload) if trailers else payload,
                                          end_stream=True)
                else:
                    upstream.end()
                return
    except StreamGone:
        return  # either side went away: the exchange sees it and answers


def upload_open(stream: ServerStream, framing: GrpcFraming | None) -> bool:
    """Whether the client is still sending something it must finish: a body (not ended), or
    for gRPC a message under way (between messages a streaming call may be silent)."""
    if stream.ended:
        return False
    return framing is None or not framing.at_boundary
