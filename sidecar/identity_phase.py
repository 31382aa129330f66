"""The outbound side of policing: sign the caller's identity, carry its bid, back off when punished.

``CallerPhases`` wraps whatever :class:`sidecar.phases.ProxyPhases` are active (routing
defaults, correlated-equilibrium recommendations, …) and adds, on every request the app
sends through the outbound listener:

- ``X-GT-Identity``: this sidecar's ``--id`` signed with the mesh key for this one request
  (method, ``Host``, target, a fresh nonce; :mod:`wire.identity`), so the upstream's inbound
  side can tell callers apart and police each one; with ``X-GT-Bid`` and ``X-GT-Retry`` it
  goes only to endpoints in the mesh (:mod:`sidecar.membership`); every attempt carries a
  fresh ``X-GT-Challenge``;
- ``X-GT-Demand``: this sidecar's rate of attempts to the whole upstream service (decayed,
  :data:`DEMAND_TAU`; counted per group, whatever ``Host`` alias the app used) and the number
  of its endpoints the policy may send to now (not ejected, not draining: a pod that is down
  does not dilute the demand), signed with the identity's nonce (:mod:`wire.demand`), so that
  a pod judges this caller by what it asks of the service and not only by what its routing
  happened to send that pod;
- **signed answers only**: the answer's ``X-GT-Congestion``, ``X-GT-Reputation`` and
  ``X-GT-Price`` are believed only with a valid ``X-GT-Signals`` over them, the challenge
  and the request (:mod:`wire.signals`); a standing or a price only when signed about this
  caller. Anything else is dropped and counted (``equilibrium_caller_bad_signals{header=
  "x-gt-signals"}``): a server outside the mesh cannot make this caller back off;
- ``X-GT-Bid``: the app's bid from the ``X-Equilibrium-Bid`` request header (never forwarded
  itself), or the configured ``policing.default_bid``; a malformed app bid is answered 400
  and counted, never forwarded; the price charged comes back to the app as
  ``X-Equilibrium-Price`` (the upstream's ``X-GT-Price``, which is stripped like every
  ``X-GT-*``);
- **self-enforced punishment**: when an upstream's ``X-GT-Reputation`` says this caller is
  punished, the sidecar answers its app 429 (with ``Retry-After``, reason
  ``punished-backoff``) *without sending* until the punishment's remaining time has passed.
  In the repeated game this is the deviator's own sidecar playing the punishment phase: the
  defection (the app's flood) costs the upstream nothing while it lasts, and the caller's
  reputation recovers (silence is cooperation), so it is forgiven on time;
- **self-enforced probation**: when the back-off ends the sidecar does not return at once to
  whatever its app sends: it paces the requests to that upstream from the rate the upstream
  delivered before the punishment times the punisher's throttle, doubling every 2 s, until
  twice that rate (slow start, :mod:`mesh.probation`); the rest are answered 429 locally
  (reason ``punished-probation``, ``equilibrium_caller_probation_total``). A flood therefore
  returns as a ramp that the upstream's pods judge before it congests them.

Without a mesh key nothing is signed (and no bid is sent, since an unsigned bid is ignored):
the caller is then anonymous to every inbound side. Back-off is per upstream service: the
harshest of its pods decides, which is the cautious reading of a signal that one pod sent.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

from multidict import CIMultiDict

from mesh.probation import SelfProbation, SelfStanding
from mesh.reputation import ANONYMOUS, DecayingRate
from sidecar.errors import ErrorReason
from sidecar.exchange import Answer, RequestHead, json_answer
from sidecar.membership import MeshMembership
from sidecar.metrics import CallerMetrics
from sidecar.phases import EarlyAnswer, ProxyPhases, RequestContext, RequestHeaders
from wire.bid import APP_BID_HEADER, APP_PRICE_HEADER, format_bid, parse_bid
from wire.demand import sign_demand
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
    SIGNALS,
    SIGNED_REFUSED,
    is_gt_header,
)
from wire.identity import CALLER_ID_PATTERN, BoundRequest, new_nonce, sign_identity
from wire.signals import AnsweredRequest, SignedSignals, verify_signals
from wire.standing import parse_standing

log = logging.getLogger(__name__)

MAX_BACKOFF = 300.0
"""Longest local back-off honoured (seconds), whatever an upstream says."""
MAX_TRACKED_UPSTREAMS = 4096
"""Upstreams whose delivered rate is tracked for probation (the least recent beyond: dropped)."""
DEMAND_TAU = 1.0
"""Time constant (s) of the attempt rate declared in ``X-GT-Demand``: the inbound book's
default ``rate_tau``, so both sides measure the same way."""


class AttemptRates:
    """Per upstream, the exponentially decayed rate of attempts sent (time constant ``tau``),
    for the least recently used ``limit`` upstreams."""

    def __init__(self, tau: float = DEMAND_TAU, limit: int = MAX_TRACKED_UPSTREAMS) -> None:
        self.tau, self.limit = tau, limit
        self._rates: dict[str, DecayingRate] = {}  # least recently used first

    def add(self, upstream: str, now: float) -> float:
        """Count one attempt to ``upstream`` at ``now``; its rate (per second) after it."""
        rate = self._rates.pop(upstream, None) or DecayingRate(self.tau, now)
        rate.add(now)
        self._rates[upstream] = rate
        if len(self._rates) > self.limit:
            del self._rates[next(iter(self._rates))]
        return rate.rate(now)


_SIGNAL_NAMES = (CONGESTION.lower(), REPUTATION.lower(), PRICE.lower(), REFUSED.lower())


class CallerPhases(ProxyPhases):
    """Identity, bid and self-enforced back-off around ``inner`` phases (see module doc)."""

    def __init__(
        self,
        inner: ProxyPhases | None,
        *,
        caller_id: str,
        mesh_key: bytes | None,
        default_bid: float,
        metrics: CallerMetrics,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        membership: MeshMembership | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.inner = inner or ProxyPhases()
        self.membership = membership or MeshMembership()
        self.random_bytes = random_bytes
        self.caller_id = caller_id
        self.mesh_key = mesh_key
        self.default_bid = default_bid
        self.clock = clock
        self.wall_clock = wall_clock
        self.metrics = metrics
        self._probation: dict[str, SelfProbation] = {}  # per upstream, least recent first
        self._shown_punished: set[str] = set()  # upstreams whose punished gauge reads 1
        self.attempts = AttemptRates()
        self.signing = mesh_key is not None and self._valid_id(caller_id)

    @staticmethod
    def _valid_id(caller_id: str) -> bool:
        if CALLER_ID_PATTERN.fullmatch(caller_id) and caller_id != ANONYMOUS:
            return True
        log.warning("sidecar id %r cannot be signed as a caller identity (needs %s): requests "
                    "go out unsigned and count as anonymous", caller_id, CALLER_ID_PATTERN.pattern)
        return False

    def backing_off(self, upstream: str, now: float) -> float:
        """Seconds of back-off left for ``upstream`` (0 when not backing off)."""
        probation = self._probation.get(upstream)
        if probation is None:
            return 0.0
        return max(0.0, probation.until - now)

    def probation(self, upstream: str) -> SelfProbation:
        """The back-off and probation state of ``upstream`` (created on first use)."""
        state = self._probation.pop(upstream, None)
        if state is None:
            state = SelfProbation()
            while len(self._probation) >= MAX_TRACKED_UPSTREAMS:
                del self._probation[next(iter(self._probation))]
        self._probation[upstream] = state  # most recent last
        return state

    # ------------------------------------------------------------ phases

    async def request_filter(
        self, request: RequestHead, ctx: RequestContext
    ) -> Answer | None:
        early = self.request_check(request.headers, ctx)
        if early is not None:
            return json_answer(early.status, early.body, early.headers)
        return await self.inner.request_filter(request, ctx)

    def request_check(self, headers: RequestHeaders, ctx: RequestContext) -> EarlyAnswer | None:
        """Back off from an upstream that punishes this caller; read the app's bid."""
        upstream = ctx.upstream or ""
        state = self._probation.get(upstream)
        paced = state.check(self.clock()) if state is not None else None
        if paced is not None and paced.standing is not SelfStanding.BACKING_OFF \
                and upstream in self._shown_punished:
            self._shown_punished.discard(upstream)
            self.metrics.punished.labels(upstream).set(0)
        if paced is not None and not paced.send:
            left = paced.wait
            if paced.standing is SelfStanding.BACKING_OFF:
                self.metrics.backoff.labels(upstream).inc()
                message = f"upstream {upstream!r} punishes this caller; backing off locally"
                reason = ErrorReason.PUNISHED_BACKOFF
            else:
                self.metrics.probation.labels(upstream).inc()
                message = (f"upstream {upstream!r} punished this caller; on probation its "
                           "sidecar paces it back up")
                reason = ErrorReason.PUNISHED_PROBATION
            return EarlyAnswer(429, {
                "error": message, "reason": reason, "upstream": upstream,
                "retry_after": round(left, 3),
            }, {"Retry-After": str(max(1, math.ceil(left)))})
        raw = headers.get(APP_BID_HEADER)
        if raw is None:
            bid = self.default_bid
        else:
            try:
                bid = parse_bid(raw)
            except WireError as exc:
                self.metrics.bad_app_bids.labels(exc.reason).inc()
                return EarlyAnswer(400, {
                    "error": str(exc).replace(BID, APP_BID_HEADER), "reason": ErrorReason.BAD_BID,
                    "header": APP_BID_HEADER, "upstream": upstream,
                })
        ctx.extra["bid"] = bid
        return self.inner.request_check(headers, ctx)

    def upstream_pick(self, ctx: RequestContext, rng: Any, now: float) -> str | None:
        return self.inner.upstream_pick(ctx, rng, now)

    def upstream_request_filter(self, ctx: RequestContext, headers: CIMultiDict[str]) -> None:
        self.inner.upstream_request_filter(ctx, headers)
        headers.popall(APP_BID_HEADER, None)
        ctx.extra.pop("identity_sent", None)
        if self.mesh_key is None:
            ctx.extra.pop("challenge", None)
            return
        challenge = new_nonce(self.random_bytes(12))  # fresh per attempt
        ctx.extra["challenge"] = challenge
        group = ctx.group  # per group: every Host alias of a service is one count
        rate = self.attempts.add(group.name, self.clock()) if group is not None else None
        for name in [n for n in headers if is_gt_header(n)]:  # X-GT-Retry
            if not self.membership.admits(ctx):
                headers.popall(name, None)
        headers[CHALLENGE] = challenge
        if not self.signing or not self.membership.admits(ctx):
            return
        assert self.mesh_key is not None
        bound = BoundRequest(ctx.method, headers.get("Host") or ctx.authority, ctx.target)
        headers[IDENTITY] = sign_identity(self.caller_id, self.mesh_key, self.wall_clock(),
                                          bound, challenge)
        ctx.extra["identity_sent"] = True
        endpoints = group.usable if group is not None else 0
        demand = sign_demand(rate, endpoints, self.mesh_key, challenge) if rate else None
        if demand is not None:
            headers[DEMAND] = demand
        bid = ctx.extra.get("bid", self.default_bid)
        if isinstance(bid, float | int) and bid > 0:
            headers[BID] = format_bid(float(bid))

    def response_signals(self, ctx: RequestContext, game: dict[str, str]) -> dict[str, str]:
        """Keep the answer's signals only if its ``X-GT-Signals`` verifies (module doc)."""
        game = self.inner.response_signals(ctx, game)
        if not game:  # the common answer: no signal at all, nothing to verify
            return {}
        names = _SIGNAL_NAMES
        signals = SignedSignals(*(game.get(name) for name in names))
        sent = [name for name in (*names, SIGNALS.lower()) if name in game]
        if not sent:
            return {}
        challenge = ctx.extra.get("challenge")
        if self.mesh_key is None or not isinstance(challenge, str):
            self.metrics.bad_signals.labels(SIGNALS.lower(), Reason.UNSIGNED).inc()
            return {}
        verdict = verify_signals(game.get(SIGNALS.lower()), self.mesh_key,
                                 AnsweredRequest(challenge, ctx.method, ctx.target), signals)
        if verdict.reason is not None:
            self.metrics.bad_signals.labels(SIGNALS.lower(), verdict.reason).inc()
            log.info("%s %s: ignored the answer's %s: %s", ctx.upstream, ctx.endpoint,
                     "/".join(sent), verdict.reason)
            return {}
        # signed by a sidecar reached where this attempt went (not relayed by a third party
        # that passed our challenge on: a stranger's finding), wire.signals
        here = verdict.at != "" and verdict.at == ctx.extra.get("peer")
        if here and ctx.endpoint and self.membership.prove(ctx.endpoint):
            log.info("%s %s: a sidecar of the mesh (signed answer)", ctx.upstream, ctx.endpoint)
        believed = {CONGESTION.lower(): signals.congestion} if signals.congestion else {}
        if signals.refused in SIGNED_REFUSED:  # about this attempt (its challenge), whoever
            if here:  # we were: another endpoint may have it (a POST too)
                believed[REFUSED.lower()] = signals.refused
            else:
                self.metrics.bad_signals.labels(SIGNALS.lower(), Reason.ELSEWHERE).inc()
                log.info("%s %s: ignored the answer's %s: signed %s", ctx.upstream,
                         ctx.endpoint, REFUSED, f"at {verdict.at}, not where it was sent"
                         if verdict.at else "by an older sidecar, at no address")
        if verdict.caller == self.caller_id and ctx.extra.get("identity_sent"):
            believed.update({name: value for name, value in zip(
                names[1:3], (signals.reputation, signals.price), strict=True) if value})
        elif ctx.extra.get("identity_sent"):  # signed about someone else: relayed
            self.metrics.bad_signals.labels(SIGNALS.lower(), Reason.WRONG_CALLER).inc()
        return believed

    def response_filter(self, ctx: RequestContext, headers: CIMultiDict[str]) -> None:
        self.inner.response_filter(ctx, headers)
        headers.popall(APP_PRICE_HEADER, None)  # only this sidecar may say what was paid
        price = ctx.game_response_headers.get(PRICE.lower())
        if price is not None:
            try:  # the app learns what its bid cost; a bad value is dropped
                headers[APP_PRICE_HEADER] = format_bid(parse_bid(price))
            except WireError as exc:
                self.metrics.bad_signals.labels(PRICE.lower(), exc.reason).inc()
                log.info("%s: ignored malformed %s %r", ctx.upstream, PRICE, price[:32])
        if not ctx.upstream:
            return
        now = self.clock()
        raw = ctx.game_response_headers.get(REPUTATION.lower())
        standing = None
        if raw is not None:
            try:
                standing = parse_standing(raw)
            except WireError as exc:
                self.metrics.bad_signals.labels(REPUTATION.lower(), exc.reason).inc()
                log.info("%s: ignored %s: %s", ctx.upstream, REPUTATION, exc)
        if standing is not None and standing.punished and standing.retry_after:
            until = now + min(standing.retry_after, MAX_BACKOFF)
            state = self.probation(ctx.upstream)
            before, level = state.standing(now), state.level
            if state.punish(now, until, standing.level):
                self._shown_punished.add(ctx.upstream)
                self.metrics.punished.labels(ctx.upstream).set(1)
                # every answer of a punishment extends it: log its start and level changes only
                if before is not SelfStanding.BACKING_OFF or standing.level != level:
                    log.info("upstream %s punishes %s (level %d, said by %s): backing off "
                             "%.0f s", ctx.upstream, self.caller_id, standing.level,
                             ctx.endpoint, standing.retry_after)
        elif ctx.status is None or ctx.status < 400:
            self.probation(ctx.upstream).delivered(now)  # the rate probation starts from

    def logging(self, ctx: RequestContext, now: float) -> None:
        self.inner.logging(ctx, now)
