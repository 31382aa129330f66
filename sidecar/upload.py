"""The inbound listener's upload rule: a request body arrives before it may hold an app slot.

Owns how the inbound listener receives a request body (issue 14, finding 1). A slow client
that trickles its body one byte every few seconds must not hold one of the app's few
concurrency slots while it does, and must not be able to take forever:

- **Buffered first.** The body is read into memory *before* the request asks the admission
  gate for a slot (:meth:`mesh.admission.AdmissionGate.offer`), up to ``buffer_limit`` bytes.
  A body that ends within the buffer (nearly all API bodies) is forwarded whole: its upload
  time held no slot.
- **Bounded memory.** All requests' buffers together hold at most ``memory`` bytes
  (:class:`UploadMemory`, ``policing.upload_memory``, 32 MiB); a request that finds it spent
  buffers nothing more and streams the rest (holding a slot while it does, still under the
  deadline), so many simultaneous uploads cannot exhaust the pod's memory.
- **One deadline per request.** The whole body must arrive within ``timeout`` seconds of the
  request head (:class:`UploadDeadline`). A body larger than the buffer is forwarded as it
  arrives once the buffer is full (its tail holds a slot), still under the same deadline.
- **Failures.** A body not received in time is :attr:`UploadFailure.TIMEOUT` (the listener
  answers 408); a client that goes away half-way is :attr:`UploadFailure.ABANDONED`. Both
  count against the caller (:meth:`mesh.admission.AdmissionGate.defect`) and in
  ``equilibrium_inbound_slow_uploads``.

What it must not do: police, forward, answer or count; it reads and says what happened.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum

import aiohttp

from sidecar.exchange import ReceivedBody

DEFAULT_UPLOAD_TIMEOUT = 30.0
"""Seconds from the request head to the last byte of its body (``policing.upload_timeout``)."""
DEFAULT_UPLOAD_BUFFER = 256 * 1024
"""Bytes of a body received before the request asks for a slot (``policing.upload_buffer``)."""
DEFAULT_UPLOAD_MEMORY = 32 * 1024 * 1024
"""Bytes all buffered bodies may hold together (``policing.upload_memory``)."""

# what reading a request body raises when its client is gone or sent a broken body
CLIENT_BODY_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError, aiohttp.ClientError, asyncio.IncompleteReadError, EOFError,
)


class UploadFailure(StrEnum):
    """Why a request body did not arrive: the ``outcome`` label of
    ``equilibrium_inbound_slow_uploads``."""

    TIMEOUT = "timeout"
    """Not all of it within the upload deadline (408)."""
    ABANDONED = "abandoned"
    """The client went away (or broke the body's framing) half-way."""


class UploadFailed(Exception):
    """The body did not arrive; ``failure`` says how."""

    def __init__(self, failure: UploadFailure, received: int) -> None:
        super().__init__(f"request body {failure} after {received} bytes")
        self.failure = failure
        self.received = received


class UploadMemory:
    """The listener's budget of buffered body bytes, shared by its requests."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0

    def spent(self) -> bool:
        return self.used >= self.total

    def take(self, size: int) -> None:
        self.used += size

    def give(self, size: int) -> None:
        self.used = max(0, self.used - size)


@dataclass(slots=True)
class UploadDeadline:
    """When the body must be complete (event-loop time), and what became of it."""

    at: float
    received: int = 0
    failure: UploadFailure | None = field(default=None)
    held: int = 0  # bytes of the shared memory budget this request's buffer holds

    def left(self) -> float:
        return self.at - asyncio.get_running_loop().time()


@dataclass(frozen=True, slots=True)
class Upload:
    """The start of a body, received before any slot was asked for.

    ``complete``: ``head`` is the whole body. Otherwise the rest is still in the stream
    (:func:`upload_rest` streams it, under the same deadline).
    """

    head: bytes
    complete: bool


async def receive_upload(stream: ReceivedBody, deadline: UploadDeadline, buffer_limit: int,
                         memory: UploadMemory | None = None) -> Upload:
    """Read ``stream`` until its end, ``buffer_limit`` bytes, or the shared ``memory`` is
    spent; raise :class:`UploadFailed` when the deadline passes first or the client goes
    away. The bytes held are recorded in ``deadline.held``: give them back to ``memory``
    when the request is done (:func:`release`)."""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(deadline.left()):
            while size < buffer_limit and (memory is None or not memory.spent()):
                chunk = await stream.readany()
                if not chunk:
                    return Upload(b"".join(chunks), True)
                chunks.append(chunk)
                size += len(chunk)
                deadline.received = size
                if memory is not None:
                    memory.take(len(chunk))
                    deadline.held += len(chunk)
    except TimeoutError:
        deadline.failure = UploadFailure.TIMEOUT
        raise UploadFailed(UploadFailure.TIMEOUT, size) from None
    except CLIENT_BODY_ERRORS:
        deadline.failure = UploadFailure.ABANDONED
        raise UploadFailed(UploadFailure.ABANDONED, size) from None
    if stream.at_eof():
        return Upload(b"".join(chunks), True)
    return Upload(b"".join(chunks), False)


def release(deadline: UploadDeadline | None, memory: UploadMemory | None) -> None:
    """The request is done: its buffer's bytes go back to the shared budget."""
    if deadline is not None and memory is not None and deadline.held:
        memory.give(deadline.held)
        deadline.held = 0


async def upload_rest(upload: Upload, stream: ReceivedBody, deadline: UploadDeadline
                      ) -> AsyncIterator[bytes]:
    """The whole body for the app: the buffered head, then (if incomplete) the rest as it
    arrives, each read bounded by the deadline. A miss is recorded in ``deadline.failure``
    (the transport sees the exception and fails the request; the listener reads the cause
    there)."""
    if upload.head:
        yield upload.head
    if upload.complete:
        return
    while True:
        try:
            async with asyncio.timeout(deadline.left()):
                chunk = await stream.readany()
        except TimeoutError:
            deadline.failure = UploadFailure.TIMEOUT
            raise
        except CLIENT_BODY_ERRORS:
            deadline.failure = UploadFailure.ABANDONED
            raise
        if not chunk:
            return
        deadline.received += len(chunk)
        yield chunk
