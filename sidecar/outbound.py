"""The outbound listener: the app's requests to other services, routed by each upstream's policy.

Owns the request path from the app to an upstream endpoint: finding the upstream (``Host``
or absolute-form target, so ``HTTP_PROXY=http://127.0.0.1:PORT`` works), running the phases
of :mod:`sidecar.phases`, sending over a keep-alive pool with connect and request timeouts,
retrying safely, relaying streamed bodies and WebSockets, and answering with a JSON error
(never a hang) when it cannot forward. The routing decision itself is the policy's
(:mod:`mesh`); this module measures and carries it out.

Retry rule (RFC 9110 §9.2.2 idempotent methods, narrowed so nothing is ever replayed that
may have been processed or cannot be re-sent): only GET, HEAD, OPTIONS, TRACE, and PUT or
DELETE without a body; only when nothing was received from the upstream (connect error,
connect timeout, connection reset before the response head); always to an endpoint not tried
yet; at most ``max_attempts`` in all; only while the upstream's retry budget allows.
A POST is never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from mesh.headers import CONGESTION, HeaderError, parse_congestion
from mesh.policy import Outcome
from mesh.profiles import StrategyProfile
from sidecar.forward import (
    CHUNK_SIZE,
    connection_tokens,
    has_passed,
    relay_body,
    relay_chunks,
    request_headers_to_upstream,
    response_headers_to_app,
    without,
)
from sidecar.metrics import SidecarMetrics
from sidecar.phases import ProxyPhases, RequestContext
from sidecar.upstreams import UpstreamTable

log = logging.getLogger(__name__)

RETRYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
WS_HANDSHAKE_HEADERS = (
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-protocol",
    "sec-websocket-accept",
)
CLIENT_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def may_retry(method: str, has_body: bool) -> bool:
    """Whether a failed attempt of this request may be sent again (see the module docstring)."""
    return method in RETRYABLE_METHODS and not has_body


def must_be_empty(method: str, status: int) -> bool:
    """HEAD answers and 1xx/204/304 never carry a body (RFC 9110 §6.4.1)."""
    return method == "HEAD" or status in (204, 304) or 100 <= status < 200


@dataclass(frozen=True, slots=True)
class AttemptFailure:
    """Why one attempt failed, and whether anything may have reached the upstream's app."""

    reason: str
    status: int
    nothing_received: bool
    detail: str


def classify(exc: BaseException) -> AttemptFailure:
    """Map a client exception to an error reason and HTTP status for the app."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return AttemptFailure("connect-timeout", 502, True, str(exc) or "connect timed out")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return AttemptFailure("connect-error", 502, True, str(exc))
    if isinstance(exc, TimeoutError):
        return AttemptFailure("upstream-timeout", 504, False, "no response head in time")
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return AttemptFailure("upstream-reset", 502, True, str(exc) or "connection reset")
    return AttemptFailure("upstream-protocol-error", 502, False, str(exc) or type(exc).__name__)


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
    """The aiohttp handler of the outbound listener; one instance per sidecar process."""

    def __init__(
        self,
        *,
        sidecar_id: str,
        table: UpstreamTable,
        profile: StrategyProfile,
        metrics: SidecarMetrics,
        phases: ProxyPhases | None = None,
        max_attempts: int = 3,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
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
        # routing); sidecar.transparent sets it from the connection's original destination.
        self.pinned_upstream: Callable[[web.BaseRequest], str | None] = lambda request: None
        self._session: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30.0, ttl_dns_cache=10)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=CLIENT_AUTO_HEADERS,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=self.profile.connect_timeout,
                sock_connect=self.profile.connect_timeout,
            ),
        )
        # aiohttp silently re-sends an idempotent request once, to the SAME endpoint, after a
        # reset; retries here are explicit, budgeted and go to another endpoint instead
        # (linkerd2#11669). aiohttp has no public switch for it.
        if hasattr(self._session, "_retry_connection"):
            self._session._retry_connection = False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("OutboundProxy.start() was not awaited")
        return self._session

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
            return self._error(ctx, 501, "connect-not-supported", "CONNECT tunnels are not proxied")
        if not ctx.authority:
            return self._error(ctx, 400, "no-host", "request has neither Host nor absolute URL")
        ctx.upstream = self.pinned_upstream(request) or upstream_name(ctx.authority)
        if has_passed(request.headers, self.via):
            return self._error(ctx, 508, "loop-detected", "request already passed this sidecar")
        group = self.table.get(ctx.upstream)
        if group is None:
            return self._error(
                ctx, 404, "unknown-upstream", f"no upstream named {ctx.upstream!r} is configured"
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
                self.metrics.rejected_headers.labels(name, "from-app").inc()
        if self._is_websocket(request):
            return await self._websocket(request, ctx, headers)
        return await self._forward(request, ctx, headers)

    @staticmethod
    def _is_websocket(request: web.Request) -> bool:
        return (
            request.method == "GET"
            and request.headers.get("Upgrade", "").lower() == "websocket"
            and "upgrade" in connection_tokens(request.headers)
        )

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
                        ctx, 503, "no-endpoint", f"upstream {group.name!r} has no endpoint to use"
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
                    upstream = await self.session.request(
                        ctx.method,
                        URL(endpoint + ctx.target, encoded=True),
                        headers=headers,
                        data=body,
                        allow_redirects=False,
                        read_bufsize=CHUNK_SIZE,
                    )
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
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
            except HeaderError as exc:
                self.metrics.rejected_headers.labels(CONGESTION.lower(), "malformed").inc()
                log.info("%s %s: ignored %s: %s", group.name, endpoint, CONGESTION, exc)
        group.policy.on_outcome(Outcome(endpoint, now - sent, status < 500, now, congestion))
        self.metrics.forwarded(group.name, endpoint, str(status), now - sent)

    async def _relay_response(
        self,
        request: web.Request,
        ctx: RequestContext,
        upstream: aiohttp.ClientResponse,
        sent: float,
    ) -> web.StreamResponse:
        try:
            headers, game = response_headers_to_app(upstream.headers, self.via)
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
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                # The head may be out already: the only honest signal left is to cut the
                # connection (the app sees a truncated body, never a silently short one).
                reason = "body-relay-failed"
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
        now = self.clock()
        endpoint = self.phases.upstream_pick(ctx, self.rng, now)
        if endpoint is None:
            return self._error(ctx, 503, "no-endpoint", f"upstream {group.name!r} has no endpoint")
        ctx.endpoint = endpoint
        ctx.tried.append(endpoint)
        headers = without(base_headers, WS_HANDSHAKE_HEADERS)
        self.phases.upstream_request_filter(ctx, headers)
        protocols = [
            p.strip()
            for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
            if p.strip()
        ]
        sent = self.clock()
        group.policy.on_start(endpoint, sent)
        try:
            async with asyncio.timeout(self.profile.request_timeout):
                upstream_ws = await self.session.ws_connect(
                    URL(endpoint + ctx.target, encoded=True),
                    headers=headers,
                    protocols=protocols,
                    max_msg_size=0,
                    autoclose=False,
                )
        except aiohttp.WSServerHandshakeError as exc:
            done = self.clock()
            group.policy.on_outcome(Outcome(endpoint, done - sent, exc.status < 500, done))
            return self._error(
                ctx, 502, "websocket-handshake-failed",
                f"upstream refused the upgrade with {exc.status}",
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            failure = classify(exc)
            done = self.clock()
            group.policy.on_outcome(Outcome(endpoint, done - sent, False, done))
            return self._error(ctx, failure.status, failure.reason, failure.detail)
        self._observe_head(ctx, 101, {}, sent)
        downstream = web.WebSocketResponse(
            protocols=(upstream_ws.protocol,) if upstream_ws.protocol else (),
            max_msg_size=0,
            autoclose=False,
        )
        try:
            await downstream.prepare(request)
            await bridge_websockets(downstream, upstream_ws)
        finally:
            await upstream_ws.close()
            await downstream.close()
        return downstream

    # ------------------------------------------------------------ errors

    def _error(
        self, ctx: RequestContext, status: int, reason: str, message: str
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


WSLike = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def bridge_websockets(a: WSLike, b: WSLike) -> None:
    """Copy frames both ways until either side closes, then close the other with its code."""

    async def pump(src: WSLike, dst: WSLike) -> None:
        async for msg in src:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await dst.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            elif msg.type == aiohttp.WSMsgType.CLOSE:
                break
        code = src.close_code or aiohttp.WSCloseCode.OK
        if not dst.closed:
            await dst.close(code=code)

    tasks = [asyncio.ensure_future(pump(a, b)), asyncio.ensure_future(pump(b, a))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, aiohttp.ClientError):
                await task
