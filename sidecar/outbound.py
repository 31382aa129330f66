"""The outbound listener: the app's requests to other services, routed by each upstream's policy.

Owns the request path from the app to an upstream endpoint: finding the upstream (``Host``
or absolute-form target, so ``HTTP_PROXY=http://127.0.0.1:PORT`` works), running the phases
of :mod:`sidecar.phases`, sending through the upstream transport (:mod:`sidecar.transport`:
a keep-alive pool in production, an in-memory handler in tests) with a request timeout,
retrying safely, relaying streamed bodies and WebSockets, and answering with a JSON error
(never a hang) when it cannot forward. The routing decision itself is the policy's
(:mod:`mesh`); this module measures and carries it out. It opens no connection itself.

The request path (:meth:`OutboundProxy.serve`) reads and answers an
:class:`sidecar.exchange.Exchange`, so it is the same whichever server parsed the request: the
sidecar's HTTP/1.1 server (:mod:`sidecar.http1.server`) or aiohttp's (:meth:`OutboundProxy.handle`:
WebSocket upgrades, transparent interception). One :class:`sidecar.watchdog.Watchdog` per
request bounds each stall (upload, wait for the head, each chunk of the body) by the request
timeout.

Retry rule (RFC 9110 §9.2.2 idempotent methods, narrowed so nothing is ever replayed that
may have been processed or cannot be re-sent): only GET, HEAD, OPTIONS, TRACE, and PUT or
DELETE without a body; only when nothing was received from the upstream (connect error,
connect timeout, connection reset before the response head), or when the endpoint's sidecar
answered 503 with a signed ``X-GT-Refused`` (its queue was full, no slot came in time, it was
shutting down: the app never saw the request; :mod:`wire.signals`); always to an endpoint not
tried yet; at most ``max_attempts`` in all; only while the upstream's retry budget allows.
A POST (or any request with a body) is never re-sent; it goes to another endpoint only when
no connection could be had to the first (connect error or timeout: nothing left the
sidecar, not a byte of the body was read; HAProxy's redispatch), under the same limits. A
refused attempt is observed by the policy as a failure of that
endpoint (a refusal for load, ``queue-full`` or ``queue-timeout``, as a failure in its cost
that never ejects it: :class:`mesh.policy.Outcome` ``shed``); its retry carries no
``X-GT-Retry`` (nothing was re-sent to an app). On the last
attempt a refusal is relayed as it came.

Hedging (``--hedge``; :mod:`mesh.hedging` decides which picks and the delay): a request the
policy sent to an endpoint only to explore it, if bodiless and idempotent, is sent to the best
endpoint as well once the explored one has not answered by the best one's recent p90, within
the retry budget; the first response head wins and the other racer is cancelled (its
connection closed) and observed as censored, not as a failure. Only heads race, so nothing has
reached the app from the loser. An explored endpoint that lost runs on, though, until its head
comes or ``run_on`` seconds (2) from its sending, one at a time per endpoint, and its answer
(read as far as its head, then closed) or that lower bound is what the policy learns: a pod
slow on half its requests lost every race on that half and, censored below its estimate, was
learned only from its quick half, which made it look healthy twice a minute (a stranger's
finding). Its answer reaches nobody; it is counted as ``ran-on``, not ``cancelled``.

Rescue (:mod:`sidecar.rescue`; with ``--rescue``): a request the retry rule allows to
be sent again, still waiting for its answer's head at an endpoint the policy ejected since it
was sent (a hung pod holds what it was sent), is given up there after the policy's tick and
sent to another endpoint as a retry, its withdrawal from the retry budget made before it is
given up; the given-up attempt is observed as censored.

Long polls: a request on one of its upstream's declared ``long_paths`` (:mod:`wire.long_paths`)
is started and ended as such with the policy (``on_start(..., long=True)``, ``Outcome.long``):
its answer's time teaches nothing of the endpoint (docs/routing.md, "Long polls"), its
failures count as any other's; it is never hedged.

An app that hangs up while its answer's body is being relayed is the app's doing: it is
counted as ``app-hung-up`` (not ``body-relay-failed``), the endpoint is not charged, and the
rest of the body is drained (bounded) so that the upstream connection stays in the pool.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from mesh.hedging import HedgePlan, Hedger, may_hedge
from mesh.policy import Outcome
from mesh.profiles import StrategyProfile
from sidecar.errors import UNREACHED, ErrorReason, HeaderDrop
from sidecar.exchange import (
    AiohttpExchange,
    Answer,
    Exchange,
    RequestHead,
    body_failed,
    json_answer,
)
from sidecar.forward import (
    BodyReader,
    has_passed,
    must_be_empty,
    reader_stalled,
    relay_answer,
    relayable_trailers,
    request_headers_to_upstream,
    response_headers_from_wire,
    response_headers_to_app,
)
from sidecar.http1.client import H1Transport
from sidecar.http1.client_connection import RequestBodyFailed
from sidecar.metrics import OutboundMetrics
from sidecar.notice_log import NoticeLog
from sidecar.phases import UNSENT, ProxyPhases, RequestContext, unsent_attempts
from sidecar.rescue import Held, RescueBoard
from sidecar.transport import (
    BODY_READ_ERRORS,
    AttemptFailure,
    HandshakeRefused,
    Transport,
    TransportError,
    UpstreamRequest,
    UpstreamResponse,
    WebSocketDialer,
    classify,
)
from sidecar.upstreams import UpstreamGroup, UpstreamTable
from sidecar.watchdog import Watchdog
from sidecar.websocket import (
    accept_like,
    is_websocket,
    oversized_counter,
    refused_upgrade_answer,
    relay_websocket,
)
from wire.errors import WireError
from wire.headers import APP_RESET, CONGESTION, REFUSED, SHED, header_label, parse_congestion
from wire.long_paths import under_long_path

log = logging.getLogger(__name__)

NEVER_CONNECTED = UNREACHED
"""Attempt failures after which no upstream can have seen the request: a retry of it is
not a re-send (no ``X-GT-Retry`` for it, :meth:`sidecar.phases.ProxyPhases.
upstream_request_filter`), although the caller's own retry budget still pays for it."""
REPLAY_MAX = 64 * 1024
"""Bytes of a request body kept while it is sent, so that the whole request can go to another
endpoint when the first one's sidecar refuses it, signed, before its app saw it (as Envoy
buffers a body it may retry). A larger body's refusal goes back to the app (503)."""

CONGESTION_KEY = CONGESTION.lower()
REFUSED_KEY = REFUSED.lower()
RETRYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# a failed body relay: the upstream's stream broke or stalled, or the app went away
RELAY_ERRORS: tuple[type[BaseException], ...] = (*BODY_READ_ERRORS, ConnectionError)


# what is left of an answer the app no longer wants is read and dropped, up to this much, so
# that the upstream connection can serve the next request; past it the connection is closed
DRAIN_LIMIT = 256 * 1024
DRAIN_TIMEOUT = 1.0


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


class _Upload:
    """The app's body as it arrives; each chunk is progress for the request's watchdog. (An
    async iterator, not an async generator: mypyc compiles this module and no async
    generator.) ``trailers``: the body's trailer fields that may be relayed, once it has
    ended (what the upstream client writes after the last chunk)."""

    __slots__ = ("_content", "_kept_size", "_on_dropped", "_replay", "_watchdog", "kept",
                 "read", "waiting")

    def __init__(self, content: BodyReader, watchdog: Watchdog,
                 on_dropped: Callable[[list[str]], None],
                 replay: list[bytes] | None = None) -> None:
        self._content = content
        self._watchdog = watchdog
        self._on_dropped = on_dropped
        self.read = False  # asked for a chunk: this body can no longer go elsewhere
        self.waiting = False  # waiting for the app's next chunk (a stall now is the app's)
        # what went out of it, kept while it fits REPLAY_MAX (None past it): the whole body
        # can go to another endpoint after a signed refusal (the app never saw it)
        self.kept: list[bytes] | None = []
        self._kept_size = 0
        self._replay = list(replay or ())  # the body read for an earlier attempt, sent first

    @property
    def trailers(self) -> list[tuple[str, str]] | None:
        return relayable_trailers(getattr(self._content, "trailers", None), self._on_dropped)

    def __aiter__(self) -> _Upload:
        return self

    async def __anext__(self) -> bytes:
        self.read = True
        if self._replay:
            chunk = self._replay.pop(0)
        else:
            chunk = await self._next()
            if not chunk:
                raise StopAsyncIteration
        self._watchdog.push()
        self._keep(chunk)
        return chunk

    async def _next(self) -> bytes:
        self.waiting = True
        try:
            return await self._content.readany()
        finally:
            self.waiting = False

    def _keep(self, chunk: bytes) -> None:
        if self.kept is not None:
            self._kept_size += len(chunk)
            if self._kept_size > REPLAY_MAX:
                self.kept = None
            else:
                self.kept.append(chunk)

    async def whole_for_replay(self) -> list[bytes] | None:
        """The whole body, to send to another endpoint after a signed refusal: what went out
        and what the app still sends, while it fits REPLAY_MAX; None when it does not, or
        the app's body broke off. (Only once the attempt's writer is stopped.)"""
        for chunk in self._replay:  # read for an earlier attempt, not yet sent in this one
            self._keep(chunk)
        self._replay = []
        try:
            while self.kept is not None:
                chunk = await self._next()
                if not chunk:
                    break
                self._watchdog.push()
                self._keep(chunk)
        except Exception:  # the app's body broke: not to be sent anywhere
            return None
        return self.kept


RUN_ON = 2.0  # seconds from its sending an explored hedge loser runs on to show its latency


@dataclass(slots=True)
class _RunningOn:
    """An explored hedge loser running on (:meth:`OutboundProxy._run_on`)."""

    group: UpstreamGroup
    endpoint: str
    sent: float
    racer: asyncio.Future[UpstreamResponse]
    learning: asyncio.Future[None]


def _shed(status: int, game: dict[str, str]) -> bool:
    """Whether an answer is a refusal for load its endpoint's sidecar signed (``game`` holds
    only the signals that verified): a failure that ejects nothing."""
    return status == 503 and game.get(REFUSED_KEY) in SHED


def _close_answer(task: asyncio.Future[UpstreamResponse]) -> None:
    """Done callback of a cancelled hedge racer: close an answer that arrived anyway (and
    retrieve a failure, which nobody waits for)."""
    if not task.cancelled() and task.exception() is None:
        task.result().close()


def _attempts(ctx: RequestContext) -> list[str]:
    """Why each failed attempt of the request failed, in order (for its error answer)."""
    found = ctx.extra.get("failed_attempts")
    if not isinstance(found, list):
        found = ctx.extra["failed_attempts"] = []
    return found


def may_retry(method: str, has_body: bool) -> bool:
    """Whether a failed attempt of this request may be sent again (see the module docstring)."""
    return method in RETRYABLE_METHODS and not has_body


def split_target(request: RequestHead | web.BaseRequest) -> tuple[str | None, str]:
    """(authority, origin-form target) of a request in origin- or absolute-form."""
    raw = request.raw_path
    if not raw.startswith("/") and raw[:7].lower() == "http://":
        url = URL(raw, encoded=True)
        authority = url.raw_host or ""
        if url.explicit_port:
            authority = f"{authority}:{url.port}"
        return authority or None, url.raw_path_qs or "/"
    return request.headers.get("Host"), raw


def shown(name: str | None, limit: int = 128) -> str | None:
    """A name the app sent (a Host), as an error answer quotes it: at most ``limit``
    characters (a 5 KB Host was echoed twice in a 404: a stranger's finding)."""
    if name is None or len(name) <= limit:
        return name
    return f"{name[:limit]}... ({len(name)} characters)"


_NAMES_KEPT = 1024  # authorities whose upstream name is remembered (a bounded table)
_names: dict[str, str] = {}


def upstream_name(authority: str) -> str:
    """The upstream NAME an authority refers to: its host, lower-cased, port ignored."""
    name = _names.get(authority)
    if name is None:
        name = _upstream_name(authority)
        if len(_names) < _NAMES_KEPT and len(authority) <= 255:
            _names[authority] = name
    return name


def _upstream_name(authority: str) -> str:
    host = authority.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    else:
        host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return host.rstrip(".")


class OutboundProxy:
    """The aiohttp handler of the outbound listener; one instance per sidecar process.

    ``transport``: how requests reach the endpoints (default: an :class:`H1Transport`
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
        pinned_upstream: Callable[[Any], str | None] | None = None,
        max_attempts: int = 3,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        transport: Transport | None = None,
        hedge: bool = False,
        source_address: str | None = None,
        rescue: bool = False,
        long_paths: Callable[[str], tuple[str, ...]] | None = None,
        run_on: float = RUN_ON,
    ) -> None:
        self.sidecar_id = sidecar_id
        # how long an explored hedge loser runs on, and the one running on per endpoint
        # (module docstring, "Hedging")
        self.run_on = run_on
        self._running_on: dict[tuple[str, str], _RunningOn] = {}
        # an upstream's declared long requests, by its name (wire.long_paths): their
        # answers' time teaches the policy nothing (module docstring, "Long polls")
        self.long_paths: Callable[[str], tuple[str, ...]] = long_paths or (lambda name: ())
        self.hedge = hedge  # hedged exploration (module docstring, "Hedging")
        # requests held by an endpoint ejected meanwhile go elsewhere (module docstring,
        # "Rescue"); RescueBoard.sweep runs after each policy tick (sidecar.runner)
        self.rescue: RescueBoard | None = RescueBoard(
            max_attempts, on_budget_exhausted=self._count_rescue_declined) if rescue else None
        self.table = table
        self.profile = profile
        self.metrics = metrics
        self.phases = phases or ProxyPhases()
        self.max_attempts = max_attempts
        self.rng = rng or random.Random()
        self.clock = clock
        self._notices = NoticeLog(log, clock)
        self.via = f"1.1 {sidecar_id}"
        # The upstream a request's connection is bound to regardless of Host, or None (Host
        # routing): the original destination (sidecar.transparent) or a discovered authority.
        self.pinned_upstream: Callable[[Any], str | None] = (
            pinned_upstream or (lambda request: None))
        self._own_transport: H1Transport | None = None
        if transport is None:
            transport = self._own_transport = H1Transport(
                connect_timeout=profile.connect_timeout, source_address=source_address
            )
        self.transport = transport
        self._dialer = transport if isinstance(transport, WebSocketDialer) else None
        self._oversized = oversized_counter(metrics.registry, "outbound")  # 1009 closes

    def _count_rescue_declined(self, group: UpstreamGroup) -> None:
        self.metrics.retry_budget_exhausted.labels(group.name).inc()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._own_transport is not None:
            await self._own_transport.start()

    async def close(self) -> None:
        now = self.clock()
        for running in self._running_on.values():  # nothing learned from them
            running.learning.cancel()
            running.racer.cancel()
            running.racer.add_done_callback(_close_answer)
            running.group.policy.on_outcome(Outcome(running.endpoint, now - running.sent, True,
                                                    now, answered=False, void=True))
        self._running_on.clear()
        if self._own_transport is not None:
            await self._own_transport.close()

    def make_app(self) -> web.Application:
        app = web.Application(handler_args={"max_field_size": 16384})
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    # ------------------------------------------------------------ request path

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """aiohttp's handler: the request path of :meth:`serve` over an aiohttp request (the
        WebSocket upgrades and exotic requests the HTTP/1.1 server hands over, transparent
        interception's site)."""
        exchange = AiohttpExchange(request)
        await self.serve(exchange)
        return exchange.response if exchange.response is not None else web.Response(status=502)

    async def serve(self, exchange: Exchange) -> None:
        """Route, forward and answer one request (see the module docstring)."""
        authority, target = split_target(exchange)
        ctx = RequestContext(
            started=self.clock(), method=exchange.method, target=target,
            authority=authority or "",
        )
        try:
            answer = await self._route(exchange, ctx)
            if answer is not None:
                await exchange.answer(answer)
        finally:
            if ctx.group is not None:
                self.metrics.request_in_flight(ctx.group.name, -1)
            self.phases.logging(ctx, self.clock())

    async def _route(self, exchange: Exchange, ctx: RequestContext) -> Answer | None:
        if exchange.method == "CONNECT":
            return self._error(ctx, 501, ErrorReason.CONNECT_NOT_SUPPORTED,
                               "CONNECT tunnels are not proxied")
        if not ctx.authority:
            return self._error(ctx, 400, ErrorReason.NO_HOST,
                               "request has neither Host nor absolute URL")
        if not ctx.target.startswith("/") and "://" in ctx.target[:16]:  # absolute-form of
            # another scheme: https:// would go out in plain text (the sidecar originates no
            # TLS; a stranger's finding)
            return self._error(ctx, 400, ErrorReason.BAD_TARGET,
                               f"only http:// absolute targets are proxied, not "
                               f"{ctx.target.partition('://')[0][:8]!r}:// (the sidecar does "
                               "not originate TLS)")
        if not ctx.target.startswith("/"):  # `*` (asterisk-form), `host:port`, garbage
            return self._error(ctx, 400, ErrorReason.BAD_TARGET,
                               f"request target {ctx.target[:64]!r} is neither a path nor an "
                               "absolute URL")
        ctx.upstream = self.pinned_upstream(exchange) or upstream_name(ctx.authority)
        if has_passed(exchange.headers, self.via):
            return self._error(ctx, 508, ErrorReason.LOOP_DETECTED,
                               "request already passed this sidecar")
        group = self.table.get(ctx.upstream)
        if group is None:
            return self._error(
                ctx, 404, ErrorReason.UNKNOWN_UPSTREAM,
                f"no upstream named {shown(ctx.upstream)!r} is configured",
            )
        ctx.group = group
        self.metrics.request_in_flight(group.name, 1)
        early = await self.phases.request_filter(exchange, ctx)
        if early is not None:
            ctx.status = early.status
            return early
        headers, stripped = request_headers_to_upstream(
            exchange.headers, client_ip=exchange.remote, proto=exchange.scheme, via=self.via
        )
        headers.popall("Expect", None)  # the listener answers 100-continue to the app itself
        if authority_header := ctx.authority:
            headers["Host"] = authority_header
        if stripped:
            self._app_headers_dropped(stripped)
        if isinstance(exchange, AiohttpExchange) and is_websocket(exchange.request):
            result = await self._websocket(exchange.request, ctx, headers)
            if isinstance(result, Answer):
                return result
            exchange.response = result
            return None
        return await self._forward(exchange, ctx, headers)

    async def _forward(
        self, exchange: Exchange, ctx: RequestContext, base_headers: CIMultiDict[str]
    ) -> Answer | None:
        group = ctx.group
        assert group is not None
        has_body = exchange.body_exists
        retryable = may_retry(ctx.method, has_body)
        ctx.long = under_long_path(ctx.target, self.long_paths(group.name))
        hedger = group.policy if self.hedge and may_hedge(ctx.method, has_body) \
            and not ctx.long and isinstance(group.policy, Hedger) else None
        group.budget.deposit(self.clock())
        failure: AttemptFailure | None = None
        # request_timeout bounds each stall: the upload, the wait for the answer after the
        # last byte sent, each chunk of the answer's body (one timer for all of it)
        watchdog = Watchdog(self.profile.request_timeout)
        replay: list[bytes] | None = None  # the body, whole, after a signed refusal
        rescue = self.rescue if retryable else None
        prepaid = False  # this attempt's retry was withdrawn from the budget by a rescue
        try:
            for attempt in range(self.max_attempts):
                if has_body and body_failed(exchange):  # broke before this attempt began
                    return self._error(ctx, 400, ErrorReason.APP_HUNG_UP,
                                       "the request body did not arrive whole (it broke off "
                                       "before it could be sent)")
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
                if attempt > 0 and not prepaid:
                    if not group.budget.try_withdraw(now):
                        self.metrics.retry_budget_exhausted.labels(group.name).inc()
                        break
                    self.metrics.retries.labels(group.name).inc()
                prepaid = False
                ctx.endpoint = endpoint
                ctx.tried.append(endpoint)
                headers = CIMultiDict(base_headers)
                self.phases.upstream_request_filter(ctx, headers)
                sent = self.clock()
                group.policy.on_start(endpoint, sent, ctx.long)
                watchdog.push()
                plan = hedger.hedge_plan(endpoint) if hedger is not None else None
                if plan is not None and plan.backup not in ctx.tried:
                    raced = await self._race(ctx, endpoint, sent, plan, headers, watchdog,
                                             exchange.client_gone)
                    if isinstance(raced, AttemptFailure):
                        failure = raced
                        if raced.nothing_received and retryable:
                            continue
                        break
                    endpoint, sent, upstream = raced
                    ctx.endpoint = endpoint
                    await self._relay_response(exchange, ctx, upstream, sent, watchdog)
                    return None
                upload = _Upload(exchange.content, watchdog, self._app_headers_dropped,
                                 replay) if has_body else None
                request = UpstreamRequest(
                    ctx.method, URL(endpoint + ctx.target, encoded=True), headers, upload)
                held = rescue.hold(group, ctx, endpoint, sent) if rescue is not None else None
                try:
                    upstream = await (self.transport.handle_request(request) if held is None
                                      else self._held_request(request, group, held))
                except asyncio.CancelledError:
                    if held is not None and held.took_back():
                        # its endpoint was ejected while it held it (sidecar/rescue.py): sent
                        # elsewhere, the retry paid for by the sweep
                        failure = self._rescued(ctx, endpoint, sent)
                        prepaid = True
                        continue
                    if not watchdog.took_back():
                        if exchange.client_gone():  # the listener cut the app (bad framing)
                            self._app_left(ctx, endpoint, sent)
                            self.metrics.errors.labels(ctx.upstream_label,
                                                       ErrorReason.APP_HUNG_UP).inc()
                        else:
                            self._charge(ctx, endpoint, sent)
                        raise
                    if upload is not None and upload.waiting:  # the app stalled its upload
                        self._app_left(ctx, endpoint, sent)
                        return self._error(ctx, 408, ErrorReason.UPLOAD_TIMEOUT,
                                           "the request body stalled: nothing came for "
                                           f"{self.profile.request_timeout:g} s")
                    failure = self._attempt_failed(ctx, endpoint, sent, attempt, TimeoutError())
                    break  # the upstream may have the request: never re-sent
                except RequestBodyFailed as broken:  # the app's body broke off: its doing
                    # (its own name: mypyc types an except variable by its first clause)
                    self._app_left(ctx, endpoint, sent)
                    return self._error(ctx, 400, ErrorReason.APP_HUNG_UP,
                                       f"the request body did not arrive whole: {broken}")
                except (TransportError, TimeoutError) as exc:
                    failure = self._attempt_failed(ctx, endpoint, sent, attempt, exc)
                    if failure.reason in NEVER_CONNECTED:  # the request never left: the next
                        ctx.extra[UNSENT] = unsent_attempts(ctx) + 1  # is no re-send, so
                        if upload is None or not upload.read:  # whatever its method, while
                            continue  # its body is whole (uploads start once connected)
                    if not (failure.nothing_received and retryable):
                        break
                    continue
                except BaseException:
                    self._charge(ctx, endpoint, sent)
                    raise
                head = None
                # A refusal signed by the endpoint's sidecar proves its app never saw the
                # request: it goes elsewhere whatever its method, its body with it (kept while
                # it was sent, the rest read now) when that fits REPLAY_MAX.
                if upstream.status == 503 and attempt + 1 < self.max_attempts and (
                        upload is None or upload.kept is not None):
                    head = self._answer_head(ctx, upstream)
                    refused = head[1].get(REFUSED_KEY)
                    if refused is not None:
                        failure = await self._refused(ctx, upstream, sent, attempt, refused,
                                                      head[1])
                        ctx.extra[UNSENT] = unsent_attempts(ctx) + 1  # the app never saw it
                        if upload is not None:
                            try:
                                replay = await upload.whole_for_replay()
                            except asyncio.CancelledError:
                                if not watchdog.took_back():
                                    raise
                                # the app stalled the rest of its body: as on a first attempt
                                return self._error(ctx, 408, ErrorReason.UPLOAD_TIMEOUT,
                                                   "the request body stalled: nothing came "
                                                   f"for {self.profile.request_timeout:g} s")
                            if replay is None:
                                break  # too large to keep, or broken: the refusal it is
                        continue
                # The endpoint's sidecar signed that its app's connection broke before any
                # answer: sent again only as after a reset of this sidecar's own connection
                if upstream.status == 502 and retryable and attempt + 1 < self.max_attempts:
                    head = self._answer_head(ctx, upstream)
                    if head[1].get(REFUSED_KEY) == APP_RESET:
                        failure = await self._refused(ctx, upstream, sent, attempt, APP_RESET,
                                                      head[1])
                        continue
                await self._relay_response(exchange, ctx, upstream, sent, watchdog, head)
                return None
        finally:
            watchdog.stop()
        # the first attempt either returned or recorded why it failed
        assert failure is not None
        tried = _attempts(ctx)
        why = "; ".join(tried) if len(tried) > 1 else failure.detail  # each, not the last only
        return self._error(
            ctx, failure.status, failure.reason,
            f"upstream {group.name!r} failed after {len(ctx.tried)} attempt(s): {why}",
        )

    async def _race(
        self, ctx: RequestContext, endpoint: str, sent: float, plan: HedgePlan,
        headers: CIMultiDict[str], watchdog: Watchdog, app_gone: Callable[[], bool],
    ) -> tuple[str, float, UpstreamResponse] | AttemptFailure:
        """One hedged attempt of a bodiless idempotent request to an explored ``endpoint``
        (:mod:`mesh.hedging`): if no answer came within ``plan.delay``, and the retry budget
        allows one more attempt, the same request goes to ``plan.backup`` and the first
        response head wins; the other is cancelled (its connection closed), which is no
        failure of its endpoint: it is observed as censored at the time it was given. Nothing
        has been sent to the app while racing (only response heads are raced).

        Returns (endpoint, sent, response) of the winner, or the last failure when every
        racer failed (each failure is recorded here). A watchdog timeout is an
        ``upstream-timeout`` failure of every racer still running."""
        group = ctx.group
        assert group is not None

        def request_to(target: str) -> UpstreamRequest:
            return UpstreamRequest(ctx.method, URL(target + ctx.target, encoded=True),
                                   CIMultiDict(headers), None)

        racers: dict[asyncio.Future[UpstreamResponse], tuple[str, float]] = {}
        racers[asyncio.ensure_future(self.transport.handle_request(request_to(endpoint)))] = (
            endpoint, sent)
        failure: AttemptFailure | None = None
        try:
            done, pending = await asyncio.wait(set(racers), timeout=plan.delay)
            if pending and group.budget.try_withdraw(self.clock()):
                backup = plan.backup
                ctx.tried.append(backup)
                self.metrics.hedges.labels(group.name, "sent").inc()
                b_sent = self.clock()
                group.policy.on_start(backup, b_sent)
                racers[asyncio.ensure_future(
                    self.transport.handle_request(request_to(backup)))] = (backup, b_sent)
                pending = set(racers)
            elif pending:
                self.metrics.hedges.labels(group.name, "budget-exhausted").inc()
            while True:
                if not done:
                    done, pending = await asyncio.wait(
                        pending, return_when=asyncio.FIRST_COMPLETED)
                winner = next((t for t in done if t.exception() is None), None)
                for task in done:
                    exc = task.exception()
                    if exc is None:
                        continue
                    racer, at = racers.pop(task)
                    if not isinstance(exc, TransportError | TimeoutError):
                        self._charge(ctx, racer, at)
                        raise exc
                    failure = self._attempt_failed(ctx, racer, at, ctx.attempt, exc)
                if winner is not None:
                    win_endpoint, win_sent = racers.pop(winner)
                    for task in done - {winner}:
                        if task in racers:  # answered too, a hair later: not needed
                            racer, at = racers.pop(task)
                            task.result().close()
                            self._censored(ctx, racer, at)
                    if win_endpoint != endpoint:
                        self.metrics.hedges.labels(group.name, "won").inc()
                        self._run_on(ctx, racers, endpoint)
                    self._drop(ctx, racers, "censored")
                    return win_endpoint, win_sent, winner.result()
                if not pending:
                    assert failure is not None
                    return failure
                done = set()
        except asyncio.CancelledError:
            if not watchdog.took_back():
                # the app reset (or the listener cut it): nobody's failure, counted as the
                # unhedged path counts it
                gone = app_gone()
                self._drop(ctx, racers, "void" if gone else "charged")
                if gone:
                    self.metrics.errors.labels(ctx.upstream_label, ErrorReason.APP_HUNG_UP).inc()
                raise
            return self._drop(ctx, racers, "timed-out") or failure or classify(TimeoutError())
        except BaseException:
            self._drop(ctx, racers, "charged")
            raise

    def _drop(self, ctx: RequestContext,
              racers: dict[asyncio.Future[UpstreamResponse], tuple[str, float]],
              how: str) -> AttemptFailure | None:
        """Cancel every racer still running (its connection is closed; an answer that slips in
        is closed too) and observe it as ``how``: ``censored`` (lost the race), ``charged``
        (cut off by something else), ``void`` (the app's doing: learned as nothing) or
        ``timed-out`` (the watchdog: returns the failure). Does not wait for the cancelled
        racers to unwind."""
        failure = None
        for task, (racer, at) in racers.items():
            task.cancel()
            task.add_done_callback(_close_answer)
            if how == "censored":
                self._censored(ctx, racer, at)
            elif how == "charged":
                self._charge(ctx, racer, at)
            elif how == "void":
                self._app_left(ctx, racer, at)
            else:
                failure = self._attempt_failed(ctx, racer, at, ctx.attempt, TimeoutError())
        racers.clear()
        return failure

    def _run_on(self, ctx: RequestContext,
                racers: dict[asyncio.Future[UpstreamResponse], tuple[str, float]],
                explored: str) -> None:
        """Take the ``explored`` endpoint's racer, which lost, out of ``racers`` and let it
        run on (:meth:`_learn`), unless one of that endpoint already does."""
        group = ctx.group
        assert group is not None
        key = (group.name, explored)
        if key in self._running_on or self.run_on <= 0:
            return
        racer = next((t for t, (e, _) in racers.items() if e == explored), None)
        if racer is None:
            return
        _, sent = racers.pop(racer)
        self.metrics.hedges.labels(group.name, "ran-on").inc()
        # its answer's signals are the explored endpoint's (checked against the request's
        # challenge, in extra); a context of its own, for the request's goes on
        loser = RequestContext(started=ctx.started, method=ctx.method, target=ctx.target,
                               authority=ctx.authority, upstream=ctx.upstream, group=group,
                               endpoint=explored, attempt=ctx.attempt, extra=dict(ctx.extra),
                               long=ctx.long)
        learning = asyncio.ensure_future(self._learn(loser, racer, sent))
        self._running_on[key] = _RunningOn(group, explored, sent, racer, learning)

    async def _learn(self, ctx: RequestContext, racer: asyncio.Future[UpstreamResponse],
                     sent: float) -> None:
        """Wait for a hedge loser running on until ``run_on`` from its sending (the request
        timeout, if shorter); the policy learns its answer (the head's status, time and
        verified signals; the answer is closed unread), its failure, or, at the bound, that
        it took at least that long (censored). :meth:`close` cuts it short."""
        group, endpoint = ctx.group, ctx.endpoint
        assert group is not None and endpoint is not None
        bound = min(self.run_on, self.profile.request_timeout)
        try:
            await asyncio.wait({racer}, timeout=max(0.0, sent + bound - self.clock()))
        finally:
            self._running_on.pop((group.name, endpoint), None)
        now = self.clock()
        if not racer.done():
            racer.cancel()
            racer.add_done_callback(_close_answer)
            group.policy.on_outcome(Outcome(endpoint, now - sent, True, now, answered=False,
                                            censored=True))
            return
        exc = racer.exception()
        if exc is not None:  # a failure of the endpoint, as any attempt's
            group.policy.on_outcome(Outcome(endpoint, now - sent, False, now))
            self.metrics.forwarded(group.name, endpoint, classify(exc).reason, None)
            return
        answer = racer.result()
        try:
            _, game = self._answer_head(ctx, answer)
        finally:
            answer.close()
        status = answer.status
        self._observe(ctx, status < 500, str(status), sent, now - sent, now,
                      self._congestion(ctx, game), _shed(status, game))

    def _censored(self, ctx: RequestContext, endpoint: str, sent: float) -> None:
        """A racer that lost a hedge: its latency is at least the time it was given."""
        assert ctx.group is not None
        done = self.clock()
        ctx.group.policy.on_outcome(
            Outcome(endpoint, done - sent, True, done, answered=False, censored=True))
        self.metrics.hedges.labels(ctx.group.name, "cancelled").inc()

    async def _held_request(self, request: UpstreamRequest, group: UpstreamGroup,
                            held: Held) -> UpstreamResponse:
        """Send ``request`` while it is rescuable (:mod:`sidecar.rescue`): released once its
        answer's head came, or it failed or was cancelled. (Its own function: mypyc compiles
        no ``continue`` inside a ``try``/``finally``, which the attempt loop has.)"""
        try:
            return await self.transport.handle_request(request)
        finally:
            assert self.rescue is not None
            self.rescue.release(group, held)

    def _rescued(self, ctx: RequestContext, endpoint: str, sent: float) -> AttemptFailure:
        """An attempt given up at an endpoint ejected while it held it (:mod:`sidecar.rescue`):
        observed as censored (its latency is at least the time it waited; no failure of its
        own: the ejection already counted what the endpoint did), and the request goes to
        another endpoint; the failure returned stands if none can take it."""
        assert ctx.group is not None
        done = self.clock()
        ctx.group.policy.on_outcome(Outcome(endpoint, done - sent, True, done, answered=False,
                                            censored=True, long=ctx.long))
        # counted here, not by the sweep: the watchdog, the app hanging up or a drain may
        # have cancelled the task in the same loop pass, and theirs stands (Held.took_back)
        self.metrics.rescues.labels(ctx.group.name).inc()
        self.metrics.retries.labels(ctx.group.name).inc()
        # what the endpoint held, in its own series (a stranger found it in none)
        self.metrics.forwarded(ctx.group.name, endpoint, ErrorReason.RESCUED, None)
        detail = (f"{endpoint}: ejected while it held the request ({done - sent:.2f} s "
                  "without an answer)")
        _attempts(ctx).append(detail)
        log.debug("%s %s: attempt %d rescued: %s", ctx.group.name, endpoint, ctx.attempt + 1,
                  detail)
        return AttemptFailure(ErrorReason.UPSTREAM_TIMEOUT, 504, False, detail)

    def _charge(self, ctx: RequestContext, endpoint: str, sent: float) -> None:
        """An attempt cut off by something else than a failure still counts as one."""
        assert ctx.group is not None
        done = self.clock()
        ctx.group.policy.on_outcome(Outcome(endpoint, done - sent, False, done, long=ctx.long))

    def _app_left(self, ctx: RequestContext, endpoint: str, sent: float) -> None:
        """The app's side of the attempt broke (its upload ended short, broke off or stalled,
        or the listener cut it for bad framing): the policy learns nothing from it, neither a
        failure nor a success of the endpoint (a void outcome, as an HTTP/2 stream the app
        resets)."""
        assert ctx.group is not None
        done = self.clock()
        ctx.group.policy.on_outcome(Outcome(endpoint, done - sent, True, done, answered=False,
                                            void=True, long=ctx.long))
        ctx.error_reason = ErrorReason.APP_HUNG_UP
        log.debug("%s %s: the app's request broke off mid-body", ctx.upstream, endpoint)

    def _attempt_failed(self, ctx: RequestContext, endpoint: str, sent: float, attempt: int,
                        exc: BaseException) -> AttemptFailure:
        group = ctx.group
        assert group is not None
        failure = classify(exc)
        done = self.clock()
        group.policy.on_outcome(Outcome(endpoint, done - sent, False, done, long=ctx.long))
        self.metrics.forwarded(group.name, endpoint, failure.reason, None)
        log.debug("%s %s: attempt %d: %s", group.name, endpoint, attempt + 1, failure.detail)
        _attempts(ctx).append(f"{endpoint}: {failure.detail}")
        return failure

    def _observe_head(
        self, ctx: RequestContext, status: int, game: dict[str, str], sent: float,
        shed: bool = False,
    ) -> None:
        """An answer whose head is all of it for the policy (a refusal read and dropped, an
        upgrade): its outcome, now."""
        now = self.clock()
        ctx.status = status
        ctx.game_response_headers = game
        self._observe(ctx, status < 500, str(status), sent, now - sent, now,
                      self._congestion(ctx, game), shed)

    def _observe(self, ctx: RequestContext, ok: bool, code: str, sent: float, latency: float,
                 now: float, congestion: float | None, shed: bool) -> None:
        group, endpoint = ctx.group, ctx.endpoint
        assert group is not None and endpoint is not None
        group.policy.on_outcome(
            Outcome(endpoint, latency, ok, now, congestion, answered=True, sent_at=sent,
                    shed=shed, long=ctx.long))
        self.metrics.forwarded(group.name, endpoint, code, latency)

    def _congestion(self, ctx: RequestContext, game: dict[str, str]) -> float | None:
        raw = game.get(CONGESTION_KEY)
        if raw is None:
            return None
        try:
            return parse_congestion(raw)
        except WireError as exc:
            self.metrics.rejected_headers.labels(CONGESTION, HeaderDrop.MALFORMED).inc()
            self._notices.notice((ctx.upstream, ctx.endpoint, CONGESTION),
                                 f"{ctx.upstream} {ctx.endpoint}: ignored {CONGESTION}: {exc}")
            return None

    def _answer_head(
        self, ctx: RequestContext, upstream: UpstreamResponse
    ) -> tuple[CIMultiDict[str], dict[str, str]]:
        """The answer's headers for the app, and the game signals it carries that verify
        (only signed signals are believed)."""
        fields = getattr(upstream, "wire_fields", None)  # sidecar.http1's: the raw fields
        headers, game = (response_headers_from_wire(fields, self.via) if fields is not None
                         else response_headers_to_app(upstream.headers, self.via))
        if game:  # where the answer came from: what signed signals must say (wire.signals)
            ctx.extra["peer"] = getattr(upstream, "peer_ip", "")
        return headers, self.phases.response_signals(ctx, game)

    async def _refused(self, ctx: RequestContext, upstream: UpstreamResponse, sent: float,
                       attempt: int, refused: str, game: dict[str, str]) -> AttemptFailure:
        """An endpoint's sidecar refused the attempt before its app saw it, or said its app's
        connection broke before an answer (``APP_RESET``): the policy learns it as a failure
        of that endpoint, the answer is read and dropped (the connection stays in the pool if
        it ends soon), and the request may go to another endpoint."""
        self._observe_head(ctx, upstream.status, game, sent, shed=refused in SHED)
        try:
            if not await drain(upstream.content):
                upstream.close()
        finally:
            upstream.release()
        self.metrics.refused.labels(ctx.upstream_label, refused).inc()
        log.debug("%s %s: attempt %d refused unprocessed (%s)", ctx.upstream, ctx.endpoint,
                  attempt + 1, refused)
        if refused == APP_RESET:
            detail = f"{ctx.endpoint}: its app's connection broke before an answer"
            _attempts(ctx).append(detail)
            return AttemptFailure(ErrorReason.UPSTREAM_RESET, 502, True, detail)
        detail = f"{ctx.endpoint} refused it before its app saw it ({refused})"
        _attempts(ctx).append(detail)
        return AttemptFailure(ErrorReason.UPSTREAM_REFUSED, 503, True, detail)

    async def _relay_response(
        self,
        exchange: Exchange,
        ctx: RequestContext,
        upstream: UpstreamResponse,
        sent: float,
        watchdog: Watchdog,
        head: tuple[CIMultiDict[str], dict[str, str]] | None = None,
    ) -> None:
        """Relay an answer; its outcome is the policy's once the body is through (as an
        HTTP/2 call's at its end), so that an answer the endpoint cuts mid-body is its
        failure, not a success counted at the head. The latency learned runs to the head."""
        status = upstream.status
        answered_at = self.clock()
        ok, code = status < 500, str(status)
        congestion: float | None = None
        shed = False
        try:
            headers, game = head if head is not None else self._answer_head(ctx, upstream)
            ctx.status = status
            ctx.game_response_headers = game
            congestion = self._congestion(ctx, game)
            # a refusal for load relayed as it came (the last attempt, or a body not kept)
            # is shed all the same: game holds only the signals that verified
            shed = _shed(status, game)
            if not ctx.long:  # it answers: only what is sent from now on can stall
                assert ctx.group is not None and ctx.endpoint is not None
                ctx.group.policy.on_answer(ctx.endpoint, answered_at)
            self.phases.response_filter(ctx, headers)
            try:
                await relay_answer(exchange, upstream, headers,
                                   bodiless=must_be_empty(ctx.method, status),
                                   watchdog=watchdog, on_dropped=self._upstream_trailers_dropped)
            except RELAY_ERRORS as exc:  # a stall the watchdog cut among them (TimeoutError)
                watchdog.stop()
                charged = await self._relay_failed(exchange, ctx, upstream, exc)
                if charged is not None:
                    ok, code = False, charged
        finally:
            self._observe(ctx, ok, code, sent, answered_at - sent, self.clock(), congestion,
                          shed)
            upstream.release()

    def _upstream_trailers_dropped(self, names: list[str]) -> None:
        for name in names:  # the upstream chose the name: a label of a bounded set
            self.metrics.rejected_headers.labels(header_label(name),
                                                 HeaderDrop.IN_TRAILERS).inc()

    def _app_headers_dropped(self, names: Iterable[str]) -> None:
        for name in names:  # the app chose the name (head or trailers): likewise
            self.metrics.rejected_headers.labels(header_label(name), HeaderDrop.FROM_APP).inc()

    async def _relay_failed(self, exchange: Exchange, ctx: RequestContext,
                            upstream: UpstreamResponse, exc: BaseException) -> ErrorReason | None:
        """Close what a relay that failed mid-answer leaves; the reason to charge the
        endpoint with when it failed it (it broke off or stalled its answer), None when the
        app did (gone, or not reading)."""
        if exchange.client_gone():
            # the app's doing: the endpoint answered, nothing to charge it with
            reason = ErrorReason.APP_HUNG_UP
            ctx.error_reason = reason
            self.metrics.errors.labels(ctx.upstream_label, reason).inc()
            log.debug("%s %s: the app hung up mid-body: %r", ctx.upstream, ctx.endpoint, exc)
            if not await drain(upstream.content):
                upstream.close()
            return None
        if exchange.head_unsent():
            # Nothing of the answer has reached the app (its head waits to share a write
            # with the first chunk): the app can still be told, by an error answer in place
            # of the endpoint's, instead of a cut connection (a stranger's finding).
            upstream.close()
            stalled = isinstance(exc, TimeoutError)
            reason = ErrorReason.UPSTREAM_TIMEOUT if stalled \
                else ErrorReason.UPSTREAM_PROTOCOL_ERROR
            detail = (f"{ctx.endpoint} sent its answer's head, then " +
                      ("nothing more within the request timeout" if stalled
                       else f"a body that could not be read ({shown(repr(exc))})"))
            await exchange.answer(self._error(ctx, 504 if stalled else 502, reason, detail))
            self._notices.notice((ctx.upstream, ctx.endpoint, reason),
                                 f"{ctx.upstream}: {detail}")
            return reason
        # The head is out: the only honest signal left is to cut the connection (the app
        # sees a truncated body, never a silently short one).
        if isinstance(exc, TimeoutError) and reader_stalled(exchange):
            # the app stopped reading: its doing (the answer it had was the endpoint's)
            ctx.error_reason = ErrorReason.APP_STALLED
            self.metrics.errors.labels(ctx.upstream_label, ErrorReason.APP_STALLED).inc()
            upstream.close()
            exchange.abort()
            log.debug("%s %s: the app stopped reading the answer", ctx.upstream, ctx.endpoint)
            return None
        reason = ErrorReason.BODY_RELAY_FAILED
        ctx.error_reason = reason
        self.metrics.errors.labels(ctx.upstream_label, reason).inc()
        upstream.close()
        exchange.abort()
        self._notices.notice((ctx.upstream, ctx.endpoint, reason),
                             f"{ctx.upstream} {ctx.endpoint}: body relay failed: {exc!r}")
        return reason

    # ------------------------------------------------------------ WebSocket

    async def _websocket(
        self, request: web.Request, ctx: RequestContext, base_headers: CIMultiDict[str]
    ) -> web.StreamResponse | Answer:
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
            if exc.headers is not None:  # its answer goes back as it came (not followed)
                answer, game = refused_upgrade_answer(exc.status, exc.headers, exc.body,
                                                      self.via)
                self._observe_head(ctx, exc.status, game, sent)
                return answer
            done = self.clock()  # a 101 with a wrong handshake
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
    ) -> Answer:
        ctx.status, ctx.error_reason = status, reason
        self.metrics.errors.labels(ctx.upstream_label, reason).inc()
        return json_answer(
            status,
            {
                "error": message,
                "reason": reason,
                "upstream": shown(ctx.upstream),
                "sidecar": self.sidecar_id,
            },
            {"Via": self.via},
        )

