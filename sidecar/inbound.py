"""The inbound listener: the sidecar in front of its own app, policing who gets in and when.

Owns the request path from the network to the local app (``--inbound HOST:PORT --app URL``):

1. **Identity.** ``X-GT-Identity`` is verified with the mesh key (:mod:`wire.identity`).
   A missing, malformed, forged or expired identity is never trusted: the caller is
   ``anonymous``, one shared bucket with the strictest treatment, and every other ``X-GT-*``
   header it sent (bid, retry mark) is ignored. Without a mesh key nobody can be verified,
   so every caller is anonymous (a warning is logged at start).
2. **Bid.** A trusted caller's ``X-GT-Bid`` is parsed (:func:`wire.bid.parse_bid`);
   a malformed bid is answered 400 with a JSON reason and counted.
3. **Reputation** (:meth:`mesh.admission.AdmissionGate.police`). The caller's request is
   judged against the cooperative norm; a punished caller beyond its throttled share gets
   429 + ``Retry-After`` (and its requests queued in good standing leave the queue with 429).
4. **Congestion and auction** (:meth:`mesh.admission.AdmissionGate.offer`). A request that
   finds a free slot under the adaptive concurrency limit, with nobody waiting, goes straight
   to the app at price 0; otherwise it waits in the bid queue (a request that takes its caller
   over its fair share of the congested app bids 0: priority is bought only within the norm),
   the highest bids are admitted as slots free and pay the highest losing bid (second price);
   a request that waits longer than ``max_wait`` (or is pushed out of a full queue) gets 503.
   The rules are :mod:`mesh.admission`'s; here each waiter is a future that the gate's
   decisions answer.
5. **Forwarding** with the outbound side's HTTP rules (:mod:`sidecar.forward`): hop-by-hop
   headers removed, ``Via`` and ``X-Forwarded-For`` appended, bodies streamed both ways, every
   ``X-GT-*`` header stripped before the app sees the request (and from the app's response).
   A WebSocket upgrade is policed at its handshake, then bridged (it holds no slot).
6. **Signals back.** Every response carries ``X-GT-Congestion`` and ``X-GT-Reputation``;
   admitted responses carry ``X-GT-Price``.

The game logic is :mod:`mesh`'s; this module measures, carries decisions out, and counts.
:meth:`InboundProxy.snapshot` gathers the mesh objects' own snapshots for the admin
``/debug/state`` (rendered by :func:`sidecar.admin.inbound_json`).
The modes ``token-bucket`` (one Envoy-style local rate limit for all callers, 429 when empty)
and ``off`` (a plain reverse proxy) exist as baselines for the benchmark and send no game
headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from mesh.admission import AdmissionGate, Admit, Pass, Queue, Reject, RejectReason, Woken
from mesh.auction import AuctionSnapshot, SecondPriceAuction
from mesh.concurrency import AdaptiveConcurrencyLimit, ConcurrencySnapshot
from mesh.reputation import ANONYMOUS, BookSnapshot, Decision, Phase, ReputationBook
from sidecar.errors import ErrorReason, HeaderDrop
from sidecar.forward import (
    append_header,
    end_to_end,
    must_be_empty,
    relay_chunks,
    request_headers_to_upstream,
    strip_game_headers,
)
from sidecar.metrics import InboundMetrics, ProbeAnswerMetrics
from sidecar.policing_config import PolicingSettings
from sidecar.probe_answer import ProbeResponder, is_probe
from sidecar.transport import (
    BODY_READ_ERRORS,
    AiohttpTransport,
    HandshakeRefused,
    Transport,
    TransportError,
    UpstreamRequest,
    WebSocketDialer,
    classify,
)
from sidecar.websocket import accept_like, is_websocket, relay_websocket
from wire.bid import format_price, parse_bid
from wire.errors import Reason, WireError
from wire.headers import (
    BID,
    CONGESTION,
    IDENTITY,
    PRICE,
    REPUTATION,
    RETRY,
    format_congestion,
    is_gt_header,
    parse_retry,
)
from wire.identity import IdentityRejection, verify_identity
from wire.standing import format_standing

log = logging.getLogger(__name__)

OTHER = "other"
GAUGE_REFRESH_INTERVAL = 0.5
TRUSTED = "trusted"
"""The identity check's result for a verified caller (``equilibrium_inbound_identity{result}``;
any other result is the :class:`wire.errors.Reason` it was not trusted for)."""


class InboundOutcome(StrEnum):
    """What happened to a request at the inbound listener: the ``outcome`` label of
    ``equilibrium_inbound_requests`` (docs/operations.md, "Error reasons")."""

    ADMITTED = "admitted"
    """Forwarded to the app, and its answer relayed."""
    THROTTLED = "throttled"
    """429: the caller is punished (:attr:`mesh.admission.RejectReason.PUNISHED`)."""
    RATE_LIMITED = "rate-limited"
    """429: the ``token-bucket`` baseline's bucket was empty."""
    BAD_BID = "bad-bid"
    """400: a trusted caller's malformed ``X-GT-Bid``."""
    QUEUE_FULL = "queue-full"
    """503: no slot, and the bid queue is full of higher bids."""
    QUEUE_TIMEOUT = "queue-timeout"
    """503: no slot within ``max_wait``."""
    BAD_TARGET = "bad-target"
    """400: the request target is not origin-form (``/path``), e.g. ``http://host/path``."""
    APP_ERROR = "app-error"
    """The app did not answer (or refused a WebSocket upgrade): 502/504."""


class CallerLabels:
    """Bounded metric labels for callers: the first ``limit`` verified callers keep their own
    label for the life of the process, ``anonymous`` always has one, the rest share ``other``.

    Prometheus keeps every label value forever, so an attacker who could mint caller names
    must not be able to grow the metrics without bound (names come only from verified
    identities, but the cap holds even for a mesh with many callers).
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._known: set[str] = set()

    def of(self, caller: str) -> str:
        if caller == ANONYMOUS or caller in self._known:
            return caller
        if len(self._known) < self.limit:
            self._known.add(caller)
            return caller
        return OTHER

    def __contains__(self, caller: object) -> bool:
        return caller in self._known or caller == ANONYMOUS


class LocalRateLimit:
    """The baseline: one token bucket for all callers, as Envoy's local rate limit filter
    (``max_tokens`` = ``burst``, refilled at ``rate`` per second). Pure; ``now`` is passed."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if not (rate > 0 and burst >= 1):
            raise ValueError("need rate > 0 and burst >= 1")
        self.rate, self.burst = rate, burst
        self._tokens, self._at = burst, now

    def try_take(self, now: float) -> bool:
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


_STATUS = {RejectReason.PUNISHED: 429}  # the rest 503
_OUTCOME = {RejectReason.PUNISHED: InboundOutcome.THROTTLED,
            RejectReason.QUEUE_FULL: InboundOutcome.QUEUE_FULL,
            RejectReason.QUEUE_TIMEOUT: InboundOutcome.QUEUE_TIMEOUT}  # shutting-down: not counted


@dataclass(frozen=True, slots=True)
class InboundSnapshot:
    """The inbound side at one instant, for ``/debug/state``.

    ``now`` is the policing clock (monotonic) and ``wall_time`` the wall clock at the same
    instant, so :meth:`wall` turns a policing time (a punishment's end) into a date.
    ``in_flight`` and ``congestion`` are what the listener reports (``congestion`` is 1 while
    anyone waits in the bid queue); ``concurrency`` is the limiter's own view.
    """

    mode: str
    app: str
    mesh_key: bool
    now: float
    wall_time: float
    in_flight: int
    congestion: float
    capacity: float
    book: BookSnapshot
    concurrency: ConcurrencySnapshot
    auction: AuctionSnapshot

    def wall(self, at: float) -> float:
        """The wall-clock time (Unix seconds) of policing time ``at``."""
        return self.wall_time + (at - self.now)


@dataclass(slots=True)
class _Verdict:
    """What policing decided for one request, for the response headers."""

    caller: str
    label: str
    decision: Decision | None = None
    price: float | None = None


class InboundProxy:
    """The aiohttp handler of the inbound listener; one instance per sidecar process.

    ``transport``: how requests reach the app (default: an :class:`AiohttpTransport` opened
    and closed with the listener's app; a transport passed in is the caller's to open and
    close). WebSocket upgrades need a transport that is a ``WebSocketDialer``.
    """

    def __init__(
        self,
        *,
        sidecar_id: str,
        app_url: str,
        settings: PolicingSettings,
        metrics: InboundMetrics,
        mesh_key: bytes | None,
        request_timeout: float = 15.0,
        connect_timeout: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        transport: Transport | None = None,
    ) -> None:
        self.sidecar_id = sidecar_id
        self.app_url = app_url.rstrip("/")
        self.settings = settings
        self.mesh_key = mesh_key
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.clock = clock
        self.wall_clock = wall_clock
        self._own_transport: AiohttpTransport | None = None
        if transport is None:
            transport = self._own_transport = AiohttpTransport(connect_timeout=connect_timeout)
        self.transport = transport
        self._dialer = transport if isinstance(transport, WebSocketDialer) else None
        self.via = f"1.1 {sidecar_id}"
        self.metrics = metrics
        self.metrics.mesh_key.set(1 if mesh_key else 0)
        self.labels = CallerLabels(settings.max_caller_labels)
        now = clock()
        self.gate = AdmissionGate(
            book=ReputationBook(settings.reputation),
            limiter=AdaptiveConcurrencyLimit(settings.concurrency),
            auction=SecondPriceAuction(settings.auction),
            max_wait=settings.max_wait, capacity=settings.capacity,
        )
        self.book, self.limiter, self.auction = self.gate.book, self.gate.limiter, self.gate.auction
        self.bucket = LocalRateLimit(settings.token_bucket_rate, settings.token_bucket_burst, now)
        self._waiting: dict[str, asyncio.Future[Woken]] = {}  # request id -> its waiter
        self._shown: set[str] = set()  # callers with per-caller gauges right now
        self.in_flight = 0
        self.probes = ProbeResponder(  # answers probes itself (sidecar.probe_answer)
            self, mesh_key=mesh_key, metrics=ProbeAnswerMetrics(metrics.registry),
            max_skew=settings.identity_max_skew, clock=clock, wall_clock=wall_clock)

    @property
    def game(self) -> bool:
        """Whether the game is played (mode equilibrium) rather than a baseline."""
        return self.settings.mode == "equilibrium"

    # ------------------------------------------------------------ lifecycle

    def make_app(self) -> web.Application:
        app = web.Application(handler_args={"max_field_size": 16384}, client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._close)
        return app

    async def _start(self, _: web.Application) -> None:
        if self._own_transport is not None:
            await self._own_transport.start()

    async def _close(self, _: web.Application) -> None:
        self._deliver(self.gate.close(self.clock()))
        if self._own_transport is not None:
            await self._own_transport.close()

    async def refresh_gauges(self) -> None:
        """Background task: per-caller standing and load gauges, off the request path."""
        while True:
            self.update_gauges(self.clock())
            await asyncio.sleep(GAUGE_REFRESH_INTERVAL)

    def update_gauges(self, now: float) -> None:
        """Per-caller gauges from the book; callers it no longer tracks lose their series."""
        m = self.metrics
        worst_rep, worst_level, others, punished = 1.0, 0, False, 0
        shown: set[str] = set()
        for standing in self.book.standings(now):
            punished += standing.phase is Phase.PUNISHED
            if standing.caller in self.labels:
                shown.add(standing.caller)
                m.reputation.labels(standing.caller).set(round(standing.reputation, 4))
                m.level.labels(standing.caller).set(standing.level)
            else:
                others = True
                worst_rep = min(worst_rep, standing.reputation)
                worst_level = max(worst_level, standing.level)
        if others:
            shown.add(OTHER)
            m.reputation.labels(OTHER).set(round(worst_rep, 4))
            m.level.labels(OTHER).set(worst_level)
        for gone in self._shown - shown:
            for gauge in (m.reputation, m.level):
                with contextlib.suppress(KeyError):
                    gauge.remove(gone)
        self._shown = shown
        m.punished.set(punished)
        self._load_gauges()

    def _load_gauges(self) -> None:
        m = self.metrics
        m.queue_length.set(self.auction.queue_length)
        m.limit.set(self.limiter.limit)
        m.in_flight.set(self.in_flight)
        m.congestion.set(self._congestion())
        m.capacity.set(self.capacity())

    def snapshot(self) -> InboundSnapshot:
        """The state behind ``/debug/state``: the busiest callers (``debug_callers`` of
        them, plus ``anonymous``) with their standing and budget, the limiter, the last
        clearing price. Reads only; the request path is not involved."""
        now = self.clock()
        book = self.book.snapshot(now, self.settings.debug_callers)
        return InboundSnapshot(
            mode=self.settings.mode, app=self.app_url, mesh_key=self.mesh_key is not None,
            now=now, wall_time=self.wall_clock(), in_flight=self.in_flight,
            congestion=self._congestion(), capacity=self.capacity(), book=book,
            concurrency=self.limiter.snapshot(),
            auction=self.auction.snapshot(now, (s.caller for s in book.callers)),
        )

    # ------------------------------------------------------------ load

    def capacity(self) -> float:
        """App capacity in requests/s for fair shares (:meth:`AdmissionGate.capacity`)."""
        return self.gate.capacity()

    def _congestion(self) -> float:
        """``in_flight / limit``, and 1 while anyone waits in the bid queue."""
        return self.gate.congestion()

    def probe_load(self) -> tuple[float, int]:
        """(congestion level, concurrency limit) for a probe answer."""
        return self._congestion(), self.limiter.limit

    # ------------------------------------------------------------ request path

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if is_probe(request):  # answered here, never forwarded to the app
            return self.probes.answer(request)
        now = self.clock()
        caller, trusted = self._identify(request)
        verdict = _Verdict(caller, self.labels.of(caller))
        if not request.raw_path.startswith("/"):  # the app is a server, not a proxy
            self.metrics.requests.labels(verdict.label, InboundOutcome.BAD_TARGET).inc()
            return self._answer(verdict, 400, ErrorReason.BAD_TARGET,
                                "the request target must be a path starting with '/' "
                                f"(got {request.raw_path[:64]!r})", {})
        if not self.game:
            return await self._baseline(request, verdict, now)
        bid, is_retry = 0.0, False
        if trusted:
            try:
                bid = parse_bid(request.headers.get(BID))
            except WireError as exc:
                self.metrics.bad_bids.labels(exc.reason).inc()
                self.metrics.requests.labels(verdict.label, InboundOutcome.BAD_BID).inc()
                return self._answer(verdict, 400, ErrorReason.BAD_BID, str(exc), {"header": BID})
            is_retry = self._is_retry(request)
        policed = self.gate.police(caller, bid, now, is_retry=is_retry)
        self._deliver(policed.woken)
        verdict.decision = policed.decision
        if isinstance(policed, Reject):
            return self._refuse(verdict, policed)
        if is_websocket(request):  # long-lived: policed at the handshake, holds no slot
            return await self._websocket(request, verdict)
        if policed.voided:
            self.metrics.voided_bids.inc()
        admission = await self._admit(verdict, policed, now)
        if isinstance(admission, web.StreamResponse):
            return admission
        verdict.price = admission.price
        self.metrics.price.set(admission.price)
        if admission.price > 0:
            self.metrics.paid.labels(verdict.label).inc(admission.price)
        self.metrics.wait.observe(admission.waited)
        return await self._forward(request, verdict, tracked=True)

    def _identify(self, request: web.Request) -> tuple[str, bool]:
        header = request.headers.get(IDENTITY)
        if self.mesh_key is None:
            self.metrics.identity.labels(Reason.NO_KEY if header else Reason.MISSING).inc()
            trusted = False
        else:
            checked = verify_identity(header, self.mesh_key, self.wall_clock(),
                                      self.settings.identity_max_skew)
            if isinstance(checked, IdentityRejection):
                self.metrics.identity.labels(checked.reason).inc()
                trusted = False
            else:
                self.metrics.identity.labels(TRUSTED).inc()
                return checked.caller, True
        ignored = sum(1 for name in request.headers if is_gt_header(name)
                      and name.lower() != IDENTITY.lower())
        if ignored:
            self.metrics.stripped.labels(HeaderDrop.UNTRUSTED).inc(ignored)
        return ANONYMOUS, trusted

    def _is_retry(self, request: web.Request) -> bool:
        raw = request.headers.get(RETRY)
        if raw is None:
            return False
        try:
            parse_retry(raw)
        except WireError:
            self.metrics.bad_headers.labels(RETRY.lower()).inc()
            return True  # a malformed mark is still a mark: never cheaper than a valid one
        return True

    async def _admit(
        self, verdict: _Verdict, policed: Pass, now: float
    ) -> Admit | web.StreamResponse:
        """A slot now, or a place in the bid queue until one frees up
        (:meth:`AdmissionGate.offer`); a waiter's future is answered by whichever step of the
        gate frees a slot for it or sends it away."""
        offered = self.gate.offer(policed, now)
        self._deliver(offered.woken)
        if isinstance(offered, Admit):
            return offered
        if isinstance(offered, Reject):
            return self._refuse(verdict, offered)
        future: asyncio.Future[Woken] = asyncio.get_running_loop().create_future()
        self._waiting[offered.request_id] = future
        self.metrics.queue_length.set(self.gate.queue_length)
        try:
            await asyncio.wait({future}, timeout=self.gate.max_wait)
        except asyncio.CancelledError:  # the client went away while waiting
            self._leave(offered, future)
            raise
        if not future.done():
            self._waiting.pop(offered.request_id, None)
            return self._refuse(verdict, self.gate.time_out(offered, self.clock()))
        result = future.result()
        if isinstance(result, Admit):
            return result
        if result.reason is RejectReason.PUNISHED:
            verdict.decision = None  # report the standing as it is now (punished)
        return self._refuse(verdict, result)

    def _deliver(self, woken: tuple[Woken, ...]) -> None:
        """Hand waiters what the gate decided for them."""
        for outcome in woken:
            future = self._waiting.pop(outcome.request_id or "", None)
            if future is not None and not future.done():
                future.set_result(outcome)
            elif isinstance(outcome, Admit):  # its client is gone: the slot is free again
                self._deliver(self.gate.finish(self.clock()))

    def _leave(self, queued: Queue, future: asyncio.Future[Woken]) -> None:
        """A waiter's client went away: its place in the queue, or the slot it was just
        given, goes back to the gate."""
        now = self.clock()
        self._waiting.pop(queued.request_id, None)
        if future.done() and not future.cancelled() and isinstance(future.result(), Admit):
            self._deliver(self.gate.finish(now))  # admitted just now: give the slot back
        else:
            self.gate.withdraw(queued.request_id, now)
            future.cancel()

    async def _baseline(
        self, request: web.Request, verdict: _Verdict, now: float
    ) -> web.StreamResponse:
        if self.settings.mode == "token-bucket" and not self.bucket.try_take(now):
            self.metrics.requests.labels(verdict.label, InboundOutcome.RATE_LIMITED).inc()
            return self._answer(verdict, 429, ErrorReason.LOCAL_RATE_LIMITED,
                                "local rate limit exceeded", {}, {"X-RateLimit-Limit":
                                f"{self.settings.token_bucket_rate:g}"})
        return await self._forward(request, verdict, tracked=False)

    # ------------------------------------------------------------ forwarding

    async def _forward(
        self, request: web.Request, verdict: _Verdict, *, tracked: bool
    ) -> web.StreamResponse:
        """Send to the app and stream its answer back; ``tracked`` holds a limiter slot."""
        headers, _ = request_headers_to_upstream(
            request.headers, client_ip=request.remote, proto=request.scheme, via=self.via
        )
        headers.popall("Expect", None)
        body = relay_chunks(request.content, self.request_timeout) if request.body_exists else None
        started = self.clock()
        finished_ok = False
        self.in_flight += 1
        try:
            try:
                async with asyncio.timeout(self.request_timeout):
                    upstream = await self.transport.handle_request(UpstreamRequest(
                        request.method, URL(self.app_url + request.raw_path, encoded=True),
                        headers, body,
                    ))
            except (TransportError, TimeoutError) as exc:
                failure = classify(exc)
                self.metrics.requests.labels(verdict.label, InboundOutcome.APP_ERROR).inc()
                log.info("app %s: %s", self.app_url, failure.detail)
                return self._answer(verdict, failure.status, failure.reason,
                                    f"the app did not answer: {failure.detail}", {})
            try:
                out = end_to_end(upstream.headers)
                if strip_game_headers(out):
                    self.metrics.stripped.labels(HeaderDrop.FROM_APP).inc()
                append_header(out, "Via", self.via)
                self._signal_headers(out, verdict)
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                              headers=out)
                await response.prepare(request)
                if not must_be_empty(request.method, upstream.status):
                    try:
                        async for chunk in relay_chunks(upstream.content, self.request_timeout):
                            await response.write(chunk)
                    except BODY_READ_ERRORS as exc:
                        upstream.close()
                        raise ConnectionResetError(f"app body failed: {exc!r}") from exc
                await response.write_eof()
                finished_ok = True
                self.metrics.requests.labels(verdict.label, InboundOutcome.ADMITTED).inc()
                return response
            finally:
                upstream.release()
        finally:
            self.in_flight -= 1
            now = self.clock()
            if tracked:  # the slot goes back to the gate (with the RTT if it finished)
                self._deliver(self.gate.finish(now, now - started if finished_ok else None))
            if finished_ok:
                self.metrics.app_latency.observe(now - started)
                self.probes.record(now, now - started)

    async def _websocket(self, request: web.Request, verdict: _Verdict) -> web.StreamResponse:
        """Bridge a WebSocket to the app (frames both ways until either side closes)."""
        if self._dialer is None:
            return self._answer(verdict, 501, ErrorReason.WEBSOCKET_NOT_SUPPORTED,
                                "this sidecar's transport cannot carry WebSockets", {})
        headers, _ = request_headers_to_upstream(  # handshake headers: the dialer drops them
            request.headers, client_ip=request.remote, proto=request.scheme, via=self.via)
        try:
            async with asyncio.timeout(self.request_timeout):
                upstream = await self._dialer.open_websocket(UpstreamRequest(
                    request.method, URL(self.app_url + request.raw_path, encoded=True), headers))
        except HandshakeRefused as exc:
            self.metrics.requests.labels(verdict.label, InboundOutcome.APP_ERROR).inc()
            return self._answer(verdict, 502, ErrorReason.WEBSOCKET_HANDSHAKE_FAILED,
                                f"the app refused the upgrade with {exc.status}", {})
        except (TransportError, TimeoutError) as exc:
            failure = classify(exc)
            self.metrics.requests.labels(verdict.label, InboundOutcome.APP_ERROR).inc()
            return self._answer(verdict, failure.status, failure.reason, failure.detail, {})
        downstream = accept_like(upstream)
        self._signal_headers(downstream.headers, verdict)
        self.metrics.requests.labels(verdict.label, InboundOutcome.ADMITTED).inc()
        return await relay_websocket(request, downstream, upstream)

    # ------------------------------------------------------------ answers

    def _signal_headers(self, headers: CIMultiDict[str], verdict: _Verdict) -> None:
        if not self.game:
            return
        limiter = self.limiter
        headers[CONGESTION] = format_congestion(self._congestion(), limiter.limit,
                                                limiter.in_flight)
        decision = verdict.decision
        if decision is not None:
            headers[REPUTATION] = format_standing(decision.reputation, decision.level,
                                                  decision.phase, decision.retry_after)
        else:  # answered before policing (bad bid): the standing as it is
            now = self.clock()
            standing = self.book.standing(verdict.caller, now)
            headers[REPUTATION] = (
                format_standing(standing.reputation, standing.level, standing.phase,
                                standing.punished_for)
                if standing is not None else format_standing(1.0, 0, Phase.GOOD, None)
            )
        if verdict.price is not None:
            headers[PRICE] = format_price(verdict.price)

    def _refuse(self, verdict: _Verdict, refused: Reject) -> web.Response:
        """The answer to a request the gate sent away (429 punished, else 503)."""
        outcome = _OUTCOME.get(refused.reason)
        if outcome is not None:
            self.metrics.requests.labels(verdict.label, outcome).inc()
        return self._answer(verdict, _STATUS.get(refused.reason, 503), refused.reason,
                            self._refusal_message(verdict, refused), {},
                            {"Retry-After": str(refused.retry_after)})

    def _refusal_message(self, verdict: _Verdict, refused: Reject) -> str:
        caller = verdict.caller
        match refused.reason, refused.queued:
            case RejectReason.PUNISHED, False:
                level = refused.decision.level if refused.decision is not None else 0
                return (f"caller {caller!r} is punished (level {level}) for exceeding its fair "
                        "share or retry budget; back off")
            case RejectReason.PUNISHED, True:
                return f"caller {caller!r} was punished while this request waited; back off"
            case RejectReason.QUEUE_FULL, False:
                return "the app is overloaded and the queue is full of higher bids"
            case RejectReason.QUEUE_FULL, True:
                return "pushed out of a full queue by a higher bid"
            case RejectReason.QUEUE_TIMEOUT, _:
                return (f"no slot at the app within {self.gate.max_wait:g} s "
                        "(overloaded; a higher bid is served first)")
        return "the sidecar is shutting down"

    def _answer(
        self,
        verdict: _Verdict,
        status: int,
        reason: ErrorReason | RejectReason,
        message: str,
        extra: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        out: CIMultiDict[str] = CIMultiDict(headers or {})
        out["Via"] = self.via
        self._signal_headers(out, verdict)
        body = {"error": message, "reason": reason, "caller": verdict.caller,
                "sidecar": self.sidecar_id, **extra}
        return web.json_response(body, status=status, headers=out)
