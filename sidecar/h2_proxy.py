"""HTTP/2 and gRPC on the outbound listener: every stream is routed on its own.

Owns the per-call path of an app's h2c request (:mod:`sidecar.h2_server` hands each stream
here): the upstream named by ``:authority`` (as ``Host`` names it for HTTP/1.1), the
endpoint chosen per stream by that upstream's policy (the same :class:`UpstreamTable`,
phases and metrics as :mod:`sidecar.outbound`), the request relayed over a multiplexed h2c
connection to the endpoint (:mod:`sidecar.h2_client`) with headers, DATA and trailers both
ways and flow control end to end (a DATA frame is acknowledged to the app only once the
upstream took it, and the other way round), and the policy told each call's outcome.

gRPC (gRPC's PROTOCOL-HTTP2; :mod:`wire.grpc_status`): a call's outcome is its
``grpc-status`` (trailers, or the head of a trailers-only answer); UNAVAILABLE,
RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, INTERNAL and UNKNOWN count against the endpoint, other
statuses are the application's answer. The latency the policy learns is the time to the
first response message (or the trailers): the whole call for a unary one, without the length
of a stream. ``grpc-timeout`` is the call's deadline: when it passes the upstream stream is
cancelled and the app gets DEADLINE_EXCEEDED; upstream, the header carries what is left of it.
A call that ran out its caller's deadline is charged to its endpoint; while other endpoints
miss deadlines too it is no failure in a row that ejects it (a deadline too short for every
pod ejected them all).
Errors the sidecar itself answers are trailers-only ``grpc-status: 14`` (UNAVAILABLE) with a
``grpc-message`` for a gRPC caller, a JSON body otherwise.

Retries, within ``max_attempts`` and the upstream's retry budget: a call none of which
reached an endpoint (no connection could be had: nothing was sent, so even a POST cannot have
been processed), to an endpoint not tried yet; and a call the endpoint refused unprocessed
(RST_STREAM REFUSED_STREAM, RFC 9113 §8.7, or above the last stream of its GOAWAY) whose
request so far is still at hand (at most ``REPLAY_LIMIT`` bytes), to any endpoint: grpc-core
refuses streams so while it releases earlier ones, within the limit it announced; and a call
the endpoint's inbound sidecar refused before its app saw it (a signed ``X-GT-Refused``: its
queue was full or timed out, or it is shutting down; docs/protocol.md, "Refusals go
elsewhere") whose request is still at hand, to an endpoint not tried yet, as an attempt of
its own (the budget, the attempts; on the last attempt the refusal is relayed as it came).
Any other call that reached an endpoint is never sent again. The app resetting a stream (or
hanging up) is the app's doing: the upstream stream is cancelled and the endpoint is not blamed.

The phases run are ``request_check`` (the protocol-neutral part of ``request_filter``: the
punished back-off, the app's bid), ``upstream_pick``, ``upstream_request_filter`` (the retry
mark, the challenge, the signed identity and bid), ``response_signals`` (only signed X-GT-*
are believed), ``response_filter`` (on the answer's head, with the believed X-GT-* in
``ctx.game_response_headers``: the price, the back-off) and ``logging``. A
back-off answer is RESOURCE_EXHAUSTED for a gRPC caller, and a RESOURCE_EXHAUSTED whose
``X-GT-Reputation`` says this caller is punished is the caller's doing, not the endpoint's
failure (as a 429 is for HTTP/1.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from h2.errors import ErrorCodes
from multidict import CIMultiDict

from mesh.policy import Outcome
from sidecar.errors import ErrorReason, HeaderDrop
from sidecar.h2_client import ClientStream, H2ConnectError, H2NotSpoken, H2Upstreams
from sidecar.h2_connection import Headers, StreamGone
from sidecar.h2_server import ServerStream
from sidecar.metrics import H2Metrics, OutboundMetrics
from sidecar.notice_log import NoticeLog
from sidecar.outbound import REFUSED_KEY, shown, upstream_name
from sidecar.phases import EarlyAnswer, ProxyPhases, RequestContext
from sidecar.upstreams import UpstreamTable
from wire import grpc_status as grpc
from wire.errors import WireError
from wire.headers import (
    CONGESTION,
    REFUSALS,
    REPUTATION,
    SHED,
    header_label,
    is_gt_field,
    parse_congestion,
)
from wire.long_paths import under_long_path
from wire.standing import parse_standing

log = logging.getLogger(__name__)

REPLAY_LIMIT = 64 * 1024  # request bytes kept to send again after a refused stream


class H2Outbound:
    """Routes and relays the app's HTTP/2 streams; one per sidecar process."""

    def __init__(
        self,
        *,
        sidecar_id: str,
        table: UpstreamTable,
        metrics: OutboundMetrics,
        request_timeout: float,
        connect_timeout: float,
        phases: ProxyPhases | None = None,
        authority_pin: Callable[[str], str | None] | None = None,
        max_attempts: int = 3,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        upstreams: H2Upstreams | None = None,
        h2_metrics: H2Metrics | None = None,
        source_address: str | None = None,
        long_paths: Callable[[str], tuple[str, ...]] | None = None,
    ) -> None:
        self.sidecar_id = sidecar_id
        self.table = table
        self.metrics = metrics
        self.h2_metrics = h2_metrics or H2Metrics(metrics.registry)
        self.request_timeout = request_timeout
        self.phases = phases or ProxyPhases()
        self.authority_pin = authority_pin or (lambda authority: None)
        self.max_attempts = max_attempts
        self.rng = rng or random.Random()
        self.clock = clock
        self.notices = NoticeLog(log, clock)
        # an upstream's declared long requests, by its name (wire.long_paths), as
        # sidecar.outbound's: their answers' time teaches the policy nothing
        self.long_paths: Callable[[str], tuple[str, ...]] = long_paths or (lambda name: ())
        self.via = f"2 {sidecar_id}".encode()
        self.upstreams = upstreams or H2Upstreams(connect_timeout=connect_timeout,
                                                  source_address=source_address)

    def close(self) -> None:
        self.upstreams.close()

    def prune(self) -> None:
        """Off the request path: close the connection pools of endpoints no upstream has."""
        self.upstreams.retain(e for group in self.table for e in group.endpoints)

    async def handle(self, stream: ServerStream, pinned: str | None = None) -> None:
        """Serve one request stream (the handler :class:`H2ServerConnection` runs);
        ``pinned``: the upstream its connection is bound to (transparent interception's
        original destination), else ``:authority`` decides."""
        method = (stream.header(b":method") or b"").decode("latin-1")
        authority = (stream.header(b":authority") or stream.header(b"host") or b"").decode(
            "latin-1")
        ctx = RequestContext(
            started=self.clock(), method=method,
            target=(stream.header(b":path") or b"").decode("latin-1"), authority=authority,
        )
        ctx.upstream = pinned
        call = _Call(self, stream, ctx, grpc.is_grpc(stream.header(b"content-type")))
        try:
            await call.run()
        finally:
            if ctx.group is not None:
                self.metrics.request_in_flight(ctx.group.name, -1)
            if not stream.ended and stream.closed is None:
                stream.reset(ErrorCodes.NO_ERROR)  # answered before the app finished sending
            # a body nobody read still gives its credit back; trailers that came after the
            # answer are not relayed, but their game headers are counted all the same
            if (unread := stream.discard()) is not None:
                call.without_game_headers(unread)
            self.phases.logging(ctx, self.clock())


class _Call:
    """One stream's trip through the proxy."""

    def __init__(self, proxy: H2Outbound, stream: ServerStream, ctx: RequestContext,
                 is_grpc: bool) -> None:
        self.proxy = proxy
        self.stream = stream
        self.ctx = ctx
        self.is_grpc = is_grpc
        self.answered = False  # a response head went to the app
        self.replay = _Replay()
        self.deadline: float | None = None  # the call's grpc-timeout, on the loop's clock

    # ------------------------------------------------------------ routing

    async def run(self) -> None:
        proxy, ctx, stream = self.proxy, self.ctx, self.stream
        if ctx.method == "CONNECT":
            return await self.error(501, "connect-not-supported", "CONNECT is not proxied")
        if not ctx.authority:
            return await self.error(400, "no-host", "request has no :authority")
        ctx.upstream = (ctx.upstream or proxy.authority_pin(ctx.authority)
                        or upstream_name(ctx.authority))
        if stream.header(b"via") is not None and any(
                value.strip() == proxy.via for name, value in stream.request if name == b"via"
                for value in value.split(b",")):
            return await self.error(508, "loop-detected", "request already passed this sidecar")
        group = proxy.table.get(ctx.upstream)
        if group is None:
            return await self.error(
                404, "unknown-upstream",
                f"no upstream named {shown(ctx.upstream)!r} is configured")
        ctx.group = group
        proxy.metrics.request_in_flight(group.name, 1)
        early = proxy.phases.request_check(_RequestHeaders(stream.request), ctx)
        if early is not None:
            return await self.early(early)
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        if self.is_grpc and (raw := stream.header(b"grpc-timeout")) is not None:
            timeout = grpc.parse_timeout(raw)
            if timeout is None:
                # the call's own error, the same on every attempt: not a status a client
                # retries (INTERNAL, as gRPC servers answer a malformed grpc-timeout)
                return await self.error(400, ErrorReason.BAD_GRPC_TIMEOUT, "malformed grpc-timeout",
                                        grpc.INTERNAL)
            deadline = self.deadline = loop.time() + timeout
        base = self.base_headers()
        ctx.long = under_long_path(ctx.target, proxy.long_paths(group.name))
        group.budget.deposit(proxy.clock())
        failure = ""
        failed: list[str] = []  # why each attempt that could not connect failed
        # A refusal (REFUSED_STREAM: not processed, the endpoint's stream limit) is sent again
        # without spending an attempt, up to MAX_REFUSALS times, after a short pause that lets
        # the endpoint release its streams; each re-send is a retry and spends the retry
        # budget, so an upstream that refuses what it did process (a protocol violation) can
        # multiply the load only as far as the budget allows.
        attempt, refusals, refused = 0, 0, False
        while attempt < proxy.max_attempts:
            now = proxy.clock()
            ctx.attempt = attempt + refusals
            endpoint = proxy.phases.upstream_pick(ctx, proxy.rng, now)
            if endpoint is None:
                if not failure:
                    return await self.error(
                        503, "no-endpoint", f"upstream {group.name!r} has no endpoint to use")
                break
            if attempt > 0 or refused:
                if not group.budget.try_withdraw(now):
                    proxy.metrics.retry_budget_exhausted.labels(group.name).inc()
                    break
                proxy.metrics.retries.labels(group.name).inc()
            ctx.endpoint = endpoint
            ctx.tried.append(endpoint)
            ctx.game_response_headers.clear()  # what this attempt's answer says, only
            headers = self.attempt_headers(base, deadline, loop.time())
            sent = proxy.clock()
            group.policy.on_start(endpoint, sent, ctx.long)
            try:
                limit = loop.time() + proxy.request_timeout
                pool = proxy.upstreams.pool(endpoint)
                ready = pool.open_ready(headers, False)  # a connection with room: no wait
                if ready is not None:
                    upstream = ready
                else:
                    async with asyncio.timeout_at(limit if deadline is None
                                                  else min(limit, deadline)):
                        upstream = await pool.open_stream(headers, False)
            except H2NotSpoken as exc:
                # the upstream speaks HTTP/1.1: no endpoint of it is to blame (charged, a few
                # h2c calls ejected every healthy pod of its HTTP/1.1 callers: a stranger's
                # finding), and another endpoint would answer the same
                self.void(sent)
                return await self.error(502, ErrorReason.UPSTREAM_PROTOCOL_ERROR,
                                        f"upstream {group.name!r}: {exc} (HTTP/2 calls "
                                        "need endpoints that speak h2c)")
            except (H2ConnectError, TimeoutError) as exc:
                reason = "connect-error" if isinstance(exc, H2ConnectError) else "connect-timeout"
                failure = f"{reason}: {exc}" if str(exc) else reason
                failed.append(f"{endpoint}: {failure}")
                self.outcome(sent, None, False, reason)
                log.debug("%s %s: attempt %d: %s", group.name, endpoint, attempt + 1, failure)
                if _deadline_passed(deadline, limit if isinstance(exc, TimeoutError) else None,
                                    loop.time()):
                    return await self.deadline_exceeded()
                attempt, refused = attempt + 1, False
                continue  # nothing was sent: another endpoint may take it
            except StreamGone as exc:
                self.outcome(sent, None, False, "upstream-reset")
                return await self.error(502, "upstream-reset", str(exc))
            except asyncio.CancelledError:  # the app reset the stream while we connected
                self.cancelled(sent, None)
                raise
            except BaseException:
                self.outcome(sent, None, False, "proxy-error")
                raise
            ended = await self.exchange(upstream, sent, deadline,
                                        resend_refused=attempt + 1 < proxy.max_attempts)
            if ended is None:
                return None
            if ended == UPSTREAM_REFUSED:  # its sidecar refused it unprocessed (signed)
                failure = UPSTREAM_REFUSED
                attempt, refused = attempt + 1, False
                continue
            # refused unprocessed: another attempt, on any endpoint (this one too: a refusal
            # is the endpoint's stream limit, not its failure)
            failure = ErrorReason.REFUSED_STREAM
            ctx.tried.remove(endpoint)
            refusals, refused = refusals + 1, True
            if refusals > MAX_REFUSALS:
                break
            await asyncio.sleep(REFUSAL_PAUSE * refusals)
        if failure == ErrorReason.REFUSED_STREAM:
            ctx.error_reason = failure
            self.proxy.metrics.errors.labels(group.name, failure).inc()
            stream.reset(ErrorCodes.REFUSED_STREAM)  # the app may send it again
            return None
        if _deadline_due(deadline, loop.time()):  # the attempts ran the deadline out
            return await self.deadline_exceeded()
        if failure == UPSTREAM_REFUSED:
            return await self.error(
                503, UPSTREAM_REFUSED, f"upstream {group.name!r}: {len(ctx.tried)} endpoint(s) "
                "refused it before their app saw it")
        why = "; ".join(failed) if len(failed) > 1 else failure  # each, not the last only
        return await self.error(
            503, "connect-error",
            f"upstream {group.name!r} failed after {len(ctx.tried)} attempt(s): {why}")

    def base_headers(self) -> Headers:
        """The app's request headers as sent upstream: X-GT-* stripped (counted), Via added;
        ``grpc-timeout`` is re-added per attempt with what is left of the deadline."""
        out = [(name, value) for name, value in self.without_game_headers(self.stream.request)
               if name != b"grpc-timeout"]
        out.append((b"via", self.proxy.via))
        return out

    def attempt_headers(self, base: Headers, deadline: float | None, now: float) -> Headers:
        headers = list(base)
        if deadline is not None:
            headers.append((b"grpc-timeout", grpc.format_timeout(max(0.0, deadline - now))))
        extra: CIMultiDict[str] = CIMultiDict()
        self.proxy.phases.upstream_request_filter(self.ctx, extra)
        headers.extend((k.lower().encode("latin-1"), v.encode("latin-1"))
                       for k, v in extra.items())
        return headers

    # ------------------------------------------------------------ one exchange

    async def exchange(self, upstream: ClientStream, sent: float, deadline: float | None,
                       resend_refused: bool = False) -> str | None:
        """Relay the request and the answer of the attempt that reached ``upstream``; None
        when the call ended here (answered, or answered with an error), else why it may be
        sent again: ``"refused-stream"`` (the endpoint refused the stream unprocessed) or,
        with ``resend_refused``, :data:`UPSTREAM_REFUSED` (its sidecar refused it unprocessed,
        signed); either only while what went up is still at hand. A signed
        :data:`wire.headers.APP_RESET` (an HTTP/1.1 app's connection broke before it answered)
        is relayed: a call is sent again only when it never reached an app."""
        proxy, ctx, stream = self.proxy, self.ctx, self.stream
        loop = asyncio.get_running_loop()
        pump: asyncio.Task[None] | None = None  # None: none, or it went up at once
        first: float | None = None  # when the answer's first message (or trailers) came
        recorded = False
        status: int | None = None  # grpc-status
        congestion: float | None = None
        try:
            if not pump_at_once(stream, upstream, self.replay, self.without_game_headers):
                pump = loop.create_task(pump_request(stream, upstream, self.replay,
                                                     self.without_game_headers))
            try:
                # the call's deadline, when it has one, is how long its answer may take (a
                # caller's 60 s was cut at the request timeout's 15: a stranger's finding);
                # the request timeout bounds the wait of a call without one
                limit = loop.time() + proxy.request_timeout if deadline is None else deadline
                async with asyncio.timeout_at(limit):
                    head = await upstream.head
            except TimeoutError:
                recorded = True
                if _deadline_passed(deadline, limit, loop.time()):
                    self.outcome(sent, None, False, ErrorReason.DEADLINE_EXCEEDED,
                                 grpc.DEADLINE_EXCEEDED)
                    await self.deadline_exceeded()
                    return None
                # the endpoint has the call: DEADLINE_EXCEEDED, which gRPC allows for an
                # operation that may have completed, not UNAVAILABLE, which clients (and
                # their retry policies) take for "not processed, try again"
                self.outcome(sent, None, False, ErrorReason.UPSTREAM_TIMEOUT,
                             grpc.DEADLINE_EXCEEDED if self.is_grpc else None)
                await self.error(504, ErrorReason.UPSTREAM_TIMEOUT,
                                 "upstream sent no answer in time",
                                 grpc.DEADLINE_EXCEEDED, counted=True)
                return None
            except StreamGone as exc:
                recorded = True
                if exc.code == ErrorCodes.REFUSED_STREAM and stream.closed is None:
                    # Not processed (RFC 9113 §8.7; or above the last stream of a GOAWAY):
                    # sent again if what went up is still at hand, else the app is told so.
                    self.outcome(sent, None, False, ErrorReason.REFUSED_STREAM)
                    await _stopped(pump)
                    if self.replay.complete:
                        return ErrorReason.REFUSED_STREAM
                    ctx.error_reason = ErrorReason.REFUSED_STREAM
                    stream.reset(ErrorCodes.REFUSED_STREAM)
                    return None
                if _deadline_due(deadline, loop.time()):
                    # the endpoint, told what was left of the deadline, gave up a moment
                    # before this sidecar's own timer: the call's deadline passed all the same
                    self.outcome(sent, None, False, ErrorReason.DEADLINE_EXCEEDED,
                                 grpc.DEADLINE_EXCEEDED)
                    await self.deadline_exceeded()
                    return None
                broke = grpc.status_of_reset(upstream.reset_code)  # None: the sidecar's
                # own reset (an oversized head) or a lost connection: UNAVAILABLE
                self.outcome(sent, None, False, "upstream-reset",
                             broke if self.is_grpc else None)
                await self.error(502, "upstream-reset", f"before the answer: {exc}", broke,
                                 counted=True)
                return None
            ctx.extra["peer"] = upstream.peer_ip()  # what signed signals must say (wire.signals)
            head, congestion = self.response_headers(head, ctx.game_response_headers)
            refusal = ctx.game_response_headers.get(REFUSED_KEY) if resend_refused else None
            if refusal is not None and refusal in REFUSALS:
                await _stopped(pump)
                if self.replay.complete:  # dropped here (the stream is cancelled below)
                    recorded = True
                    self.outcome(sent, None, False, UPSTREAM_REFUSED, congestion=congestion,
                                 shed=refusal in SHED)
                    proxy.metrics.refused.labels(ctx.upstream_label, refusal).inc()
                    log.debug("%s %s: refused unprocessed (%s)", ctx.upstream, ctx.endpoint,
                              refusal)
                    return UPSTREAM_REFUSED
                # too much of the request went up to send it again: relayed as it came
            # it answers (a stream's outcome comes at its end): what is sent there from now
            # on may stall, not what it already answered
            assert ctx.group is not None and ctx.endpoint is not None
            if not ctx.long:  # (a declared long call's answer is no stall's end, as on 1.1)
                ctx.group.policy.on_answer(ctx.endpoint, proxy.clock())
            head = self.response_filter(head)
            ctx.status = http_status = _http_status(head)
            trailers_only = upstream.head_ended
            if not self.is_grpc or trailers_only:
                first = proxy.clock()
            if trailers_only:
                status = grpc.status_of(head)
            stream.send_headers(head, end_stream=trailers_only)
            self.answered = True
            if trailers_only:
                recorded = True
                self.finish(sent, first, http_status, status, congestion)
                return None
            async with (asyncio.timeout_at(deadline) if deadline is not None
                        else _NO_DEADLINE):
                while True:
                    kind, payload, size = await upstream.read()
                    if kind == "data":
                        if first is None:
                            first = proxy.clock()
                        try:
                            await stream.send_data(payload)
                        finally:  # passed on or dropped: either way the upstream gets credit
                            upstream.ack(size)
                    elif kind == "trailers":
                        if first is None:
                            first = proxy.clock()
                        trailers, _ = self.response_headers(payload, None)
                        status = grpc.status_of(trailers)
                        stream.send_headers(trailers, end_stream=True)
                        break
                    else:
                        stream.end()
                        break
            recorded = True
            self.finish(sent, first, http_status, status, congestion)
            return None
        except StreamGone as exc:
            if stream.closed is not None:  # the app's side went away: its doing
                recorded = True
                self.cancelled(sent, first, deadline)
                return None
            recorded = True
            if _deadline_due(deadline, loop.time()) and self.is_grpc and not stream.local_ended:
                self.outcome(sent, first, False, ErrorReason.DEADLINE_EXCEEDED,
                             grpc.DEADLINE_EXCEEDED,
                             answered=True)
                stream.send_headers(_status_trailers(grpc.DEADLINE_EXCEEDED,
                                                     "deadline exceeded in the sidecar"), True)
                return None
            broke = grpc.status_of_reset(upstream.reset_code)  # the endpoint's reset as
            # gRPC reads it (None: the sidecar's own reset or a lost connection)
            self.outcome(sent, first, False, "upstream-reset", broke if self.is_grpc else None,
                         answered=self.answered)
            self.proxy.notices.notice((ctx.upstream, ctx.endpoint, "upstream-reset"),
                                      f"{ctx.upstream} {ctx.endpoint}: upstream stream broke: "
                                      f"{exc}")
            if self.is_grpc and not stream.local_ended:
                stream.send_headers(_status_trailers(broke, f"upstream stream reset: {exc}"),
                                    True)
            else:
                stream.reset(ErrorCodes.INTERNAL_ERROR)
            return None
        except TimeoutError:  # the gRPC deadline passed while relaying
            recorded = True
            self.outcome(sent, first, False, ErrorReason.DEADLINE_EXCEEDED, grpc.DEADLINE_EXCEEDED,
                         answered=True)
            if stream.closed is None and not stream.local_ended:
                stream.send_headers(_status_trailers(grpc.DEADLINE_EXCEEDED,
                                                     "deadline exceeded in the sidecar"), True)
            return None
        except asyncio.CancelledError:
            if not recorded:
                recorded = True
                self.cancelled(sent, first, deadline)
            raise
        finally:
            if pump is not None and not pump.done():
                pump.cancel()
            if upstream.closed is None:
                upstream.reset(ErrorCodes.CANCEL)
            upstream.discard()
            if not recorded:  # an unexpected error: release the in-flight count
                self.outcome(sent, first, False, "proxy-error")

    def without_game_headers(self, headers: Headers) -> Headers:
        """The app's header block (its head or its trailers) without X-GT-*, each counted
        under a label of a bounded set (:func:`~wire.headers.header_label`)."""
        out: Headers = []
        for name, value in headers:
            if is_gt_field(name):
                self.proxy.metrics.rejected_headers.labels(header_label(name.decode("latin-1")),
                                                           HeaderDrop.FROM_APP).inc()
            else:
                out.append((name, value))
        return out

    def response_headers(self, headers: Headers,
                         game: dict[str, str] | None) -> tuple[Headers, float | None]:
        """The upstream's headers without X-GT-*; those the ``response_signals`` phase
        believes (signed over this attempt's challenge: :mod:`sidecar.identity_phase`) go
        into ``game`` (lower-case name -> value), and the congestion among them, if valid.
        ``game`` None (trailers): the X-GT-* are only stripped."""
        out: Headers = []
        congestion: float | None = None
        received: dict[str, str] = {}
        for name, value in headers:
            if not is_gt_field(name):
                out.append((name, value))
            else:
                received[name.decode("latin-1").lower()] = value.decode("latin-1")
        if game is None:  # trailers: no game signal rides there (counted, as on HTTP/1.1)
            for text in received:
                self.proxy.metrics.rejected_headers.labels(header_label(text),
                                                           HeaderDrop.IN_TRAILERS).inc()
            return out, congestion
        if not received:
            return out, congestion
        game.update(self.proxy.phases.response_signals(self.ctx, received))
        raw = game.get(CONGESTION.lower())
        if raw is not None:
            try:
                congestion = parse_congestion(raw)
            except WireError:
                self.proxy.metrics.rejected_headers.labels(CONGESTION,
                                                           HeaderDrop.MALFORMED).inc()
        return out, congestion

    def response_filter(self, head: Headers) -> Headers:
        """The ``response_filter`` phase on the answer's head (the price the app paid, the
        back-off a punishing upstream asks for)."""
        pseudo = [(name, value) for name, value in head if name.startswith(b":")]
        rest: CIMultiDict[str] = CIMultiDict(
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in head if not name.startswith(b":"))
        self.proxy.phases.response_filter(self.ctx, rest)
        return pseudo + [(name.lower().encode("latin-1"), value.encode("latin-1"))
                         for name, value in rest.items()]

    # ------------------------------------------------------------ outcomes

    def finish(self, sent: float, first: float | None, http_status: int,
               status: int | None, congestion: float | None) -> None:
        if self.is_grpc:
            ok = status is not None and (not grpc.counts_against_endpoint(status)
                                         or self.caller_punished(status))
            if status is None:  # ended without a grpc-status: the call failed, with what
                status = grpc.status_of_http(http_status)  # its gRPC client will report
        else:
            ok = http_status < 500
        # a refusal for load relayed as it came (the last attempt, or a request not kept
        # whole) is shed all the same (the signals here are the ones that verified)
        shed = not ok and self.ctx.game_response_headers.get(REFUSED_KEY) in SHED
        self.outcome(sent, first, ok, str(http_status), status, congestion, answered=True,
                     shed=shed)

    def caller_punished(self, status: int) -> bool:
        """RESOURCE_EXHAUSTED because the upstream's inbound side punishes this caller (its
        X-GT-Reputation says so): the caller's doing, as a 429 is for HTTP/1.1."""
        raw = self.ctx.game_response_headers.get(REPUTATION.lower())
        if status != grpc.RESOURCE_EXHAUSTED or raw is None:
            return False
        try:
            return parse_standing(raw).punished
        except WireError:
            return False

    def outcome(self, sent: float, first: float | None, ok: bool, code: str,
                status: int | None = None, congestion: float | None = None,
                answered: bool = False, shed: bool = False) -> None:
        """Tell the policy and the metrics how the attempt ended (once per attempt)."""
        proxy, group, endpoint = self.proxy, self.ctx.group, self.ctx.endpoint
        assert group is not None and endpoint is not None
        now = proxy.clock()
        latency = (first if first is not None else now) - sent
        # a declared long call (a watch) that ran to its deadline ended as such calls do:
        # nothing learned, no failure (a review's finding: five ejected a healthy pod)
        void = self.ctx.long and status == grpc.DEADLINE_EXCEEDED
        if not void and status == grpc.DEADLINE_EXCEEDED and _deadline_due(
                self.deadline, asyncio.get_running_loop().time()):
            # the caller's deadline ran out (whoever's timer fired): shed, when other pods
            # miss it too (a deadline too short for every pod ejected them all)
            shed = group.policy.missed_deadline(endpoint, now) or shed
        group.policy.on_outcome(Outcome(endpoint, latency, ok or void, now, congestion,
                                        answered=answered, sent_at=sent, shed=shed,
                                        void=void, long=self.ctx.long))
        proxy.metrics.forwarded(group.name, endpoint, code, latency if answered else None)
        if status is not None:
            proxy.h2_metrics.grpc_calls.labels(group.name, endpoint, str(status)).inc()
        if not ok:
            self.ctx.error_reason = self.ctx.error_reason or code

    def void(self, sent: float) -> None:
        """The attempt says nothing about the endpoint: only its in-flight count goes back."""
        proxy, group, endpoint = self.proxy, self.ctx.group, self.ctx.endpoint
        assert group is not None and endpoint is not None
        now = proxy.clock()
        group.policy.on_outcome(Outcome(endpoint, now - sent, True, now, answered=False,
                                        void=True, long=self.ctx.long))

    def cancelled(self, sent: float, first: float | None,
                  deadline: float | None = None) -> None:
        """The app reset the stream: not the endpoint's failure, unless the call's
        ``deadline`` was due: that reset is the app's gRPC client giving up at its deadline,
        a moment before this sidecar's own timer, and the call is the endpoint's
        DEADLINE_EXCEEDED whichever timer fired first (it was charged only when the
        sidecar's did)."""
        if _deadline_due(deadline, asyncio.get_running_loop().time()):
            self.outcome(sent, first, False, ErrorReason.DEADLINE_EXCEEDED, grpc.DEADLINE_EXCEEDED,
                         answered=self.answered)
            self.proxy.metrics.errors.labels(self.ctx.upstream_label,
                                             ErrorReason.DEADLINE_EXCEEDED).inc()
            return
        proxy, group, endpoint = self.proxy, self.ctx.group, self.ctx.endpoint
        assert group is not None and endpoint is not None
        now = proxy.clock()
        latency = (first if first is not None else now) - sent
        group.policy.on_outcome(Outcome(endpoint, latency, True, now, answered=False,
                                        void=True, long=self.ctx.long))
        proxy.h2_metrics.streams_cancelled.labels(group.name).inc()
        self.ctx.error_reason = "cancelled-by-app"

    # ------------------------------------------------------------ the sidecar's own answers

    async def deadline_exceeded(self) -> None:
        self.ctx.error_reason = ErrorReason.DEADLINE_EXCEEDED
        self.proxy.metrics.errors.labels(self.ctx.upstream_label,
                                         ErrorReason.DEADLINE_EXCEEDED).inc()
        if self.is_grpc:
            self.stream.send_headers(grpc.trailers_only(
                grpc.DEADLINE_EXCEEDED, "deadline exceeded in the sidecar"), end_stream=True)
        else:
            await self._json(504, ErrorReason.DEADLINE_EXCEEDED, "deadline exceeded")

    async def early(self, answer: EarlyAnswer) -> None:
        """A ``request_check`` answer (back-off, bad bid): gRPC status or JSON."""
        ctx, stream = self.ctx, self.stream
        ctx.status, ctx.error_reason = answer.status, str(answer.body.get("reason", ""))
        extra = [(b"via", self.proxy.via), *((name.lower().encode("latin-1"),
                                               value.encode("latin-1"))
                                              for name, value in answer.headers.items())]
        if self.is_grpc:
            status = (grpc.RESOURCE_EXHAUSTED if answer.status == 429
                      else grpc.INVALID_ARGUMENT if answer.status == 400 else grpc.UNAVAILABLE)
            self.proxy.h2_metrics.grpc_calls.labels(ctx.upstream_label, "", str(status)).inc()
            stream.send_headers(grpc.trailers_only(
                status, f"{ctx.error_reason}: {answer.body.get('error', '')}", extra),
                end_stream=True)
            return
        body = json.dumps(answer.body).encode()
        stream.send_headers([(b":status", b"%d" % answer.status),
                             (b"content-type", b"application/json"),
                             (b"content-length", b"%d" % len(body)), *extra])
        await stream.send_data(body, end_stream=True)

    async def error(self, status: int, reason: str, message: str,
                    grpc_status: int = grpc.UNAVAILABLE, *, counted: bool = False) -> None:
        """The sidecar's own answer: ``grpc_status`` (trailers-only) to a gRPC caller, else
        JSON with ``status``; ``counted``: the call's gRPC status is in the metrics already
        (an endpoint's, through :meth:`outcome`)."""
        ctx = self.ctx
        ctx.status, ctx.error_reason = status, reason
        self.proxy.metrics.errors.labels(ctx.upstream_label, reason).inc()
        if self.is_grpc:
            if not counted:
                self.proxy.h2_metrics.grpc_calls.labels(ctx.upstream_label, "",
                                                       str(grpc_status)).inc()
            self.stream.send_headers(grpc.trailers_only(
                grpc_status, f"{reason}: {message}",
                [(b"via", self.proxy.via)]), end_stream=True)
        else:
            await self._json(status, reason, message)

    async def _json(self, status: int, reason: str, message: str) -> None:
        body = json.dumps({"error": message, "reason": reason, "upstream": self.ctx.upstream,
                           "sidecar": self.proxy.sidecar_id}).encode()
        self.stream.send_headers([
            (b":status", b"%d" % status), (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)), (b"via", self.proxy.via)])
        await self.stream.send_data(body, end_stream=True)


class _Replay:
    """What of the app's request went upstream so far, kept while it is small enough to be
    sent again if the endpoint refuses the stream unprocessed."""

    __slots__ = ("complete", "items", "size")

    def __init__(self) -> None:
        self.items: list[tuple[str, Any]] = []
        self.size = 0
        self.complete = True  # False once the body outgrew REPLAY_LIMIT: no second attempt

    def add(self, kind: str, payload: Any) -> None:
        if not self.complete:
            return
        if kind == "data":
            self.size += len(payload)
            if self.size > REPLAY_LIMIT:
                self.complete = False
                self.items.clear()
                return
        self.items.append((kind, payload))


async def _stopped(pump: asyncio.Task[None] | None) -> None:
    """The request's pump stopped (None: it finished at once, :func:`pump_at_once`)."""
    if pump is not None:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump


def _taken(kind: str, payload: Any, replay: _Replay | None,
           trailers: Callable[[Headers], Headers] | None) -> Any:
    """An item of the app's request as it goes up (its trailers filtered), kept for a
    second attempt."""
    if kind == "trailers" and trailers is not None:
        payload = trailers(payload)
    if replay is not None:
        replay.add(kind, payload)
    return payload


def pump_at_once(stream: ServerStream, upstream: ClientStream, replay: _Replay | None,
                 trailers: Callable[[Headers], Headers] | None = None) -> bool:
    """:func:`pump_request`'s work done now, without a task, when none of it would wait (a
    unary call's message and end came with its head): nothing to send again from an earlier
    attempt, the app's whole request already read, and the upstream's socket and window
    taking all of its body. True once done; False, nothing taken, for the task to do it."""
    if replay is not None and replay.items:
        return False
    try:
        window = upstream.window_now()
    except StreamGone:
        return False  # the task meets it, as before
    items = None if window is None else stream.take_whole(window)
    if items is None:
        return False
    for i, (kind, payload, size) in enumerate(items):
        try:
            payload = _taken(kind, payload, replay, trailers)
            if kind == "data":
                try:
                    upstream.send_framed(payload)
                finally:  # passed on or dropped: either way the app gets its credit back
                    stream.ack(size)
                continue
            # the trailers or the end: the request ends here (the end item that follows the
            # trailers, which carried END_STREAM, stays unread, as the task leaves it)
            if kind == "trailers":
                upstream.send_headers(payload, end_stream=True)
            else:
                upstream.end()
        except StreamGone:  # either side went away: the exchange sees it and answers
            pass
        stream.put_back(items[i + 1:])  # what was not read stays, as the task leaves it
        return True
    return True


async def pump_request(stream: ServerStream, upstream: ClientStream,
                       replay: _Replay | None = None,
                       trailers: Callable[[Headers], Headers] | None = None) -> None:
    """Relay the app's request body and trailers upstream (first what an earlier, refused
    attempt sent), acknowledging each DATA frame to the app only once the upstream connection
    took it. ``trailers`` filters the trailer section as it is read (the game headers out)."""
    try:
        for kind, payload in list(replay.items if replay is not None else ()):
            if kind == "data":
                await upstream.send_data(payload)
            elif kind == "trailers":
                upstream.send_headers(payload, end_stream=True)
                return
            else:
                upstream.end()
                return
        while True:
            kind, payload, size = await stream.read()
            payload = _taken(kind, payload, replay, trailers)
            if kind == "data":
                try:
                    await upstream.send_data(payload)
                finally:  # passed on or dropped: either way the app gets its credit back
                    stream.ack(size)
            elif kind == "trailers":
                upstream.send_headers(payload, end_stream=True)
                return
            else:
                upstream.end()
                return
    except StreamGone:
        return  # either side went away: the exchange sees it and answers


class _RequestHeaders:
    """An HTTP/2 request's header block as the phases read it (``get``, any case)."""

    __slots__ = ("block",)

    def __init__(self, block: Headers) -> None:
        self.block = block

    def get(self, key: str, /) -> str | None:
        name = key.lower().encode("latin-1")
        for field_name, value in self.block:
            if field_name == name:
                return value.decode("latin-1")
        return None


def _http_status(headers: Headers) -> int:
    for name, value in headers:
        if name == b":status":
            return int(value) if value.isdigit() else 502
    return 502


_NO_DEADLINE = contextlib.nullcontext()
"""The relay of an answer without a gRPC deadline: no timer to arm (the stall's is the
request timeout, until the answer's head)."""
UPSTREAM_REFUSED: str = ErrorReason.UPSTREAM_REFUSED
"""An endpoint's sidecar refused the call before its app saw it (and, as the error, every
endpoint tried did)."""
MAX_REFUSALS = 8
"""How many times one call is sent again after REFUSED_STREAM (on top of its attempts)."""
REFUSAL_PAUSE = 0.005
"""Seconds of pause before re-sending a refused call, times the refusals so far."""

DEADLINE_SLACK = 0.05
"""Seconds before the call's deadline within which an endpoint's reset is taken for the
deadline passing: the endpoint got ``grpc-timeout`` with what was left, so its own timer fires
a little before this sidecar's."""


def _deadline_due(deadline: float | None, now: float) -> bool:
    return deadline is not None and now >= deadline - DEADLINE_SLACK


def _deadline_passed(deadline: float | None, limit: float | None, now: float) -> bool:
    """Whether a wait bounded by ``min(limit, deadline)`` ended because of the call's deadline:
    the deadline was the nearer bound (``limit`` None: the wait did not time out), or it has
    passed. Not ``now >= deadline`` alone: an event loop may run a timer up to its clock's
    granularity early (uvloop: 1 ms), and such a timeout is the deadline all the same."""
    if deadline is None:
        return False
    return now >= deadline or (limit is not None and deadline <= limit)


def _status_trailers(status: int, message: str) -> Headers:
    return [(b"grpc-status", b"%d" % status), (b"grpc-message", grpc.encode_message(message))]
