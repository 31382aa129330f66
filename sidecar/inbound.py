"""The inbound listener: the sidecar in front of its own app, policing who gets in and when.

Owns the request path from the network to the local app (``--inbound HOST:PORT --app URL``):

1. **Identity.** ``X-GT-Identity`` is verified with the mesh key (:mod:`mesh.identity`).
   A missing, malformed, forged or expired identity is never trusted: the caller is
   ``anonymous``, one shared bucket with the strictest treatment, and every other ``X-GT-*``
   header it sent (bid, retry mark) is ignored. Without a mesh key nobody can be verified,
   so every caller is anonymous (a warning is logged at start).
2. **Bid.** A trusted caller's ``X-GT-Bid`` is parsed (:func:`mesh.auction.parse_bid`);
   a malformed bid is answered 400 with a JSON reason and counted.
3. **Reputation** (:mod:`mesh.reputation`). The caller's request is judged against the
   cooperative norm; a punished caller beyond its throttled share gets 429 + ``Retry-After``.
4. **Congestion and auction** (:mod:`mesh.concurrency`, :mod:`mesh.auction`). A request that
   finds a free slot under the adaptive concurrency limit goes straight to the app at price 0;
   otherwise it waits in the bid queue (a request that takes its caller over its fair share
   of the congested app bids 0 and takes a free slot only from the first half of the limit:
   priority is bought only within the norm), the highest bids are
   admitted as slots free and pay the highest losing bid (second price); a request that waits
   longer than ``max_wait`` (or is pushed out of a full queue) gets 503.
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
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from yarl import URL

from mesh.auction import (
    Admission,
    AuctionSnapshot,
    BidError,
    Queued,
    Rejected,
    SecondPriceAuction,
    parse_bid,
)
from mesh.concurrency import AdaptiveConcurrencyLimit, ConcurrencySnapshot
from mesh.headers import (
    BID,
    CONGESTION,
    IDENTITY,
    PRICE,
    REPUTATION,
    RETRY,
    HeaderError,
    format_congestion,
    is_gt_header,
    parse_retry,
)
from mesh.identity import ANONYMOUS, IdentityRejection, verify_identity
from mesh.reputation import BookSnapshot, Decision, Phase, ReputationBook
from mesh.standing import format_standing
from sidecar.forward import (
    CHUNK_SIZE,
    append_header,
    connection_tokens,
    end_to_end,
    relay_chunks,
    request_headers_to_upstream,
    strip_game_headers,
    without,
)
from sidecar.metrics import LATENCY_BUCKETS
from sidecar.outbound import (
    CLIENT_AUTO_HEADERS,
    WS_HANDSHAKE_HEADERS,
    bridge_websockets,
    classify,
    must_be_empty,
)
from sidecar.policing_config import PolicingSettings

log = logging.getLogger(__name__)

OTHER = "other"
GAUGE_REFRESH_INTERVAL = 0.5


def is_websocket(request: web.Request) -> bool:
    """A WebSocket upgrade request (RFC 6455 §4.1)."""
    return (request.method == "GET"
            and request.headers.get("Upgrade", "").lower() == "websocket"
            and "upgrade" in connection_tokens(request.headers))


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


class InboundMetrics:
    """The inbound side's metrics, registered in the sidecar's own registry; every name is
    ``equilibrium_inbound_<name>`` (counters end in ``_total``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        scope: dict[str, Any] = {"namespace": "equilibrium", "subsystem": "inbound",
                                 "registry": registry}

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, labels, **scope)

        def gauge(name: str, doc: str, *labels: str) -> Gauge:
            return Gauge(name, doc, labels, **scope)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, buckets=LATENCY_BUCKETS, **scope)

        # what happened to requests, and to the headers they carried
        self.requests = counter(
            "requests", "Requests to the inbound listener by caller and outcome (admitted, "
            "throttled, rate-limited, bad-bid, queue-full, queue-timeout, app-error)",
            "caller", "outcome")
        self.identity = counter(
            "identity", "Identity checks by result (trusted, or why the caller was treated as "
            "anonymous)", "result")
        self.bad_bids = counter("bad_bids", "Malformed X-GT-Bid values rejected with 400",
                                "reason")
        self.stripped = counter(
            "stripped_headers", "X-GT-* headers removed: untrusted = sent by a caller that did "
            "not verify (ignored); from-app = set by the app on its response", "source")
        self.voided_bids = counter(
            "voided_bids", "Bids set to 0 because the request took its caller over its fair "
            "share of a congested app")
        self.bad_headers = counter("bad_headers", "Malformed game headers from trusted callers",
                                   "header")
        # the callers' standing (refreshed off the request path)
        self.reputation = gauge(
            "caller_reputation",
            "Caller reputation in [0, 1] (other = the lowest among untracked callers)", "caller")
        self.level = gauge(
            "caller_punishment_level",
            "Caller punishment level, 0 = good standing (other = the highest among the rest)",
            "caller")
        self.punished = gauge("punished_callers", "Callers currently being punished")
        # the auction
        self.price = gauge("clearing_price", "Price of the last admission (0 uncongested)")
        self.paid = counter("price_paid", "Sum of prices charged, by caller", "caller")
        self.queue_length = gauge("queue_length", "Requests waiting in the bid queue")
        # the app's load
        self.limit = gauge("concurrency_limit", "Adaptive concurrency limit of the app")
        self.in_flight = gauge("in_flight", "Requests at the app through this listener")
        self.congestion = gauge("congestion", "Congestion level sent as X-GT-Congestion")
        self.capacity = gauge("capacity_estimate",
                              "App capacity in requests/s used for fair shares")
        self.mesh_key = gauge("mesh_key_configured",
                              "1 if a mesh key is configured (0: every caller is anonymous)")
        self.app_latency = histogram(
            "app_duration_seconds", "Time from forwarding to the app until its response finished")
        self.wait = histogram("queue_wait_seconds", "Time admitted requests waited in the queue")


EVICTED = "evicted"
PUNISHED_WHILE_WAITING = "punished"
CLOSING = "closing"


@dataclass(slots=True)
class _Waiter:
    caller: str
    future: asyncio.Future[Admission | str]


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
    """The aiohttp handler of the inbound listener; one instance per sidecar process."""

    def __init__(
        self,
        *,
        sidecar_id: str,
        app_url: str,
        settings: PolicingSettings,
        registry: CollectorRegistry,
        mesh_key: bytes | None,
        request_timeout: float = 15.0,
        connect_timeout: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.sidecar_id = sidecar_id
        self.app_url = app_url.rstrip("/")
        self.settings = settings
        self.mesh_key = mesh_key
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.clock = clock
        self.wall_clock = wall_clock
        self.via = f"1.1 {sidecar_id}"
        self.metrics = InboundMetrics(registry)
        self.metrics.mesh_key.set(1 if mesh_key else 0)
        self.labels = CallerLabels(settings.max_caller_labels)
        now = clock()
        self.book = ReputationBook(settings.reputation)
        self.limiter = AdaptiveConcurrencyLimit(settings.concurrency)
        self.auction = SecondPriceAuction(settings.auction)
        self.bucket = LocalRateLimit(settings.token_bucket_rate, settings.token_bucket_burst, now)
        self._waiting: dict[str, _Waiter] = {}
        self._queued_by: dict[str, set[str]] = {}  # caller -> its waiters in good standing
        self._ids = itertools.count(1)
        self._shown: set[str] = set()  # callers with per-caller gauges right now
        self._session: aiohttp.ClientSession | None = None
        self.in_flight = 0

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
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30.0),
            auto_decompress=False,
            skip_auto_headers=CLIENT_AUTO_HEADERS,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None, connect=self.connect_timeout,
                                          sock_connect=self.connect_timeout),
        )
        if hasattr(self._session, "_retry_connection"):  # never re-send behind our back
            self._session._retry_connection = False

    async def _close(self, _: web.Application) -> None:
        for request_id in list(self._waiting):
            self._resolve(request_id, CLOSING)
        if self._session is not None:
            await self._session.close()
            self._session = None

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
        """App capacity in requests/s: configured, or Little's law at the learned limit
        (``limit / sampleRTT``, see :meth:`AdaptiveConcurrencyLimit.capacity_estimate`)."""
        if self.settings.capacity is not None:
            return self.settings.capacity
        return self.limiter.capacity_estimate() or self.book.params.capacity

    def _congestion(self) -> float:
        """``in_flight / limit``, and 1 while anyone waits in the bid queue."""
        return 1.0 if self.auction.queue_length else self.limiter.congestion_level()

    def _update_load(self, now: float) -> None:
        self.book.update_load(now, self._congestion(), self.capacity())

    # ------------------------------------------------------------ request path

    async def handle(self, request: web.Request) -> web.StreamResponse:
        now = self.clock()
        caller, trusted = self._identify(request)
        verdict = _Verdict(caller, self.labels.of(caller))
        if not self.game:
            return await self._baseline(request, verdict, now)
        bid, is_retry = 0.0, False
        if trusted:
            try:
                bid = parse_bid(request.headers.get(BID))
            except BidError as exc:
                self.metrics.bad_bids.labels(exc.reason).inc()
                self.metrics.requests.labels(verdict.label, "bad-bid").inc()
                return self._answer(verdict, 400, "bad-bid", str(exc), {"header": BID})
            is_retry = self._is_retry(request)
        verdict.decision = self.book.admit(caller, now, is_retry)
        if verdict.decision.phase is Phase.PUNISHED and caller in self._queued_by:
            self._flush_punished(caller, now)
        if not verdict.decision.admitted:
            self.metrics.requests.labels(verdict.label, "throttled").inc()
            retry_after = verdict.decision.retry_after or 1.0
            return self._answer(
                verdict, 429, "punished",
                f"caller {caller!r} is punished (level {verdict.decision.level}) for exceeding "
                "its fair share or retry budget; back off", {},
                {"Retry-After": str(math.ceil(retry_after))},
            )
        if is_websocket(request):  # long-lived: policed at the handshake, holds no slot
            return await self._websocket(request, verdict)
        beyond = self._beyond_norm(caller, verdict.decision, now)
        if beyond and bid > 0:
            self.metrics.voided_bids.inc()
            bid = 0.0
        admission = await self._admit(request, verdict, bid, now, beyond_norm=beyond)
        if isinstance(admission, web.StreamResponse):
            return admission
        verdict.price = admission.price
        self.metrics.price.set(admission.price)
        if admission.price > 0:
            self.metrics.paid.labels(verdict.label).inc(admission.price)
        self.metrics.wait.observe(admission.waited)
        return await self._forward(request, verdict, tracked=True)

    def _beyond_norm(self, caller: str, decision: Decision, now: float) -> bool:
        """Whether this request takes the caller over its fair share of a congested app.

        Such a request still waits for a slot, but with bid 0: a bid buys priority only
        within the cooperative norm, so a flood cannot outrank cooperative callers during the
        few seconds before its reputation triggers a punishment.
        """
        p = self.book.params
        if not self.book.congested or decision.fair_share <= 0:
            return False
        standing = self.book.standing(caller, now)
        return standing is not None and standing.rate > max(
            p.rate_floor, p.rate_tolerance * decision.fair_share)

    def _identify(self, request: web.Request) -> tuple[str, bool]:
        header = request.headers.get(IDENTITY)
        if self.mesh_key is None:
            result = "no-key" if header else "missing"
            self.metrics.identity.labels(result).inc()
            trusted = False
        else:
            checked = verify_identity(header, self.mesh_key, self.wall_clock(),
                                      self.settings.identity_max_skew)
            if isinstance(checked, IdentityRejection):
                self.metrics.identity.labels(checked.reason.value).inc()
                trusted = False
            else:
                self.metrics.identity.labels("trusted").inc()
                return checked.caller, True
        ignored = sum(1 for name in request.headers if is_gt_header(name)
                      and name.lower() != IDENTITY.lower())
        if ignored:
            self.metrics.stripped.labels("untrusted").inc(ignored)
        return ANONYMOUS, trusted

    def _is_retry(self, request: web.Request) -> bool:
        raw = request.headers.get(RETRY)
        if raw is None:
            return False
        try:
            parse_retry(raw)
        except HeaderError:
            self.metrics.bad_headers.labels(RETRY.lower()).inc()
            return True  # a malformed mark is still a mark: never cheaper than a valid one
        return True

    async def _admit(
        self, request: web.Request, verdict: _Verdict, bid: float, now: float,
        *, beyond_norm: bool = False,
    ) -> Admission | web.StreamResponse:
        """A slot now (price 0), or a place in the bid queue until one frees up.

        A request beyond its caller's norm takes a free slot directly only while at least
        half of the limit is free: the other half stays for callers within their share, who
        would otherwise find the app's own queue full of the flood.
        """
        request_id = f"r{next(self._ids)}"
        lim = self.limiter
        slot = (not beyond_norm or lim.in_flight < lim.limit // 2) and lim.on_start(now)
        if slot and self.auction.queue_length:
            # others wait: the free slot goes to the best bid through release(), not to
            # whoever arrives now (no queue jumping)
            self.limiter.on_abandon(now)
            slot = False
        outcome = self.auction.offer(request_id, verdict.caller, bid, now, slot)
        self._update_load(now)
        if isinstance(outcome, Admission):
            return outcome
        if isinstance(outcome, Rejected):
            self.metrics.requests.labels(verdict.label, "queue-full").inc()
            return self._answer(verdict, 503, "queue-full",
                                "the app is overloaded and the queue is full of higher bids", {},
                                {"Retry-After": "1"})
        assert isinstance(outcome, Queued)
        if outcome.evicted is not None:
            self._resolve(outcome.evicted, EVICTED)
        future: asyncio.Future[Admission | str] = asyncio.get_running_loop().create_future()
        in_good_standing = verdict.decision is None or verdict.decision.phase is not Phase.PUNISHED
        self._waiting[request_id] = _Waiter(verdict.caller, future)
        if in_good_standing:
            self._queued_by.setdefault(verdict.caller, set()).add(request_id)
        self.metrics.queue_length.set(self.auction.queue_length)
        self._release(now)  # a slot may be free (the limit grew, a client left)
        try:
            await asyncio.wait({future}, timeout=self.settings.max_wait)
        except asyncio.CancelledError:  # the client went away while waiting
            self._abandon_wait(request_id, future)
            raise
        if not future.done():
            self._abandon_wait(request_id, future)
            self.metrics.requests.labels(verdict.label, "queue-timeout").inc()
            return self._answer(verdict, 503, "queue-timeout",
                                f"no slot at the app within {self.settings.max_wait:g} s "
                                "(overloaded; a higher bid is served first)", {},
                                {"Retry-After": "1"})
        result = future.result()
        if isinstance(result, Admission):
            return result
        if result == PUNISHED_WHILE_WAITING:
            verdict.decision = None  # report the standing as it is now (punished)
            standing = self.book.standing(verdict.caller, self.clock())
            retry_after = max(1, math.ceil(standing.punished_for)) if standing else 1
            self.metrics.requests.labels(verdict.label, "throttled").inc()
            return self._answer(verdict, 429, "punished",
                                f"caller {verdict.caller!r} was punished while this request "
                                "waited; back off", {}, {"Retry-After": str(retry_after)})
        if result == CLOSING:
            return self._answer(verdict, 503, "shutting-down", "the sidecar is shutting down",
                                {}, {"Retry-After": "1"})
        self.metrics.requests.labels(verdict.label, "queue-full").inc()
        return self._answer(verdict, 503, "queue-full",
                            "pushed out of a full queue by a higher bid", {},
                            {"Retry-After": "1"})

    def _resolve(self, request_id: str, result: Admission | str) -> bool:
        """Hand a waiter its outcome; False if its client is already gone."""
        waiter = self._waiting.pop(request_id, None)
        if waiter is None:
            return False
        queued = self._queued_by.get(waiter.caller)
        if queued is not None:
            queued.discard(request_id)
            if not queued:
                del self._queued_by[waiter.caller]
        if waiter.future.done():
            return False
        waiter.future.set_result(result)
        return True

    def _flush_punished(self, caller: str, now: float) -> None:
        """A caller was just punished: its requests queued in good standing leave the queue
        (429), so the flood that earned the punishment is not served after it."""
        for request_id in list(self._queued_by.get(caller, ())):
            if self.auction.cancel(request_id, now):
                self._resolve(request_id, PUNISHED_WHILE_WAITING)
        self._queued_by.pop(caller, None)

    def _abandon_wait(self, request_id: str, future: asyncio.Future[Admission | str]) -> None:
        now = self.clock()
        admitted = future.done() and not future.cancelled() and isinstance(
            future.result(), Admission)
        self._resolve(request_id, CLOSING)
        if admitted:  # admitted just now: give the slot back
            self.limiter.on_abandon(now)
            self._release(now)
        else:
            self.auction.cancel(request_id, now)
            if not future.done():
                future.cancel()
        self._update_load(now)

    def _release(self, now: float) -> None:
        """Hand free slots to the best waiters (each pays the highest losing bid)."""
        lim = self.limiter
        while self.auction.queue_length:
            granted = 0  # slots taken first: on_start may begin a probe and refuse
            while (granted < self.auction.queue_length and lim.available() > 0
                   and lim.on_start(now)):
                granted += 1
            if granted == 0:
                break
            admissions = self.auction.release(now, granted)
            for _ in range(granted - len(admissions)):
                lim.on_abandon(now)
            for admission in admissions:
                if not self._resolve(admission.request_id, admission):
                    lim.on_abandon(now)  # its client is gone: the slot is free again
        self._update_load(now)

    async def _baseline(
        self, request: web.Request, verdict: _Verdict, now: float
    ) -> web.StreamResponse:
        if self.settings.mode == "token-bucket" and not self.bucket.try_take(now):
            self.metrics.requests.labels(verdict.label, "rate-limited").inc()
            return self._answer(verdict, 429, "local-rate-limited",
                                "local rate limit exceeded", {}, {"X-RateLimit-Limit":
                                f"{self.settings.token_bucket_rate:g}"})
        return await self._forward(request, verdict, tracked=False)

    # ------------------------------------------------------------ forwarding

    async def _forward(
        self, request: web.Request, verdict: _Verdict, *, tracked: bool
    ) -> web.StreamResponse:
        """Send to the app and stream its answer back; ``tracked`` holds a limiter slot."""
        if self._session is None:
            raise RuntimeError("the inbound listener's app was not started")
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
                    upstream = await self._session.request(
                        request.method, URL(self.app_url + request.raw_path, encoded=True),
                        headers=headers, data=body, allow_redirects=False,
                        read_bufsize=CHUNK_SIZE,
                    )
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                failure = classify(exc)
                self.metrics.requests.labels(verdict.label, "app-error").inc()
                log.info("app %s: %s", self.app_url, failure.detail)
                return self._answer(verdict, failure.status, failure.reason,
                                    f"the app did not answer: {failure.detail}", {})
            try:
                out = end_to_end(upstream.headers)
                if strip_game_headers(out):
                    self.metrics.stripped.labels("from-app").inc()
                append_header(out, "Via", self.via)
                self._signal_headers(out, verdict)
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                              headers=out)
                await response.prepare(request)
                if not must_be_empty(request.method, upstream.status):
                    try:
                        async for chunk in relay_chunks(upstream.content, self.request_timeout):
                            await response.write(chunk)
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        upstream.close()
                        raise ConnectionResetError(f"app body failed: {exc!r}") from exc
                await response.write_eof()
                finished_ok = True
                self.metrics.requests.labels(verdict.label, "admitted").inc()
                return response
            finally:
                upstream.release()
        finally:
            self.in_flight -= 1
            now = self.clock()
            if tracked:
                if finished_ok:
                    self.limiter.on_finish(now - started, now)
                else:
                    self.limiter.on_abandon(now)
                self._release(now)
            if finished_ok:
                self.metrics.app_latency.observe(now - started)

    async def _websocket(self, request: web.Request, verdict: _Verdict) -> web.StreamResponse:
        """Bridge a WebSocket to the app (frames both ways until either side closes)."""
        if self._session is None:
            raise RuntimeError("the inbound listener's app was not started")
        base, _ = request_headers_to_upstream(
            request.headers, client_ip=request.remote, proto=request.scheme, via=self.via)
        headers = without(base, WS_HANDSHAKE_HEADERS)
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "")
                     .split(",") if p.strip()]
        try:
            async with asyncio.timeout(self.request_timeout):
                upstream = await self._session.ws_connect(
                    URL(self.app_url + request.raw_path, encoded=True), headers=headers,
                    protocols=protocols, max_msg_size=0, autoclose=False)
        except aiohttp.WSServerHandshakeError as exc:
            self.metrics.requests.labels(verdict.label, "app-error").inc()
            return self._answer(verdict, 502, "websocket-handshake-failed",
                                f"the app refused the upgrade with {exc.status}", {})
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            failure = classify(exc)
            self.metrics.requests.labels(verdict.label, "app-error").inc()
            return self._answer(verdict, failure.status, failure.reason, failure.detail, {})
        downstream = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (), max_msg_size=0,
            autoclose=False)
        self._signal_headers(downstream.headers, verdict)
        self.metrics.requests.labels(verdict.label, "admitted").inc()
        try:
            await downstream.prepare(request)
            await bridge_websockets(downstream, upstream)
        finally:
            await upstream.close()
            await downstream.close()
        return downstream

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
            headers[PRICE] = f"{verdict.price:g}"

    def _answer(
        self,
        verdict: _Verdict,
        status: int,
        reason: str,
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
