"""HTTP/2 and gRPC on the inbound listener: each stream policed and forwarded on its own.

Owns the per-stream path of a caller's h2c request to the local app (the inbound listener's
socket tells h2c from HTTP/1.1 by the preface, :mod:`sidecar.h2_site`, and hands each stream
here). A stream goes through the same decisions as an HTTP/1.1 request
(:class:`sidecar.inbound_policing.InboundPolicing`, shared with :mod:`sidecar.inbound`):
identity (bound to ``:method``, ``:authority`` and ``:path``; single-use), bid, the caller's
standing, a slot under the app's concurrency limit or a place in the bid queue. Then it is
relayed to the app over h2c (a small multiplexed pool to the app's port,
:mod:`sidecar.h2_client`) with headers, DATA and trailers both ways and flow control
end to end; every ``X-GT-*`` header is stripped on the way in (from the caller) and out (from
the app), and the answer's head carries the signals (``x-gt-congestion``,
``x-gt-reputation``, ``x-gt-price``, and ``x-gt-signals`` signing them over the caller's
``x-gt-challenge``; HTTP/2 header names are lower case).

Refusals are the caller's protocol: for a gRPC caller a trailers-only answer whose
``grpc-status`` is RESOURCE_EXHAUSTED (punished, queue full, queue timeout, local rate
limit), INVALID_ARGUMENT (bad bid, bad target) or UNAVAILABLE (shutting down, the app did not
answer), with ``grpc-message`` naming the reason and the signals beside it; a JSON body like
the HTTP/1.1 path's otherwise. A ``grpc-timeout`` bounds the wait for the app (then
DEADLINE_EXCEEDED).

The slot is held until the app's answer ended, or, for a gRPC answer that goes on streaming
(a second after its first message, or ``upload_timeout`` after a head with no message), until
then: the call goes on as a long-lived exchange of its caller; the RTT the limiter learns is
the time to the first response message (or the trailers) for gRPC, so a long stream is not a
slow app, and the whole exchange otherwise. A caller that resets its stream (or hangs up) is
its own doing: the app's stream is cancelled, the slot goes back without an RTT, nothing is
counted against the app (the call is counted ``caller-hung-up``), and the connection to the
app stays for the other streams.

It does not decide who is admitted (:mod:`sidecar.inbound_policing`, :mod:`mesh.admission`)
nor parse the connection (:mod:`sidecar.h2_server`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING

from h2.errors import ErrorCodes
from multidict import CIMultiDict

from mesh.admission import RejectReason
from sidecar.errors import UNREACHED, ErrorReason, HeaderDrop
from sidecar.h2_client import ClientStream, H2ConnectError, H2Upstreams
from sidecar.h2_connection import Headers, StreamGone
from sidecar.h2_proxy import pump_at_once, pump_request
from sidecar.h2_server import ServerStream
from sidecar.h2_upload import (
    GrpcFraming,
    H2Upload,
    pump_upload,
    receive_stream_upload,
    upload_open,
)
from sidecar.inbound_policing import InboundOutcome, Refusal, Verdict, app_unreachable
from sidecar.upload import UploadDeadline, UploadFailure, release
from wire import grpc_status as grpc
from wire.headers import is_gt_field
from wire.identity import BoundRequest

if TYPE_CHECKING:
    from sidecar.inbound import InboundProxy

log = logging.getLogger(__name__)

ANSWER_STREAMING_AFTER = 1.0
"""Seconds after its first response message that a gRPC call still answering gives its slot
back and goes on as a long-lived exchange (:meth:`_Call.answer_outlived_slot`): a unary call
has ended well before (its message is its answer), a server-streaming one has not."""

_EXHAUSTED = frozenset({RejectReason.PUNISHED, RejectReason.QUEUE_FULL,
                        RejectReason.QUEUE_TIMEOUT, ErrorReason.LOCAL_RATE_LIMITED})


def grpc_status_of(refusal: Refusal) -> int:
    """The ``grpc-status`` a gRPC caller gets for a refusal of the inbound listener."""
    if refusal.reason in _EXHAUSTED:
        return grpc.RESOURCE_EXHAUSTED
    if refusal.reason == ErrorReason.UPLOAD_TIMEOUT:
        return grpc.DEADLINE_EXCEEDED
    if refusal.status == 400:
        return grpc.INVALID_ARGUMENT
    if refusal.reason == ErrorReason.UPSTREAM_TIMEOUT:
        return grpc.DEADLINE_EXCEEDED
    return grpc.UNAVAILABLE  # shutting down, or the app did not answer


def _header_block(headers: dict[str, str]) -> Headers:
    return [(name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in headers.items()]


class H2Inbound:
    """Serves the inbound listener's HTTP/2 streams; one per sidecar process, beside the
    :class:`sidecar.inbound.InboundProxy` whose policing and settings it shares."""

    def __init__(self, proxy: InboundProxy, *, upstreams: H2Upstreams | None = None) -> None:
        self.proxy = proxy
        self.policing = proxy.policing
        self.metrics = proxy.metrics
        self.app = proxy.app_url
        self.via = f"2 {proxy.sidecar_id}".encode()
        self.upstreams = upstreams or H2Upstreams(connect_timeout=proxy.connect_timeout)

    def close(self) -> None:
        self.upstreams.close()

    async def handle(self, stream: ServerStream) -> None:
        """Serve one request stream (the handler :class:`H2ServerConnection` runs)."""
        call = _Call(self, stream)
        try:
            await call.run()
        finally:
            call.done()
            if not stream.ended and stream.closed is None:
                stream.reset(ErrorCodes.NO_ERROR)  # answered before the caller finished
            # a body nobody read still gives its credit back; trailers that came after the
            # app answered are not relayed, but their game headers are counted all the same
            if (unread := stream.discard()) is not None:
                call.caller_trailers(unread)


class _Call:
    """One stream's trip through the inbound listener.

    With a slot at stake (policing on), the request side is received first
    (:mod:`sidecar.h2_upload`, under ``deadline``); a gRPC streaming call whose request side
    is still open ``upload_timeout`` after it got its slot gives the slot back and goes on as
    a long-lived exchange of its caller, like a WebSocket (``long_lived``; beyond the caller's
    ``websocket_max_per_caller`` it is ended with RESOURCE_EXHAUSTED instead, ``cut``). The
    time such a stream held its slot while its client still sent is charged to the caller
    (:meth:`charge_hold`)."""

    __slots__ = ("admitted_at", "answer_timer", "answered", "counted", "cut", "deadline",
                 "first_at", "framing", "head_at", "holding", "is_grpc", "long_lived", "owner",
                 "slot", "started", "stream", "streaming", "timer", "upstream", "verdict",
                 "waiting")

    def __init__(self, owner: H2Inbound, stream: ServerStream) -> None:
        self.owner = owner
        self.stream = stream
        self.is_grpc = grpc.is_grpc(stream.header(b"content-type"))
        self.verdict: Verdict | None = None
        self.deadline: UploadDeadline | None = None
        self.framing: GrpcFraming | None = None
        self.answered = False  # the answer's head went to the caller
        self.counted = False  # an upload failure was counted against the caller
        self.holding = False  # the stream holds an app slot
        self.long_lived = False  # counted as a long-lived exchange of its caller
        self.cut = False  # ended by the sidecar: over the caller's long-lived cap
        self.timer: asyncio.TimerHandle | None = None  # a call still sending: outlived_slot
        self.answer_timer: asyncio.TimerHandle | None = None  # its answer: answer_outlived_slot
        self.upstream: ClientStream | None = None
        self.streaming: H2Upload | None = None  # a call that took its slot still sending
        self.admitted_at = 0.0
        self.started = 0.0  # when it was forwarded to the app (proxy clock)
        self.head_at: float | None = None  # when the app's answer head came
        self.first_at: float | None = None  # when its first response message came (gRPC)
        self.waiting = -1  # its key in the probe answers' AwaitedAnswers while at the app
        self.slot = 0  # the app slot the gate gave it (mesh.admission.Admit.slot)

    def done(self) -> None:
        """The stream's task ended (answered, failed or cancelled): a caller that went away
        with its body (or gRPC message) half-sent abandoned an upload; buffers and the
        long-lived count are given back."""
        stream, deadline, verdict = self.stream, self.deadline, self.verdict
        self.cancel_timers()
        if (deadline is not None and verdict is not None and not self.counted
                and deadline.failure is None and upload_open(stream, self.framing)
                and (stream.reset_code is not None or stream.peer_host() is None)):
            deadline.failure = UploadFailure.ABANDONED
            self.count_upload_failure(verdict, UploadFailure.ABANDONED)
        release(deadline, self.owner.proxy.upload_memory)
        if self.long_lived and verdict is not None:
            self.long_lived = False
            self.owner.proxy.close_long_lived(verdict.caller)

    async def run(self) -> None:
        owner, stream = self.owner, self.stream
        policing = owner.policing
        now = owner.proxy.clock()
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in stream.request:
            if not name.startswith(b":"):
                headers.add(name.decode("latin-1"), value.decode("latin-1"))
        authority = stream.header(b":authority") or stream.header(b"host") or b""
        bound = BoundRequest((stream.header(b":method") or b"").decode("latin-1"),
                             authority.decode("latin-1"),
                             (stream.header(b":path") or b"").decode("latin-1"))
        verdict, policed = policing.police(headers, bound, now, stream.local_ip())
        self.verdict = verdict
        if isinstance(policed, Refusal):
            return await self.reply(verdict, policed)
        upload: H2Upload | None = None
        if policed is not None:  # the body first: its upload time holds no slot
            settings = owner.proxy.settings
            self.deadline = UploadDeadline(asyncio.get_running_loop().time()
                                           + settings.upload_timeout)
            self.framing = GrpcFraming() if self.is_grpc else None
            upload = await receive_stream_upload(stream, self.deadline, settings.upload_buffer,
                                                 owner.proxy.upload_memory, self.framing,
                                                 self.caller_trailers)
            if self.deadline.failure is not None:
                return await self.upload_failed(verdict)
            try:
                long = False
                if policing.declares_long:
                    accept = stream.header(b"accept")
                    long = policing.declared_long(
                        bound.method, bound.target,
                        accept.decode("latin-1") if accept is not None else None)
                admitted = await policing.admit(verdict, policed, now, long=long)
            except asyncio.CancelledError:
                self.count_caller_gone(verdict)  # reset (or hung up) while queued
                raise
            if isinstance(admitted, Refusal):
                return await self.reply(verdict, admitted)
            self.slot = admitted.slot
        await self.forward(verdict, tracked=policed is not None, upload=upload)

    # ------------------------------------------------------------ to the app and back

    def app_headers(self) -> Headers:
        """The caller's request as the app gets it: ``X-GT-*`` stripped, Via and
        X-Forwarded-For added (several fields of one name are one list in HTTP/2), and
        X-Forwarded-Proto when no earlier hop set it."""
        stream = self.stream
        out: Headers = [(name, value) for name, value in stream.request
                        if not is_gt_field(name)]
        out.append((b"via", self.owner.via))
        if (host := stream.peer_host()) is not None:
            out.append((b"x-forwarded-for", host.encode("latin-1")))
        if not any(name == b"x-forwarded-proto" for name, _ in out):  # kept as first set
            out.append((b"x-forwarded-proto", b"http"))
        return out

    def _stripped(self, headers: Headers, source: HeaderDrop) -> Headers:
        """``headers`` without ``X-GT-*``, counted once per block under ``source``."""
        out: Headers = [(name, value) for name, value in headers
                        if not is_gt_field(name)]
        if len(out) != len(headers):
            self.owner.metrics.stripped.labels(source).inc()
        return out

    def caller_trailers(self, headers: Headers) -> Headers:
        """The caller's request trailers as the app gets them: ``X-GT-*`` stripped (counted
        per message, as on HTTP/1.1: no game signal rides in a trailer section)."""
        return self._stripped(headers, HeaderDrop.IN_TRAILERS)

    def answer_headers(self, headers: Headers, verdict: Verdict | None) -> Headers:
        """The app's header block without ``X-GT-*`` (counted), plus Via and, on the head,
        the signals."""
        out = self._stripped(headers, HeaderDrop.FROM_APP)
        if verdict is not None:
            out.append((b"via", self.owner.via))
            out.extend(_header_block(self.owner.policing.signal_headers(verdict)))
        return out

    async def forward(self, verdict: Verdict, *, tracked: bool,
                      upload: H2Upload | None = None) -> None:
        """Relay the stream to the app and its answer back; ``tracked`` holds a slot;
        ``upload``: what was received before the slot (None: relayed as it comes)."""
        owner, stream = self.owner, self.stream
        proxy, policing = owner.proxy, owner.policing
        loop = asyncio.get_running_loop()
        started = proxy.clock()
        first: float | None = None  # gRPC: the first response message, or the trailers
        finished = False
        deadline: float | None = None
        if self.is_grpc and (raw := stream.header(b"grpc-timeout")) is not None:
            timeout = grpc.parse_timeout(raw)
            deadline = loop.time() + timeout if timeout is not None else None
        # the call's deadline, when it has one, bounds the wait for the app's answer; the
        # request timeout, when it has none (as on the outbound side)
        head_by = loop.time() + proxy.request_timeout if deadline is None else deadline
        policing.in_flight += 1
        self.waiting = proxy.probes.awaited.sent(started)
        self.holding = tracked
        self.started = started
        if tracked and upload is not None and not upload.complete:
            self.streaming = upload
            self.admitted_at = started
            self.timer = loop.call_later(proxy.settings.upload_timeout, self.outlived_slot)
        try:
            try:
                pool = owner.upstreams.pool(owner.app)
                headers = self.app_headers()
                ready = pool.open_ready(headers, False)  # a connection with room: no wait
                if ready is not None:
                    upstream = ready
                else:
                    async with asyncio.timeout_at(head_by):
                        upstream = await pool.open_stream(headers, False)
            except (H2ConnectError, TimeoutError) as exc:
                reason = (ErrorReason.CONNECT_ERROR if isinstance(exc, H2ConnectError)
                          else ErrorReason.CONNECT_TIMEOUT)
                return await self.app_failed(verdict, 502, reason, str(exc) or reason)
            except StreamGone as exc:
                return await self.app_failed(verdict, 502, ErrorReason.UPSTREAM_RESET, str(exc))
            self.upstream = upstream
            pump: asyncio.Task[None] | None = None  # None: it went up at once
            try:
                if upload is not None and self.deadline is not None:
                    pump = loop.create_task(pump_upload(stream, upstream, upload, self.deadline,
                                                        self.framing,
                                                        proxy.settings.upload_timeout,
                                                        proxy.clock, self.caller_trailers))
                elif not pump_at_once(stream, upstream, None, self.caller_trailers):
                    pump = loop.create_task(pump_request(stream, upstream,
                                                         trailers=self.caller_trailers))
                first, finished = await self.relay(verdict, upstream, head_by, deadline)
            finally:
                if pump is not None and not pump.done():
                    pump.cancel()
                if upstream.closed is None:
                    upstream.reset(ErrorCodes.CANCEL)  # the caller went away: so does the call
                upstream.discard()
        finally:
            policing.in_flight -= 1
            proxy.probes.awaited.ended(self.waiting)
            now = proxy.clock()
            self.cancel_timers()
            if self.holding:  # the slot goes back to the gate (with the RTT if the app answered)
                self.holding = False
                if self.streaming is not None:  # the time its client still sent: its cost
                    ended = self.streaming.ended_at
                    self.charge_hold((ended if ended is not None else now) - self.admitted_at)
                policing.finish(((first if first is not None else now) - started)
                                if finished else None, self.slot)
            if finished:
                self.owner.metrics.requests.labels(verdict.label, InboundOutcome.ADMITTED).inc()
                self.owner.metrics.app_latency.observe(now - started)
                proxy.probes.record(now, (first if first is not None else now) - started)
            else:
                self.count_caller_gone(verdict)

    async def relay(self, verdict: Verdict, upstream: ClientStream, head_by: float,
                    deadline: float | None) -> tuple[float | None, bool]:
        """The app's answer to the caller: (when its first message came, whether it ended)."""
        stream, clock = self.stream, self.owner.proxy.clock
        loop = asyncio.get_running_loop()
        first: float | None = None
        try:
            async with asyncio.timeout_at(head_by):
                head = await upstream.head
        except TimeoutError:
            if deadline is not None and loop.time() >= deadline:
                await self.app_failed(verdict, 504, ErrorReason.UPSTREAM_TIMEOUT,
                                      "deadline exceeded waiting for the app")
            else:
                await self.app_failed(verdict, 504, ErrorReason.UPSTREAM_TIMEOUT,
                                      "no answer in time")
            return None, False
        except StreamGone as exc:
            if stream.closed is not None or self.cut:
                return None, False  # the caller went away first, or was cut off
            if self.upload_missed():  # the caller's upload failed: its doing, not the app's
                await self.upload_failed(verdict)
                return None, False
            if exc.code == ErrorCodes.REFUSED_STREAM:  # not processed: the caller may resend
                stream.reset(ErrorCodes.REFUSED_STREAM)
                return None, False
            await self.app_failed(verdict, 502, ErrorReason.UPSTREAM_RESET, str(exc))
            return None, False
        self.owner.proxy.probes.awaited.answered(self.waiting, clock())
        trailers_only = upstream.head_ended
        try:
            stream.send_headers(self.answer_headers(head, verdict), end_stream=trailers_only)
            self.answered = True
            if trailers_only:
                return clock(), True
            self.head_at = clock()
            if self.holding and self.is_grpc:  # no message yet: a unary call at work, or a
                # watch waiting for a change (alike on the wire): a bound, not a second
                self.answer_timer = loop.call_later(
                    self.owner.proxy.settings.upload_timeout, self.answer_outlived_slot)
            async with asyncio.timeout_at(deadline):
                while True:
                    kind, payload, size = await upstream.read()
                    if kind == "data":
                        if first is None and self.is_grpc:
                            first = self.first_at = clock()
                            if self.holding:  # a stream, or done in a moment?
                                if self.answer_timer is not None:
                                    self.answer_timer.cancel()
                                self.answer_timer = loop.call_later(
                                    ANSWER_STREAMING_AFTER, self.answer_outlived_slot)
                        try:
                            await stream.send_data(payload)
                        finally:  # passed on or dropped: either way the app gets credit
                            upstream.ack(size)
                    elif kind == "trailers":
                        if first is None and self.is_grpc:
                            first = clock()
                        stream.send_headers(self.answer_headers(payload, None), end_stream=True)
                        return first, True
                    else:
                        stream.end()
                        return first, True
        except StreamGone:
            if stream.closed is not None or self.cut:
                return first, False  # the caller reset or hung up (its doing), or was cut off
            if self.upload_missed():
                self.end_late_upload(verdict)
                return first, False
            self.owner.metrics.requests.labels(verdict.label, InboundOutcome.APP_ERROR).inc()
            self.owner.proxy.app_failed_notice("answer-cut", "stream broke mid-answer")
            if self.is_grpc and not stream.local_ended:  # as gRPC maps the app's reset
                code = upstream.reset_code  # None: the sidecar's own reset, or a lost socket
                stream.send_headers([(b"grpc-status", b"%d" % grpc.status_of_reset(code)),
                                     (b"grpc-message", b"the app's stream broke")], True)
            else:
                stream.reset(ErrorCodes.INTERNAL_ERROR)
            return first, False
        except TimeoutError:  # the gRPC deadline passed mid-answer
            if stream.closed is None and not stream.local_ended:
                stream.send_headers([(b"grpc-status", b"%d" % grpc.DEADLINE_EXCEEDED),
                                     (b"grpc-message", b"deadline exceeded in the sidecar")],
                                    True)
            return first, False

    # ------------------------------------------------------------ uploads and long streams

    def upload_missed(self) -> bool:
        return self.deadline is not None and self.deadline.failure is not None

    def count_upload_failure(self, verdict: Verdict, failure: UploadFailure) -> None:
        """Counted as on HTTP/1.1 (``equilibrium_inbound_slow_uploads``, the request's
        outcome) and against the caller's reputation (:meth:`AdmissionGate.defect`)."""
        if self.counted:
            return
        self.counted = True
        proxy, metrics = self.owner.proxy, self.owner.metrics
        timeout = failure is UploadFailure.TIMEOUT
        metrics.requests.labels(verdict.label, InboundOutcome.UPLOAD_TIMEOUT if timeout
                                else InboundOutcome.UPLOAD_ABANDONED).inc()
        metrics.slow_uploads.labels(verdict.label, failure).inc()
        self.owner.policing.deliver(proxy.gate.defect(verdict.caller, proxy.clock()))
        verdict.decision = None  # the standing as it is after the defection

    async def upload_failed(self, verdict: Verdict) -> None:
        """Before the app answered: 408 (DEADLINE_EXCEEDED for gRPC), or nobody to answer."""
        assert self.deadline is not None and self.deadline.failure is not None
        failure = self.deadline.failure
        self.count_upload_failure(verdict, failure)
        if failure is UploadFailure.TIMEOUT:
            what = "request message" if self.is_grpc and self.framing is not None \
                and self.framing.messages else "request body"
            await self.reply(verdict, Refusal(
                408, ErrorReason.UPLOAD_TIMEOUT,
                f"the {what} did not arrive within "
                f"{self.owner.proxy.settings.upload_timeout:g} s"))
        else:
            await self.reply(verdict, Refusal(400, ErrorReason.UPLOAD_ABANDONED,
                                              "the request body was abandoned"))

    def end_late_upload(self, verdict: Verdict) -> None:
        """The app was answering when a request message came too late: the call ends with
        DEADLINE_EXCEEDED (gRPC) or a reset."""
        assert self.deadline is not None and self.deadline.failure is not None
        self.count_upload_failure(verdict, self.deadline.failure)
        self.end_stream(grpc.DEADLINE_EXCEEDED, "a request message did not arrive within "
                        f"{self.owner.proxy.settings.upload_timeout:g} s")

    def end_stream(self, status: int, message: str) -> None:
        stream = self.stream
        if stream.closed is not None:
            return
        if self.is_grpc and not stream.local_ended:
            stream.send_headers([(b"grpc-status", b"%d" % status),
                                 (b"grpc-message", grpc.encode_message(message))]
                                if self.answered
                                else grpc.trailers_only(status, message, []), True)
        else:
            stream.reset(ErrorCodes.CANCEL)

    def charge_hold(self, held: float) -> None:
        """A streaming call held its slot ``held`` s while its client still sent: counted
        against the caller (:meth:`mesh.admission.AdmissionGate.charge_hold`)."""
        if self.verdict is not None and held > 0:
            proxy = self.owner.proxy
            self.owner.policing.deliver(
                proxy.gate.charge_hold(self.verdict.caller, held, proxy.clock()))

    def outlived_slot(self) -> None:
        """``upload_timeout`` after its slot, the caller still sends (a client-streaming or
        bidi call): the slot goes back to the gate and the stream goes on as a long-lived
        exchange of its caller, or, past the caller's cap of those, is ended."""
        self.timer = None
        verdict, stream, owner = self.verdict, self.stream, self.owner
        if not self.holding or verdict is None or stream.closed is not None:
            return
        if stream.ended:  # the request side ended meanwhile: only the answer may outlive
            return  # the slot now (answer_outlived_slot, its own timer)
        self.holding = False
        self.charge_hold(owner.proxy.clock() - self.admitted_at)
        owner.policing.finish(None, self.slot)
        if owner.proxy.open_long_lived(verdict.caller):
            self.long_lived = True
            return
        self.cut = True
        owner.metrics.requests.labels(verdict.label, InboundOutcome.WEBSOCKET_LIMIT).inc()
        cap = owner.proxy.settings.websocket_max_per_caller
        self.end_stream(grpc.RESOURCE_EXHAUSTED, f"{ErrorReason.WEBSOCKET_LIMIT}: caller "
                        f"{verdict.caller!r} already has {cap} long-lived streams open")
        if self.upstream is not None and self.upstream.closed is None:
            self.upstream.reset(ErrorCodes.CANCEL)

    def count_caller_gone(self, verdict: Verdict) -> None:
        """A call that ended because its caller reset its stream or hung up (not cut by the
        sidecar) is counted ``caller-hung-up``, as on HTTP/1.1; other endings count their
        own outcome where they happen."""
        stream = self.stream
        if self.cut or stream.closed is None:
            return
        if self.deadline is not None and not self.counted \
                and upload_open(stream, self.framing):
            return  # left mid-upload: an abandoned upload, counted as such by done()
        if stream.reset_code is not None or stream.peer_host() is None:
            self.owner.metrics.requests.labels(verdict.label,
                                               InboundOutcome.CALLER_HUNG_UP).inc()

    def answer_outlived_slot(self) -> None:
        """A gRPC call's answer still goes on :data:`ANSWER_STREAMING_AFTER` after its first
        response message (a server-streaming call: a watch, a feed), or ``upload_timeout``
        after its head with no message yet (a unary handler that sent its metadata first
        and still works, or a watch that did and waits for a change: the two look alike,
        hence the longer bound): the slot goes back to the gate, with the time to that first
        message (or the head) as the RTT it learns, and the call goes on as a long-lived
        exchange of its caller, so streams cannot take the app's concurrency from its short
        calls. Past the caller's cap of those it keeps its slot, as before (it is not cut:
        its answer is under way)."""
        self.answer_timer = None
        verdict, stream, owner = self.verdict, self.stream, self.owner
        if not self.holding or verdict is None or stream.local_ended \
                or stream.closed is not None or self.head_at is None:
            return
        if not owner.proxy.open_long_lived(verdict.caller):
            return
        self.holding = False
        self.long_lived = True
        owner.policing.finish((self.first_at or self.head_at) - self.started, self.slot)

    def cancel_timers(self) -> None:
        for timer in (self.timer, self.answer_timer):
            if timer is not None:
                timer.cancel()
        self.timer = self.answer_timer = None

    # ------------------------------------------------------------ the sidecar's own answers

    async def app_failed(self, verdict: Verdict, status: int, reason: ErrorReason,
                         detail: str) -> None:
        owner = self.owner
        owner.metrics.requests.labels(verdict.label, InboundOutcome.APP_ERROR).inc()
        owner.proxy.app_failed_notice(reason, detail)
        if reason in UNREACHED:  # the app never saw it: a signed refusal, which the caller's
            # sidecar may send to another endpoint while it still has the request at hand
            await self.reply(verdict, app_unreachable(detail))
            return
        await self.reply(verdict, Refusal(status, reason, f"the app did not answer: {detail}"))

    async def reply(self, verdict: Verdict, refusal: Refusal) -> None:
        """Answer instead of the app: trailers-only gRPC status, or JSON."""
        owner, stream = self.owner, self.stream
        if stream.closed is not None or stream.local_ended:
            return
        extra = [(b"via", owner.via),
                 *_header_block(owner.policing.signal_headers(verdict, refusal.rejected)),
                 *_header_block(refusal.headers)]
        if self.is_grpc:
            stream.send_headers(grpc.trailers_only(
                grpc_status_of(refusal), f"{refusal.reason}: {refusal.message}", extra),
                end_stream=True)
            return
        body = json.dumps({"error": refusal.message, "reason": refusal.reason,
                           "caller": verdict.caller, "sidecar": owner.proxy.sidecar_id,
                           **refusal.extra}).encode()
        stream.send_headers([(b":status", b"%d" % refusal.status),
                             (b"content-type", b"application/json; charset=utf-8"),
                             (b"content-length", b"%d" % len(body)), *extra])
        await stream.send_data(body, end_stream=True)
