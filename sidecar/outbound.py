"""The outbound listener: the app's requests to other services, routed by each upstream's policy.

Owns the request path from the app to an upstream endpoint: finding the upstream (``Host``
or absolute-form target, so ``HTTP_PROXY=http://127.0.0.1:PORT`` works), running the phases
of :mod:`sidecar.phases`, sending through the upstream transport (:mod:`sidecar.transport`:
a keep-alive pool in production, an in-memory handler in tests) with a request timeout,
retrying safely, relaying streamed bodies and WebSockets, and answering with a JSON error
(never a hang) when it cannot forward. The routing decision itself is the policy's
(:mod:`mesh`); this module measures and carries it out. It opens no connection itself.

Retry rule (RFC 9110 §9.2.2 idempotent methods, narrowed so nothing is ever replayed that
may have been processed or cannot be re-sent): only GET, HEAD, OPTIONS, TRACE, and PUT or
DELETE without a body; only when nothing was received from the upstream (connect error,
connect timeout, connection reset before the response head); always to an endpoint not tried
yet; at most ``max_attempts`` in all; only while the upstream's retry budget allows.
A POST is never retried.

An app that hangs up while its answer's body is being relayed is the app's doing: it is
counted as ``app-hung-up`` (not ``body-relay-failed``), the endpoint is not charged, and the
rest of the body is drained (bounded) so that the upstream connection stays in the pool.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from mesh.policy import Outcome
from mesh.profiles import StrategyProfile
from sidecar.errors import ErrorReason, HeaderDrop
from sidecar.forward import (
    BodyReader,
    has_passed,
    must_be_empty,
    relay_body,
    relay_chunks,
    request_headers_to_upstream,
    response_headers_to_app,
)
from sidecar.metrics import OutboundMetrics
from sidecar.phases import ProxyPhases, RequestContext
from sidecar.transport import (
    BODY_READ_ERRORS,
    AiohttpTransport,
    AttemptFailure,
    HandshakeRefused,
    Transport,
    TransportError,
    UpstreamRequest,
    UpstreamResponse,
    WebSocketDialer,
    classify,
)
from sidecar.upstreams import UpstreamTable
from sidecar.websocket import accept_like, is_websocket, oversized_counter, relay_websocket
from wire.errors import WireError
from wire.headers import CONGESTION, parse_congestion

log = logging.getLogger(__name__)

RETRYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# a failed body relay: the upstream's stream broke or stalled, or the app went away
RELAY_ERRORS: tuple[type[BaseException], ...] = (*BODY_READ_ERRORS, ConnectionError)


# what is left of an answer the app no longer wants is read and dropped, up to this much, so
# that the upstream connection can serve the next request; past it the connection is closed
DRAIN_LIMIT = 256 * 1024
DRAIN_TIMEOUT = 1.0


def app_hung_up(request: web.Request) -> bool:
    """Whether the app's own connection is gone (closed, or closing after a failed write)."""
    transport = request.transport
    return transport is None or transport.is_closing()


async def drain(content: BodyReader, limit: int = DRAIN_LIMIT,
                timeout: float = DRAIN_TIMEOUT) -> bool:
    """Read and drop the rest of a body; True if it ended within ``limit`` bytes and
    ``timeout`` seconds (the connection may be reused), False otherwise."""
    left = limit
    try:
        async with asyncio.timeout(timeout):
            while left >= 0:
                chunk = await content.readany()
                if not chunk:
                    return True
                left -= len(chunk)
    except RELAY_ERRORS:
        return False
    return False


def may_retry(method: str, has_body: bool) -> bool:
    """Whether a failed attempt of this request may be sent again (see the module docstring)."""
    return method in RETRYABLE_METHODS and not has_body


def split_target(request: web.BaseRequest) -> tuple[str | None, str]:
    """(authority, origin-form target) of a request in origin- or absolute-form."""
    raw = request.raw_path
    if not raw.startswith("/") and "://" in raw:
        url = URL(raw, encoded=True)
        authority = url.raw_host or ""
        if url.explicit_port:
            authority = f"{authority}:{url.port}"
        return authority or None, url.raw_path_qs or "/"
    return request.headers.get("Host"), raw


def upstream_name(authority: str) -> str:
    """The upstream NAME an authority refers to: its host, lower-cased, port ignored."""
    host = authority.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    else:
        host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return host.rstrip(".")


class OutboundProxy:
    """The aiohttp handler of the outbound listener; one instance per sidecar process.

    ``transport``: how requests reach the endpoints (default: an :class:`AiohttpTransport`
    that :meth:`start` opens and :meth:`close` closes; a transport passed in is the caller's
    to open and close). WebSocket upgrades need a transport that is a ``WebSocketDialer``.
    """

    def __init__(
        self,
        *,
        sidecar_id: str,
        table: UpstreamTable,
        profile: StrategyProfile,
        metrics: OutboundMetrics,
        phases: ProxyPhases | None = None,
        pinned_upstream: Callable[[web.BaseRequest], str | None] | None = None,
        max_attempts: int = 3,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        transport: Transport | None = None,
    ) -> None:
        self.sidecar_id = sidecar_id
        self.table = table
        self.profile = profile
        self.metrics = metrics
        self.phases = phases or ProxyPhases()
        self.max_attempts = max_attempts
        self.rng = rng or random.Random()
        self.clock = clock
        self.via = f"1.1 {sidecar_id}"
        # The upstream a request's connection is bound to regardless of Host, or None (Host
        # routing): the original destination (sidecar.transparent) or a discovered authority.
        self.pinned_upstream: Callable[[web.BaseRequest], str | None] = (
            pinned_upstream or (lambda request: None))
        self._own_transport: AiohttpTransport | None = None
        if transport is None:
            transport = self._own_transport = AiohttpTransport(
                connect_timeout=profile.connect_timeout
            )
        self.transport = transport
        self._dialer = transport if isinstance(transport, WebSocketDialer) else None
        self._oversized = oversized_counter(metrics.registry, "outbound")  # 1009 closes

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._own_transport is not None:
            await self._own_transport.start()

    async def close(self) -> None:
        if self._own_transport is not None:
            await self._own_transport.close()

    def make_app(self) -> web.Application:
        app = web.Application(handler_args={"max_field_size": 16384})
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    # ------------------------------------------------------------ request path

    async def handle(self, request: web.Request) -> web.StreamResponse:
        authority, target = split_target(request)
        ctx = RequestContext(
            started=self.clock(), method=request.method, target=target, authority=authority or ""
        )
        try:
            return await self._handle(request, ctx)
        finally:
            if ctx.group is not None:
                self.metrics.request_in_flight(ctx.group.name, -1)
            self.phases.logging(ctx, self.clock())

    async def _handle(self, request: web.Request, ctx: RequestContext) -> web.StreamResponse:
        if request.method == "CONNECT":
            return self._error(ctx, 501, ErrorReason.CONNECT_NOT_SUPPORTED,
                               "CONNECT tunnels are not proxied")
        if not ctx.authority:
            return self._error(ctx, 400, ErrorReason.NO_HOST,
                               "request has neither Host nor absolute URL")
        ctx.upstream = self.pinned_upstream(request) or upstream_name(ctx.authority)
        if has_passed(request.headers, self.via):
            return self._error(ctx, 508, ErrorReason.LOOP_DETECTED,
                               "request already passed this sidecar")
        group = self.table.get(ctx.upstream)
        if group is None:
            return self._error(
                ctx, 404, ErrorReason.UNKNOWN_UPSTREAM,
                f"no upstream named {ctx.upstream!r} is configured",
            )
        ctx.group = group
        self.metrics.request_in_flight(group.name, 1)
        early = await self.phases.request_filter(request, ctx)
        if early is not None:
            ctx.status = early.status
            return early
        headers, stripped = request_headers_to_upstream(
            request.headers, client_ip=request.remote, proto=request.scheme, via=self.via
        )
        headers.popall("Expect", None)  # aiohttp already answered 100-continue to the app
        if authority_header := ctx.authority:
            headers["Host"] = authority_header
        if stripped:
            for name in stripped:
                self.metrics.rejected_headers.labels(name, HeaderDrop.FROM_APP).inc()
        if is_websocket(request):
            return await self._websocket(request, ctx, headers)
        return await self._forward(request, ctx, headers)

    async def _forward(
        self, request: web.Request, ctx: RequestContext, base_headers: CIMultiDict[str]
    ) -> web.StreamResponse:
        group = ctx.group
        assert group is not None
        has_body = request.body_exists
        retryable = may_retry(ctx.method, has_body)
        group.budget.deposit(self.clock())
        failure: AttemptFailure | None = None
        for attempt in range(self.max_attempts):
            now = self.clock()
            ctx.attempt = attempt
            endpoint = self.phases.upstream_pick(ctx, self.rng, now)
            if endpoint is None:
                if failure is None:
                    return self._error(
                        ctx, 503, ErrorReason.NO_ENDPOINT,
                        f"upstream {group.name!r} has no endpoint to use",
                    )
                break  # every endpoint was tried
            if attempt > 0:
                if not group.budget.try_withdraw(now):
                    self.metrics.retry_budget_exhausted.labels(group.name).inc()
                    break
                self.metrics.retries.labels(group.name).inc()
            ctx.endpoint = endpoint
            ctx.tried.append(endpoint)
            headers = CIMultiDict(base_headers)
            self.phases.upstream_request_filter(ctx, headers)
            sent = self.clock()
            group.policy.on_start(endpoint, sent)
            try:
                # request_timeout bounds the wait for the answer after the last byte sent:
                # each uploaded chunk pushes the deadline forward
                async with asyncio.timeout(self.profile.request_timeout) as deadline:
                    body = (
                        relay_chunks(request.content, self.profile.request_timeout, deadline)
                        if has_body else None
                    )
                    upstream = await self.transport.handle_request(UpstreamRequest(
                        ctx.method, URL(endpoint + ctx.target, encoded=True), headers, body
                    ))
            except (TransportError, TimeoutError) as exc:
                failure = classify(exc)
                done = self.clock()
                group.policy.on_outcome(Outcome(endpoint, done - sent, False, done))
                self.metrics.forwarded(group.name, endpoint, failure.reason, None)
                log.debug(
                    "%s %s: attempt %d: %s", group.name, endpoint, attempt + 1, failure.detail
                )
                if not (failure.nothing_received and retryable):
                    break
                continue
            except BaseException:
                done = self.clock()
                group.policy.on_outcome(Outcome(endpoint, done - sent, False, done))
                raise
            return await self._relay_response(request, ctx, upstream, sent)
        # the first attempt either returned or recorded why it failed
        assert failure is not None
        return self._error(
            ctx, failure.status, failure.reason,
            f"upstream {group.name!r} failed after {len(ctx.tried)} attempt(s): {failure.detail}",
        )

    def _observe_head(
        self, ctx: RequestContext, status: int, game: dict[str, str], sent: float
    ) -> None:
        group, endpoint = ctx.group, ctx.endpoint
        assert group is not None and endpoint is not None
        now = self.clock()
        ctx.status = status
        ctx.game_response_headers = game
        congestion: float | None = None
        raw = game.get(CONGESTION.lower())
        if raw is not None:
            try:
                congestion = parse_congestion(raw)
            except WireError as exc:
                self.metrics.rejected_headers.labels(CONGESTION.lower(), HeaderDrop.MALFORMED).inc()
                log.info("%s %s: ignored %s: %s", group.name, endpoint, CONGESTION, exc)
        group.policy.on_outcome(
            Outcome(endpoint, now - sent, status < 500, now, congestion, answered=True))
        self.metrics.forwarded(group.name, endpoint, str(status), now - sent)

    async def _relay_response(
        self,
        request: web.Request,
        ctx: RequestContext,
        upstream: UpstreamResponse,
        sent: float,
    ) -> web.StreamResponse:
        try:
            headers, game = response_headers_to_app(upstream.headers, self.via)
            game = self.phases.response_signals(ctx, game)  # only signed signals are believed
            self._observe_head(ctx, upstream.status, game, sent)
            self.phases.response_filter(ctx, headers)
            response = web.StreamResponse(
                status=upstream.status, reason=upstream.reason, headers=headers
            )
            idle = self.profile.request_timeout
            loop = asyncio.get_running_loop()
            try:
                # one timer for the whole relay, pushed forward at each step
                async with asyncio.timeout(idle) as deadline:
                    await response.prepare(request)
                    if not must_be_empty(ctx.method, upstream.status):
                        await relay_body(upstream.content, response, idle, deadline)
                    deadline.reschedule(loop.time() + idle)
                    await response.write_eof()
            except RELAY_ERRORS as exc:
                if app_hung_up(request):
                    # the app's doing: the endpoint answered, nothing to charge it with
                    reason = ErrorReason.APP_HUNG_UP
                    ctx.error_reason = reason
                    self.metrics.errors.labels(ctx.upstream or "", reason).inc()
                    log.debug("%s %s: the app hung up mid-body: %r", ctx.upstream,
                              ctx.endpoint, exc)
                    if not await drain(upstream.content):
                        upstream.close()
                    return response
                # The head may be out already: the only honest signal left is to cut the
                # connection (the app sees a truncated body, never a silently short one).
                reason = ErrorReason.BODY_RELAY_FAILED
                ctx.error_reason = reason
                self.metrics.errors.labels(ctx.upstream or "", reason).inc()
                upstream.close()
                if request.transport is not None:
                    request.transport.abort()
                log.info("%s %s: body relay failed: %r", ctx.upstream, ctx.endpoint, exc)
            return response
        finally:
            upstream.release()

    # ------------------------------------------------------------ WebSocket

    async def _websocket(
        self, request: web.Request, ctx: RequestContext, base_headers: CIMultiDict[str]
    ) -> web.StreamResponse:
        group = ctx.group
        assert group is not None
        if self._dialer is None:
            return self._error(ctx, 501, ErrorReason.WEBSOCKET_NOT_SUPPORTED,
                               "this sidecar's transport cannot carry WebSockets")
        now = self.clock()
        endpoint = self.phases.upstream_pick(ctx, self.rng, now)
        if endpoint is None:
            return self._error(ctx, 503, ErrorReason.NO_ENDPOINT,
                               f"upstream {group.name!r} has no endpoint")
        ctx.endpoint = endpoint
        ctx.tried.append(endpoint)
        headers = base_headers  # the caller's handshake headers: the dialer drops them
        self.phases.upstream_request_filter(ctx, headers)
        sent = self.clock()
        group.policy.on_start(endpoint, sent)
        try:
            async with asyncio.timeout(self.profile.request_timeout):
                upstream_ws = await self._dialer.open_websocket(UpstreamRequest(
                    ctx.method, URL(endpoint + ctx.target, encoded=True), headers
                ))
        except HandshakeRefused as exc:
            done = self.clock()
            group.policy.on_outcome(
                Outcome(endpoint, done - sent, exc.status < 500, done, answered=False))
            return self._error(
                ctx, 502, ErrorReason.WEBSOCKET_HANDSHAKE_FAILED,
                f"upstream refused the upgrade with {exc.status}",
            )
        except (TransportError, TimeoutError) as exc:
            failure = classify(exc)
            done = self.clock()
            group.policy.on_outcome(Outcome(endpoint, done - sent, False, done))
            return self._error(ctx, failure.status, failure.reason, failure.detail)
        self._observe_head(ctx, 101, {}, sent)
        return await relay_websocket(request, accept_like(upstream_ws), upstream_ws,
                                     self._oversized)

    # ------------------------------------------------------------ errors

    def _error(
        self, ctx: RequestContext, status: int, reason: ErrorReason, message: str
    ) -> web.Response:
        ctx.status, ctx.error_reason = status, reason
        self.metrics.errors.labels(ctx.upstream or "", reason).inc()
        return web.json_response(
            {
                "error": message,
                "reason": reason,
                "upstream": ctx.upstream,
                "sidecar": self.sidecar_id,
            },
            status=status,
            headers={"Via": self.via},
        )

