"""The inbound listener: the sidecar in front of its own app, policing who gets in and when.

Owns the request path from the network to the local app (``--inbound HOST:PORT --app URL``):

1. **Identity.** ``X-GT-Identity`` is verified with the mesh key (:mod:`wire.identity`)
   against the request it arrived on (method, ``Host``, target), and its nonce may be used
   once (:class:`wire.nonces.NonceBook`; a second use is ``replayed``).
   A missing, malformed, forged, expired or replayed identity is never trusted: the caller is
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
   A request with a body asks for a slot only once its body has arrived (:mod:`sidecar.upload`:
   buffered up to ``upload_buffer`` bytes, all of it within ``upload_timeout``, else 408), so
   a slow upload holds no slot; a late or abandoned upload counts against its caller.
   The rules are :mod:`mesh.admission`'s; here each waiter is a future that the gate's
   decisions answer.
5. **Forwarding** with the outbound side's HTTP rules (:mod:`sidecar.forward`): hop-by-hop
   headers removed, ``Via`` and ``X-Forwarded-For`` appended, bodies streamed both ways with
   a chunked body's trailer fields, every ``X-GT-*`` header stripped before the app sees the
   request (and from the app's response, its trailers included).
   A WebSocket upgrade is policed at its handshake, then bridged (it holds no slot, but a
   caller may hold at most ``websocket_max_per_caller`` open, and messages are bounded by
   ``websocket_max_message``: :mod:`sidecar.websocket`).
6. **Signals back.** Every response carries ``X-GT-Congestion`` and ``X-GT-Reputation``;
   admitted responses carry ``X-GT-Price``; with a mesh key and the caller's
   ``X-GT-Challenge``, ``X-GT-Signals`` signs them (:mod:`wire.signals`), so the caller's
   sidecar can tell them from a forgery.

The game logic is :mod:`mesh`'s; steps 1-4 and 6 are :mod:`sidecar.inbound_policing`'s
(shared with the HTTP/2 streams of the same port, :mod:`sidecar.h2_inbound`); this module
carries the decisions out for HTTP/1.1 and forwards.
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
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from mesh.admission import Woken
from mesh.auction import AuctionSnapshot
from mesh.concurrency import ConcurrencySnapshot
from mesh.reputation import BookSnapshot
from sidecar.errors import UNREACHED, ErrorReason, HeaderDrop
from sidecar.exchange import (
    AiohttpExchange,
    Answer,
    Exchange,
    ReceivedBody,
    body_failed,
    json_answer,
    web_response,
)
from sidecar.forward import (
    must_be_empty,
    reader_stalled,
    relay_answer,
    relayable_trailers,
    request_headers_to_upstream,
    response_headers_from_wire,
    response_headers_to_app,
)
from sidecar.http1.client import H1Transport
from sidecar.http1.server import H1Exchange
from sidecar.inbound_policing import (
    OTHER,
    InboundOutcome,
    InboundPolicing,
    Refusal,
    Verdict,
    app_unreachable,
)
from sidecar.metrics import InboundMetrics, ProbeAnswerMetrics
from sidecar.notice_log import NoticeLog
from sidecar.policing_config import PolicingSettings
from sidecar.probe_answer import ProbeResponder, is_probe
from sidecar.transport import (
    BODY_READ_ERRORS,
    HandshakeRefused,
    Transport,
    TransportError,
    UpstreamRequest,
    UpstreamResponse,
    WebSocketDialer,
    classify,
)
from sidecar.upload import (
    UploadDeadline,
    UploadFailed,
    UploadFailure,
    UploadMemory,
    receive_upload,
    release,
    upload_rest,
)
from sidecar.watchdog import Watchdog
from sidecar.websocket import (
    accept_like,
    is_websocket,
    oversized_counter,
    refused_upgrade_answer,
    relay_websocket,
)
from wire.headers import APP_RESET
from wire.identity import BoundRequest

log = logging.getLogger(__name__)

APP_NOTICE_INTERVAL = 10.0
"""Seconds between two log lines about the same kind of app failure (the rest are counted
in the next line; every one in ``equilibrium_inbound_requests{outcome="app-error"}``)."""

GAUGE_REFRESH_INTERVAL = 0.5


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
    long_paths: tuple[str, ...] = ()  # the declared long requests (policing.long_paths)

    def wall(self, at: float) -> float:
        """The wall-clock time (Unix seconds) of policing time ``at``."""
        return self.wall_time + (at - self.now)


class InboundProxy:
    """The inbound listener's request path; one instance per sidecar process.

    :meth:`serve` takes an :class:`Exchange`: the sidecar's own HTTP/1.1 server hands it
    every request (:mod:`sidecar.http1.server`); :meth:`handle` is aiohttp's handler for what
    that server hands over (WebSocket upgrades) and for in-process use (:meth:`make_app`).

    ``transport``: how requests reach the app (default: an :class:`H1Transport` opened
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
        self._notices = NoticeLog(log, clock, APP_NOTICE_INTERVAL,
                                  level=logging.WARNING)
        self._parked_seen = 0  # the gate's parked_total already in the metric
        self._own_transport: H1Transport | None = None
        if transport is None:
            transport = self._own_transport = H1Transport(connect_timeout=connect_timeout)
            transport.websocket_max_message = settings.websocket_max_message
        self.transport = transport
        self._dialer = transport if isinstance(transport, WebSocketDialer) else None
        self.via = f"1.1 {sidecar_id}"
        self.metrics = metrics
        self.metrics.mesh_key.set(1 if mesh_key else 0)
        # the decisions both protocols share (sidecar.h2_inbound serves HTTP/2 with it)
        self.policing = InboundPolicing(settings=settings, metrics=metrics, mesh_key=mesh_key,
                                        clock=clock, wall_clock=wall_clock)
        self.labels, self.gate = self.policing.labels, self.policing.gate
        self.book, self.limiter, self.auction = self.gate.book, self.gate.limiter, self.gate.auction
        self.bucket = self.policing.bucket
        self.upload_memory = UploadMemory(settings.upload_memory)
        self._shown: set[str] = set()  # callers with per-caller gauges right now
        self._websockets: dict[str, int] = {}  # caller -> long-lived exchanges open
        self._oversized = oversized_counter(metrics.registry, "inbound")
        self.probes = ProbeResponder(  # answers probes itself (sidecar.probe_answer)
            self, mesh_key=mesh_key, metrics=ProbeAnswerMetrics(metrics.registry),
            max_skew=settings.identity_max_skew, clock=clock, wall_clock=wall_clock,
            nonces=self.policing.nonces)

    @property
    def in_flight(self) -> int:
        """Requests at the app through this listener, both protocols."""
        return self.policing.in_flight

    @in_flight.setter
    def in_flight(self, value: int) -> None:
        self.policing.in_flight = value

    @property
    def game(self) -> bool:
        """Whether the game is played (mode equilibrium) rather than a baseline."""
        return self.policing.game

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
        self.policing.close()
        if self._own_transport is not None:
            await self._own_transport.close()

    async def refresh_gauges(self) -> None:
        """Background task: per-caller standing and load gauges, off the request path."""
        while True:
            self.update_gauges(self.clock())
            await asyncio.sleep(GAUGE_REFRESH_INTERVAL)

    def update_gauges(self, now: float) -> None:
        """Per-caller gauges from the book; callers it no longer tracks lose their series.
        O(callers changed since the last tick + labelled callers), not O(tracked callers)
        (:meth:`mesh.reputation.ReputationBook.gauge_digest`)."""
        m = self.metrics
        digest = self.book.gauge_digest(now, self.labels.names())
        shown: set[str] = set()
        for standing in digest.named:
            shown.add(standing.caller)
            m.reputation.labels(standing.caller).set(round(standing.reputation, 4))
            m.level.labels(standing.caller).set(standing.level)
        punished = digest.punished
        if digest.others:
            shown.add(OTHER)
            m.reputation.labels(OTHER).set(round(min(1.0, digest.others_worst_reputation), 4))
            m.level.labels(OTHER).set(digest.others_worst_level)
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
        m.long_running.set(self.gate.long_running)
        parked = self.gate.parked_total
        if parked > self._parked_seen:
            m.parked.inc(parked - self._parked_seen)
            self._parked_seen = parked
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
            long_paths=self.settings.long_paths,
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
        """aiohttp's handler: :meth:`serve` over an aiohttp request (the WebSocket upgrades
        the HTTP/1.1 server hands over)."""
        exchange = AiohttpExchange(request)
        await self.serve(exchange)
        return exchange.response if exchange.response is not None else web.Response(status=502)

    async def serve(self, exchange: Exchange) -> None:
        """Police, admit, forward and answer one HTTP/1.1 request (the module docstring)."""
        if is_probe(exchange):  # answered here, never forwarded to the app
            await exchange.answer(self.probes.answer(exchange))
            return
        now = self.clock()
        bound = BoundRequest(exchange.method, exchange.headers.get("Host", ""),
                             exchange.raw_path)
        verdict, policed = self.policing.police(exchange.headers, bound, now,
                                                exchange.local_ip())
        if isinstance(policed, Refusal):
            await exchange.answer(self._reply(verdict, policed))
            return
        if policed is None:  # a baseline mode: no slot
            await self._forward(exchange, verdict, tracked=False)
            return
        if isinstance(exchange, AiohttpExchange) and is_websocket(exchange.request):
            # long-lived: policed at the handshake, holds no slot
            exchange.response = await self._websocket(exchange.request, verdict)
            return
        body: AsyncIterable[bytes] | None = None
        deadline: UploadDeadline | None = None
        if exchange.body_exists:  # the body first: its upload time holds no slot
            deadline = UploadDeadline(asyncio.get_running_loop().time()
                                      + self.settings.upload_timeout)
            try:
                upload = await receive_upload(exchange.content, deadline,
                                              self.settings.upload_buffer, self.upload_memory)
            except UploadFailed as exc:
                release(deadline, self.upload_memory)
                await self._upload_failed(exchange, verdict, exc.failure)
                return
            body = upload_rest(upload, exchange.content, deadline)
        try:
            h1 = exchange if isinstance(exchange, H1Exchange) else None
            if h1 is not None:  # a reset while queued leaves the queue at once (policing)
                h1.hangup_cancels = True
            try:
                policing = self.policing
                admission = await policing.admit(
                    verdict, policed, now, long=policing.declares_long and policing.declared_long(
                        exchange.method, exchange.raw_path, exchange.headers.get("Accept")))
            except asyncio.CancelledError:
                if h1 is not None and h1.hung_up:  # the caller's reset, not a drain
                    self.metrics.requests.labels(verdict.label,
                                                 InboundOutcome.CALLER_HUNG_UP).inc()
                raise
            finally:
                if h1 is not None:  # admitted: the request runs on, its slot held, until
                    h1.hangup_cancels = None  # the app is done (the listener's rule)
            if isinstance(admission, Refusal):
                await exchange.answer(self._reply(verdict, admission))
                return
            gone = exchange.client_gone()
            if gone or body_failed(exchange):
                # the caller left while queued, or its body broke its framing there: the
                # slot goes back before the app sees anything
                self._deliver(self.gate.finish(self.clock(), slot=admission.slot))
                if gone:
                    self.metrics.requests.labels(verdict.label,
                                                 InboundOutcome.CALLER_HUNG_UP).inc()
                else:
                    await self._upload_failed(exchange, verdict, UploadFailure.ABANDONED)
                return
            await self._forward(exchange, verdict, tracked=True, body=body, upload=deadline,
                                slot=admission.slot)
        finally:
            release(deadline, self.upload_memory)

    def _deliver(self, woken: tuple[Woken, ...]) -> None:
        """Hand waiters what the gate decided for them."""
        self.policing.deliver(woken)

    def app_failed_notice(self, reason: str, detail: str) -> None:
        """Log an app failure, at most once per :data:`APP_NOTICE_INTERVAL` for each kind: a
        dead app fails every request, and a line each would bury everything else."""
        self._notices.notice(("app", reason), f"app {self.app_url}: {detail}")

    # ------------------------------------------------------------ forwarding

    async def _forward(
        self, exchange: Exchange, verdict: Verdict, *, tracked: bool,
        body: AsyncIterable[bytes] | None = None, upload: UploadDeadline | None = None,
        slot: int = 0,
    ) -> None:
        """Send to the app and stream its answer back; ``tracked`` holds a limiter slot
        (``slot``, :attr:`mesh.admission.Admit.slot`).
        ``body``: the request body as received (:mod:`sidecar.upload`, under the ``upload``
        deadline); None: streamed from the client as it comes. A chunked body's trailer
        fields go on to the app after it, and the app's back to the caller."""
        headers, _ = request_headers_to_upstream(
            exchange.headers, client_ip=exchange.remote, proto=exchange.scheme, via=self.via
        )
        headers.popall("Expect", None)
        # request_timeout bounds each stall (a chunk of the upload, the wait for the answer's
        # head, each chunk of its body): one watchdog, pushed, not a timer per step
        watchdog = Watchdog(self.request_timeout)
        upload_body: _Upload | None = None
        if body is not None or exchange.body_exists:
            upload_body = _Upload(body, exchange.content, watchdog,
                                  self._caller_trailers_dropped)
        started = self.clock()
        finished_ok = served = False
        self.in_flight += 1
        awaited = self.probes.awaited
        waiting = awaited.sent(started)
        try:
            try:
                try:
                    upstream = await self.transport.handle_request(UpstreamRequest(
                        exchange.method, URL(self.app_url + exchange.raw_path, encoded=True),
                        headers, upload_body,
                    ))
                    awaited.answered(waiting, self.clock())
                except asyncio.CancelledError:
                    if not watchdog.took_back():
                        raise
                    raise TimeoutError from None  # the watchdog's: a stall
            except (TransportError, TimeoutError) as exc:
                if upload is not None and upload.failure is not None:  # the client's fault
                    await self._upload_failed(exchange, verdict, upload.failure)
                    return
                failure = classify(exc)
                self.metrics.requests.labels(verdict.label, InboundOutcome.APP_ERROR).inc()
                self.app_failed_notice(failure.reason, failure.detail)
                if failure.reason in UNREACHED:  # the app never saw it: a signed refusal,
                    # so the caller's sidecar may send it to another endpoint
                    await exchange.answer(self._reply(verdict, app_unreachable(failure.detail)))
                    return
                # a connection that broke before any answer: signed as such, so that the
                # caller's sidecar may send an idempotent request elsewhere, as it would
                # had its own connection to the app broken (wire.headers.APP_RESET)
                await exchange.answer(self._answer(
                    verdict, failure.status, failure.reason,
                    f"the app did not answer: {failure.detail}", {},
                    refused=APP_RESET if failure.nothing_received else None))
                return
            served = upstream.status < 500  # an error answer overtakes nobody (the gate)
            try:
                finished_ok = await self._relay(exchange, verdict, upstream, watchdog)
            finally:
                upstream.release()
        finally:
            watchdog.stop()
            self.in_flight -= 1
            awaited.ended(waiting)
            now = self.clock()
            if tracked:  # the slot goes back to the gate (with the RTT if it finished)
                self._deliver(self.gate.finish(now, now - started if finished_ok else None,
                                               slot, overtakes=served))
            if finished_ok:
                self.metrics.app_latency.observe(now - started)
                self.probes.record(now, now - started)

    async def _relay(self, exchange: Exchange, verdict: Verdict,
                     upstream: UpstreamResponse, watchdog: Watchdog) -> bool:
        """The app's answer to the caller; True once all of it is out. A body that stalls
        (the app's side or the caller's) for ``request_timeout`` is cut."""
        fields = getattr(upstream, "wire_fields", None)  # sidecar.http1's: the raw fields
        out, game = (response_headers_from_wire(fields, self.via) if fields is not None
                     else response_headers_to_app(upstream.headers, self.via))
        if game:  # the app's own X-GT-*: never relayed (an app cannot forge a signal)
            self.metrics.stripped.labels(HeaderDrop.FROM_APP).inc()
        self._signal_headers(out, verdict)
        try:
            await relay_answer(exchange, upstream, out,
                               bodiless=must_be_empty(exchange.method, upstream.status),
                               watchdog=watchdog, on_dropped=self._app_trailers_dropped)
        except BODY_READ_ERRORS as exc:  # a stall the watchdog cut among them (TimeoutError)
            stalled = isinstance(exc, TimeoutError)
            if exchange.head_unsent():
                # nothing of the answer has reached the caller: it is told by an error
                # answer instead of a cut connection (not signed as a refusal: the app did
                # see the request, so nobody may send it again)
                upstream.close()
                self.metrics.requests.labels(verdict.label, InboundOutcome.APP_ERROR).inc()
                detail = ("the app sent its answer's head, then nothing more within the "
                          "request timeout" if stalled else
                          f"the app's answer broke off before any of it was sent: {exc!r}")
                self.app_failed_notice("answer-stalled" if stalled else "answer-cut", detail)
                await exchange.answer(self._answer(
                    verdict, 504 if stalled else 502,
                    ErrorReason.UPSTREAM_TIMEOUT if stalled
                    else ErrorReason.UPSTREAM_PROTOCOL_ERROR, detail[:300], {}))
                return False
            # whose stall it was, asked before the abort (asyncio's abort drops the queue)
            caller_stalled = stalled and reader_stalled(exchange)
            # the head is out: cut the caller's connection (a truncated answer, never a
            # silently short one)
            upstream.close()
            exchange.abort()
            if caller_stalled:
                # the caller stopped reading (what was written is still queued): its doing
                self.metrics.requests.labels(verdict.label, InboundOutcome.CALLER_STALLED).inc()
                log.debug("a caller (%s) stopped reading its answer", verdict.label)
            elif isinstance(exc, TimeoutError):  # the app went silent mid-answer
                self.metrics.requests.labels(verdict.label, InboundOutcome.APP_ERROR).inc()
                self.app_failed_notice("answer-stalled", f"the answer stalled: {exc!r}")
            else:  # the app cut its own answer short
                self.metrics.requests.labels(verdict.label, InboundOutcome.APP_ERROR).inc()
                self.app_failed_notice("answer-cut", f"the answer failed: {exc!r}")
            return False
        except ConnectionError:
            if not exchange.client_gone():
                raise
            # the caller's doing: count it, free the app's connection, no traceback
            self.metrics.requests.labels(verdict.label, InboundOutcome.CALLER_HUNG_UP).inc()
            upstream.close()
            return False
        self.metrics.requests.labels(verdict.label, InboundOutcome.ADMITTED).inc()
        return True

    def _app_trailers_dropped(self, names: list[str]) -> None:
        # counted per message, as for the head
        self.metrics.stripped.labels(HeaderDrop.FROM_APP).inc()

    def _caller_trailers_dropped(self, names: list[str]) -> None:
        self.metrics.stripped.labels(HeaderDrop.IN_TRAILERS).inc()

    async def _websocket(self, request: web.Request, verdict: Verdict) -> web.StreamResponse:
        """Bridge a WebSocket to the app (frames both ways until either side closes)."""
        if self._dialer is None:
            return web_response(self._answer(
                verdict, 501, ErrorReason.WEBSOCKET_NOT_SUPPORTED,
                "this sidecar's transport cannot carry WebSockets", {}))
        caller, cap = verdict.caller, self.settings.websocket_max_per_caller
        if not self.open_long_lived(caller):  # WebSockets count against their caller
            self.metrics.requests.labels(verdict.label, InboundOutcome.WEBSOCKET_LIMIT).inc()
            return web_response(self._answer(
                verdict, 429, ErrorReason.WEBSOCKET_LIMIT,
                f"caller {caller!r} already has {cap} WebSockets open", {}, {"Retry-After": "1"}))
        try:
            return await self._bridge(request, verdict)
        finally:
            self.close_long_lived(caller)

    def open_long_lived(self, caller: str) -> bool:
        """One more long-lived exchange of ``caller`` that holds no slot (a WebSocket, or an
        HTTP/2 stream past its slot: :mod:`sidecar.h2_inbound`); False, and not counted, when
        the caller already has ``websocket_max_per_caller`` of them."""
        if self._websockets.get(caller, 0) >= self.settings.websocket_max_per_caller:
            return False
        self._websockets[caller] = self._websockets.get(caller, 0) + 1
        return True

    def close_long_lived(self, caller: str) -> None:
        left = self._websockets.get(caller, 1) - 1
        if left > 0:
            self._websockets[caller] = left
        else:
            self._websockets.pop(caller, None)

    async def _bridge(self, request: web.Request, verdict: Verdict) -> web.StreamResponse:
        assert self._dialer is not None
        headers, _ = request_headers_to_upstream(  # handshake headers: the dialer drops them
            request.headers, client_ip=request.remote, proto=request.scheme, via=self.via)
        try:
            async with asyncio.timeout(self.request_timeout):
                upstream = await self._dialer.open_websocket(UpstreamRequest(
                    request.method, URL(self.app_url + request.raw_path, encoded=True), headers))
        except HandshakeRefused as exc:
            if exc.headers is not None:  # the app's answer goes back as it came
                answer, _ = refused_upgrade_answer(exc.status, exc.headers, exc.body,
                                                   self.via)
                response = web_response(answer)
                self._signal_headers(response.headers, verdict)
                self.metrics.requests.labels(verdict.label, InboundOutcome.ADMITTED).inc()
                return response
            self.metrics.requests.labels(verdict.label, InboundOutcome.APP_ERROR).inc()
            return web_response(self._answer(
                verdict, 502, ErrorReason.WEBSOCKET_HANDSHAKE_FAILED,
                f"the app refused the upgrade with {exc.status}", {}))
        except (TransportError, TimeoutError) as exc:
            failure = classify(exc)
            self.metrics.requests.labels(verdict.label, InboundOutcome.APP_ERROR).inc()
            return web_response(self._answer(verdict, failure.status, failure.reason,
                                             failure.detail, {}))
        downstream = accept_like(upstream, self.settings.websocket_max_message)
        self._signal_headers(downstream.headers, verdict)
        self.metrics.requests.labels(verdict.label, InboundOutcome.ADMITTED).inc()
        return await relay_websocket(request, downstream, upstream, self._oversized)

    async def _upload_failed(
        self, exchange: Exchange, verdict: Verdict, failure: UploadFailure
    ) -> None:
        """A body that came too slowly (408) or not at all: counted against its caller, and
        the connection closed once the answer is out (the rest of the body is not read)."""
        timeout = failure is UploadFailure.TIMEOUT
        outcome = InboundOutcome.UPLOAD_TIMEOUT if timeout else InboundOutcome.UPLOAD_ABANDONED
        self.metrics.requests.labels(verdict.label, outcome).inc()
        self.metrics.slow_uploads.labels(verdict.label, failure).inc()
        self._deliver(self.gate.defect(verdict.caller, self.clock()))
        verdict.decision = None  # the standing as it is after the defection
        message = (f"the request body did not arrive within {self.settings.upload_timeout:g} s"
                   if timeout else "the request body was abandoned")
        answer = self._answer(verdict, 408 if timeout else 400,
                              ErrorReason.UPLOAD_TIMEOUT if timeout
                              else ErrorReason.UPLOAD_ABANDONED, message, {})
        # abandoned: written only if the caller can still read it (it half-closed, or its
        # body broke its framing: sidecar.http1.server)
        await exchange.refuse_body(answer)

    # ------------------------------------------------------------ answers

    def _signal_headers(self, headers: CIMultiDict[str], verdict: Verdict,
                        refused: str | None = None) -> None:
        headers.update(self.policing.signal_headers(verdict, refused))

    def _reply(self, verdict: Verdict, refusal: Refusal) -> Answer:
        return self._answer(verdict, refusal.status, refusal.reason, refusal.message,
                            refusal.extra, refusal.headers, refused=refusal.rejected)

    def _answer(
        self,
        verdict: Verdict,
        status: int,
        reason: str,
        message: str,
        extra: dict[str, Any],
        headers: dict[str, str] | None = None,
        *,
        refused: str | None = None,
    ) -> Answer:
        out: CIMultiDict[str] = CIMultiDict(headers or {})
        out["Via"] = self.via
        self._signal_headers(out, verdict, refused)
        body = {"error": message, "reason": reason, "caller": verdict.caller,
                "sidecar": self.sidecar_id, **extra}
        return json_answer(status, body, out)


class _Upload:
    """The request body on its way to the app: ``body`` as received (:mod:`sidecar.upload`)
    or, when None, the caller's stream as it comes. Each chunk is progress for the request's
    watchdog. Once it has ended it offers the caller's trailer fields that may be relayed
    (what the upstream client writes after the last chunk); game headers in them are dropped
    and counted."""

    __slots__ = ("_content", "_iterator", "_on_dropped", "_watchdog")

    def __init__(self, body: AsyncIterable[bytes] | None, content: ReceivedBody,
                 watchdog: Watchdog, on_dropped: Callable[[list[str]], None]) -> None:
        self._iterator = aiter(body) if body is not None else None
        self._content = content
        self._watchdog = watchdog
        self._on_dropped = on_dropped

    def __aiter__(self) -> _Upload:
        return self

    async def __anext__(self) -> bytes:
        if self._iterator is not None:
            chunk = await anext(self._iterator)
        else:
            chunk = await self._content.readany()
            if not chunk:
                raise StopAsyncIteration
        self._watchdog.push()
        return chunk

    @property
    def trailers(self) -> list[tuple[str, str]] | None:
        return relayable_trailers(getattr(self._content, "trailers", None), self._on_dropped)
