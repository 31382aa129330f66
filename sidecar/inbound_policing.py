"""The inbound listener's decisions for one request, whatever protocol carried it.

Owns the steps every request at the inbound listener goes through before and after the app
sees it, for the HTTP/1.1 path (:mod:`sidecar.inbound`) and the HTTP/2 one
(:mod:`sidecar.h2_inbound`) alike:

1. **Identity** (:meth:`InboundPolicing.identify`): ``X-GT-Identity`` verified with the mesh
   key against the request it arrived on (method, ``Host`` or ``:authority``, target:
   :class:`wire.identity.BoundRequest`), its nonce used once (:class:`wire.nonces.NonceBook`;
   a second use is ``replayed``); otherwise the caller is ``anonymous`` and its other
   ``X-GT-*`` headers are ignored.
2. **Checks and policing** (:meth:`InboundPolicing.police`): the target must be a path; in
   the baselines only the ``token-bucket`` limit applies; a trusted caller's ``X-GT-Bid`` is
   parsed and ``X-GT-Retry`` read; then :meth:`mesh.admission.AdmissionGate.police` judges
   the caller.
3. **A slot** (:meth:`InboundPolicing.admit`): at once, or after waiting in the bid queue
   (each waiter is a future that the gate's decisions answer), or a refusal.
4. **The end** (:meth:`InboundPolicing.finish`): the slot goes back with the app's RTT.
5. **Signals back** (:meth:`InboundPolicing.signal_headers`): ``X-GT-Congestion``,
   ``X-GT-Reputation`` and (admitted) ``X-GT-Price``; with a mesh key and the caller's
   ``X-GT-Challenge``, ``X-GT-Signals`` signs them (:mod:`wire.signals`), so the caller's
   sidecar can tell them from a forgery.

A refusal is a :class:`Refusal` (status, reason, message, extra headers), counted here; the
listener writes it in its own protocol (a JSON body, or a gRPC status). What it must not do:
touch sockets, HTTP messages or the app (the listeners forward), or hold game rules of its
own (they are :mod:`mesh.admission`'s).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from mesh.admission import AdmissionGate, Admit, Pass, Queue, Reject, RejectReason, Woken
from mesh.auction import SecondPriceAuction
from mesh.concurrency import AdaptiveConcurrencyLimit
from mesh.reputation import ANONYMOUS, Decision, Phase, ReputationBook
from sidecar.errors import ErrorReason, HeaderDrop
from sidecar.metrics import InboundMetrics
from sidecar.policing_config import PolicingSettings
from wire.bid import format_price, parse_bid
from wire.demand import DemandRejection, verify_demand
from wire.errors import Reason, WireError
from wire.headers import (
    BID,
    CHALLENGE,
    CONGESTION,
    DEMAND,
    IDENTITY,
    PRICE,
    REFUSED,
    REPUTATION,
    RETRY,
    SIGNALS,
    SIGNED_REFUSED,
    format_congestion,
    is_gt_header,
    parse_retry,
)
from wire.identity import BoundRequest, IdentityRejection, VerifiedIdentity, verify_identity
from wire.long_paths import under_long_path
from wire.nonces import NonceBook
from wire.signals import AnsweredRequest, SignedSignals, sign_signals
from wire.standing import format_standing

log = logging.getLogger(__name__)

OTHER = "other"
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
    """The app did not answer (or refused a WebSocket upgrade): 502/503/504; or its answer
    broke off mid-body (the caller's connection is cut)."""
    UPLOAD_TIMEOUT = "upload-timeout"
    """408: the request body did not arrive within ``upload_timeout`` (:mod:`sidecar.upload`)."""
    UPLOAD_ABANDONED = "upload-abandoned"
    """The client went away before its request body was complete."""
    WEBSOCKET_LIMIT = "websocket-limit"
    """429: the caller already has ``websocket_max_per_caller`` WebSockets open."""
    CALLER_HUNG_UP = "caller-hung-up"
    """The caller closed its connection before the app's answer was written back (the app
    answered; nothing is charged to it and nothing is logged as an error; the slot was held
    until then), or left while queued (the slot goes back as soon as the request gets it;
    the app never sees it)."""
    CALLER_STALLED = "caller-stalled"
    """The app's answer did not move for ``request_timeout`` because the caller was not
    taking it (stopped reading, or reads more slowly than the socket's buffers let the
    relay see progress): its connection is cut (the caller's doing: nothing is charged to
    the app)."""


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

    def names(self) -> list[str]:
        """Every caller with a label of its own (``anonymous`` first)."""
        return [ANONYMOUS, *sorted(self._known)]


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


class HeaderView(Protocol):
    """The request headers the policing reads (``aiohttp``'s ``CIMultiDictProxy`` or a
    ``CIMultiDict`` built from an HTTP/2 header block)."""

    def get(self, key: str, /) -> str | None: ...

    def __iter__(self) -> Any: ...


@dataclass(slots=True)
class Verdict:
    """What policing decided for one request, for the response headers."""

    caller: str
    label: str
    decision: Decision | None = None
    price: float | None = None
    answered: AnsweredRequest | None = None  # what X-GT-Signals binds to


@dataclass(frozen=True, slots=True)
class Refusal:
    """An answer the listener gives instead of forwarding; already counted.

    ``reason`` is what the JSON body's ``reason`` says (an :class:`ErrorReason` or
    :class:`RejectReason`), ``rejected`` the gate's reason when the gate sent it away (the
    gRPC status follows from it), ``extra`` more fields of the JSON body, ``headers`` more
    response headers (``Retry-After``...).
    """

    status: int
    reason: str
    message: str
    extra: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    rejected: RejectReason | None = None


def app_unreachable(detail: str) -> Refusal:
    """The answer when no connection to the app could be had (refused, or not in time): the
    app never saw the request, so the refusal is signed (``X-GT-Refused: app-unreachable``)
    and the caller's sidecar may send the request to another endpoint (both protocols)."""
    return Refusal(503, RejectReason.APP_UNREACHABLE, f"the app could not be reached: {detail}",
                   rejected=RejectReason.APP_UNREACHABLE)


class InboundPolicing:
    """The policing state of one inbound listener (both protocols share it)."""

    def __init__(
        self,
        *,
        settings: PolicingSettings,
        metrics: InboundMetrics,
        mesh_key: bytes | None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.mesh_key = mesh_key
        self.clock = clock
        self.wall_clock = wall_clock
        self.labels = CallerLabels(settings.max_caller_labels)
        self.gate = AdmissionGate(
            book=ReputationBook(settings.reputation),
            limiter=AdaptiveConcurrencyLimit(settings.concurrency),
            auction=SecondPriceAuction(settings.auction),
            max_wait=settings.max_wait, capacity=settings.capacity,
            max_long_per_caller=settings.websocket_max_per_caller,
        )
        self.bucket = LocalRateLimit(settings.token_bucket_rate, settings.token_bucket_burst,
                                     clock())
        self.nonces = NonceBook(settings.identity_max_skew)  # identities are single-use
        self._waiting: dict[str, asyncio.Future[Woken]] = {}  # request id -> its waiter
        self.in_flight = 0  # requests at the app through this listener (both protocols)
        # whether declared_long can say yes (else the listeners skip its header lookup)
        self.declares_long = bool(settings.long_paths) or settings.long_event_stream

    @property
    def game(self) -> bool:
        """Whether the game is played (mode equilibrium) rather than a baseline."""
        return self.settings.mode == "equilibrium"

    # ------------------------------------------------------------ before the app

    def identify(self, headers: HeaderView, bound: BoundRequest) -> tuple[str, bool]:
        """The caller (``anonymous`` unless its identity verifies for ``bound``, the request
        it arrived on, and its nonce is new) and whether it is trusted."""
        checked = self._verified(headers, bound)
        return (ANONYMOUS, False) if checked is None else (checked.caller, True)

    def demand(self, headers: HeaderView, identity: VerifiedIdentity) -> float | None:
        """The verified caller's declared even-spread demand (``X-GT-Demand``, bound to its
        identity's nonce; :mod:`wire.demand`), or None: absent, or not believed (counted)."""
        header = headers.get(DEMAND)
        if header is None or self.mesh_key is None:
            return None
        checked = verify_demand(header, self.mesh_key, identity.nonce)
        if isinstance(checked, DemandRejection):
            self.metrics.demands.labels(checked.reason).inc()
            log.info("ignored %s of %r: %s (%s)", DEMAND, identity.caller, checked.reason,
                     checked.detail)
            return None
        self.metrics.demands.labels(TRUSTED).inc()
        return checked.per_endpoint

    def _verified(self, headers: HeaderView, bound: BoundRequest) -> VerifiedIdentity | None:
        """The request's identity if it verifies for ``bound`` and its nonce is new; else
        None (counted, and the request's other ``X-GT-*`` headers are ignored)."""
        header = headers.get(IDENTITY)
        if self.mesh_key is None:
            self.metrics.identity.labels(Reason.NO_KEY if header else Reason.MISSING).inc()
        else:
            now = self.wall_clock()
            checked = verify_identity(header, self.mesh_key, now,
                                      self.settings.identity_max_skew, bound)
            if isinstance(checked, IdentityRejection):
                self.metrics.identity.labels(checked.reason).inc()
            elif not self.nonces.first_use(checked.nonce, checked.issued_at, now):
                self.metrics.identity.labels(Reason.REPLAYED).inc()
                log.info("a replayed identity of %r (%s %s): treated as anonymous",
                         checked.caller, bound.method, bound.target[:64])
            else:
                self.metrics.identity.labels(TRUSTED).inc()
                return checked
        ignored = sum(1 for name in headers if is_gt_header(name)
                      and name.lower() not in (IDENTITY.lower(), CHALLENGE.lower()))
        if ignored:
            self.metrics.stripped.labels(HeaderDrop.UNTRUSTED).inc(ignored)
        return None

    def is_retry(self, headers: HeaderView) -> bool:
        raw = headers.get(RETRY)
        if raw is None:
            return False
        try:
            parse_retry(raw)
        except WireError:
            self.metrics.bad_headers.labels(RETRY.lower()).inc()
            return True  # a malformed mark is still a mark: never cheaper than a valid one
        return True

    def police(
        self, headers: HeaderView, request: BoundRequest, now: float, at: str = ""
    ) -> tuple[Verdict, Pass | Refusal | None]:
        """Identity, target, bid and the gate's judgement of the caller: :class:`Pass` (go on
        to :meth:`admit`), a :class:`Refusal`, or None (a baseline mode: forward without a
        slot). ``request``: its method, ``Host`` (HTTP/1.1) or ``:authority`` (HTTP/2) and
        target, which the identity must be bound to and the answer's signals are signed
        over; ``at``: the address the caller reached this sidecar at (its connection's local
        address, :func:`wire.signals.normal_ip`), which the signals are signed with too."""
        target = request.target
        identity = self._verified(headers, request)
        caller = ANONYMOUS if identity is None else identity.caller
        verdict = Verdict(caller, self.labels.of(caller))
        challenge = headers.get(CHALLENGE)
        if challenge and self.mesh_key is not None:
            verdict.answered = AnsweredRequest(challenge, request.method, target, at)
        if not target.startswith("/"):  # the app is a server, not a proxy
            self.metrics.requests.labels(verdict.label, InboundOutcome.BAD_TARGET).inc()
            return verdict, Refusal(400, ErrorReason.BAD_TARGET,
                                    "the request target must be a path starting with '/' "
                                    f"(got {target[:64]!r})")
        if not self.game:
            if self.settings.mode == "token-bucket" and not self.bucket.try_take(now):
                self.metrics.requests.labels(verdict.label, InboundOutcome.RATE_LIMITED).inc()
                return verdict, Refusal(
                    429, ErrorReason.LOCAL_RATE_LIMITED, "local rate limit exceeded",
                    headers={"X-RateLimit-Limit": f"{self.settings.token_bucket_rate:g}"})
            return verdict, None
        bid, is_retry, demand = 0.0, False, None
        if identity is not None:
            try:
                bid = parse_bid(headers.get(BID))
            except WireError as exc:
                self.metrics.bad_bids.labels(exc.reason).inc()
                self.metrics.requests.labels(verdict.label, InboundOutcome.BAD_BID).inc()
                return verdict, Refusal(400, ErrorReason.BAD_BID, str(exc), {"header": BID})
            is_retry = self.is_retry(headers)
            demand = self.demand(headers, identity)
        policed = self.gate.police(caller, bid, now, is_retry=is_retry, demand=demand)
        self.deliver(policed.woken)
        verdict.decision = policed.decision
        if isinstance(policed, Reject):
            return verdict, self.refuse(verdict, policed)
        return verdict, policed

    def declared_long(self, method: str, target: str, accept: str | None) -> bool:
        """Whether the operator declared this request long: its path is one of
        ``long_paths`` or below one (whole segments: ``/watch`` is not ``/watchdog``; a path
        with ``.`` or ``..`` segments never is), or, with ``long_event_stream``, it is a GET
        that accepts ``text/event-stream``."""
        settings = self.settings
        if settings.long_event_stream and method == "GET" and accept is not None \
                and "text/event-stream" in accept.lower():
            return True
        return under_long_path(target, settings.long_paths)

    async def admit(self, verdict: Verdict, policed: Pass, now: float, *,
                    long: bool = False) -> Admit | Refusal:
        """A slot now, or a place in the bid queue until one frees up
        (:meth:`AdmissionGate.offer`); a waiter's future is answered by whichever step of the
        gate frees a slot for it or sends it away. An admitted request holds its slot until
        :meth:`finish`. ``long``: declared long (:meth:`declared_long`), admitted outside
        the limit while its caps allow."""
        if policed.voided:
            self.metrics.voided_bids.inc()
        admitted = await self._wait_for_slot(verdict, policed, now, long)
        if isinstance(admitted, Admit):
            verdict.price = admitted.price
            self.metrics.price.set(admitted.price)
            if admitted.price > 0:
                self.metrics.paid.labels(verdict.label).inc(admitted.price)
            self.metrics.wait.observe(admitted.waited)
        return admitted

    async def _wait_for_slot(self, verdict: Verdict, policed: Pass,
                             now: float, long: bool) -> Admit | Refusal:
        offered = self.gate.offer(policed, now, long=long)
        self.deliver(offered.woken)
        if isinstance(offered, Admit):
            return offered
        if isinstance(offered, Reject):
            return self.refuse(verdict, offered)
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
            return self.refuse(verdict, self.gate.time_out(offered, self.clock()))
        result = future.result()
        if isinstance(result, Admit):
            return result
        if result.reason is RejectReason.PUNISHED:
            verdict.decision = None  # report the standing as it is now (punished)
        return self.refuse(verdict, result)

    def deliver(self, woken: Iterable[Woken]) -> None:
        """Hand waiters what the gate decided for them."""
        for outcome in woken:
            future = self._waiting.pop(outcome.request_id or "", None)
            if future is not None and not future.done():
                future.set_result(outcome)
            elif isinstance(outcome, Admit):  # its client is gone: the slot is free again
                self.deliver(self.gate.finish(self.clock(), slot=outcome.slot))

    def _leave(self, queued: Queue, future: asyncio.Future[Woken]) -> None:
        """A waiter's client went away: its place in the queue, or the slot it was just
        given, goes back to the gate."""
        now = self.clock()
        self._waiting.pop(queued.request_id, None)
        result = future.result() if future.done() and not future.cancelled() else None
        if isinstance(result, Admit):  # admitted just now: give the slot back
            self.deliver(self.gate.finish(now, slot=result.slot))
        else:
            self.gate.withdraw(queued.request_id, now)
            future.cancel()

    # ------------------------------------------------------------ after the app

    def finish(self, rtt: float | None, slot: int) -> None:
        """An admitted request left its slot (``rtt``: the app's time when it answered;
        ``slot``: its :attr:`~mesh.admission.Admit.slot`)."""
        self.deliver(self.gate.finish(self.clock(), rtt, slot))

    def close(self) -> None:
        """Shutdown: every waiter is sent away."""
        self.deliver(self.gate.close(self.clock()))

    # ------------------------------------------------------------ answers

    def signal_headers(self, verdict: Verdict, refused: str | None = None
                       ) -> dict[str, str]:
        """``X-GT-Congestion``, ``X-GT-Reputation`` and (admitted) ``X-GT-Price``; and
        ``X-GT-Refused`` when the gate sent the request away before the app saw it
        (``refused``: its reason, a :class:`RejectReason`; not for a punishment, which
        another endpoint must not undo) or the app's connection broke before it answered
        (:data:`wire.headers.APP_RESET`); none in the baseline modes."""
        if not self.game:
            return {}
        limiter = self.gate.limiter
        out = {CONGESTION: format_congestion(self.gate.congestion(), limiter.limit,
                                             limiter.in_flight)}
        decision = verdict.decision
        if decision is not None:
            out[REPUTATION] = format_standing(decision.reputation, decision.level,
                                              decision.phase, decision.retry_after)
        else:  # answered before policing (bad bid): the standing as it is
            standing = self.gate.book.standing(verdict.caller, self.clock())
            out[REPUTATION] = (
                format_standing(standing.reputation, standing.level, standing.phase,
                                standing.punished_for)
                if standing is not None else format_standing(1.0, 0, Phase.GOOD, None)
            )
        if verdict.price is not None:
            out[PRICE] = format_price(verdict.price)
        if refused is not None and refused in SIGNED_REFUSED:
            out[REFUSED] = str(refused)
        if verdict.answered is not None and self.mesh_key is not None:
            signed = sign_signals(self.mesh_key, verdict.answered, verdict.caller, SignedSignals(
                out.get(CONGESTION), out.get(REPUTATION), out.get(PRICE), out.get(REFUSED)))
            if signed is not None:
                out[SIGNALS] = signed
        return out

    def refuse(self, verdict: Verdict, refused: Reject) -> Refusal:
        """The answer to a request the gate sent away (429 punished, else 503), counted."""
        outcome = _OUTCOME.get(refused.reason)
        if outcome is not None:
            self.metrics.requests.labels(verdict.label, outcome).inc()
        return Refusal(_STATUS.get(refused.reason, 503), refused.reason,
                       self._refusal_message(verdict, refused),
                       headers={"Retry-After": str(refused.retry_after)},
                       rejected=refused.reason)

    def _refusal_message(self, verdict: Verdict, refused: Reject) -> str:
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
                return (f"no slot at the app within {self.gate.max_wait:g} s: every request "
                        "it may take at once was still in progress (an app that is "
                        "overloaded, slow or not answering); the app never saw this one")
        return "the sidecar is shutting down"
