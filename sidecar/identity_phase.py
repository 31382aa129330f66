"""The outbound side of policing: sign the caller's identity, carry its bid, back off when punished.

``CallerPhases`` wraps whatever :class:`sidecar.phases.ProxyPhases` are active (routing
defaults, correlated-equilibrium recommendations, …) and adds, on every request the app
sends through the outbound listener:

- ``X-GT-Identity``: this sidecar's ``--id`` signed with the mesh key (:mod:`wire.identity`),
  so the upstream's inbound side can tell callers apart and police each one;
- ``X-GT-Bid``: the app's bid from the ``X-Equilibrium-Bid`` request header (never forwarded
  itself), or the configured ``policing.default_bid``; a malformed app bid is answered 400
  and counted, never forwarded; the price charged comes back to the app as
  ``X-Equilibrium-Price`` (the upstream's ``X-GT-Price``, which is stripped like every
  ``X-GT-*``);
- **self-enforced punishment**: when an upstream's ``X-GT-Reputation`` says this caller is
  punished, the sidecar answers its app 429 (with ``Retry-After``) *without sending* until
  the punishment's remaining time has passed. In the repeated game this is the deviator's
  own sidecar playing the punishment phase: the defection (the app's flood) costs the
  upstream nothing while it lasts, and the caller's reputation recovers (silence is
  cooperation), so it is forgiven on time.

Without a mesh key nothing is signed (and no bid is sent, since an unsigned bid is ignored):
the caller is then anonymous to every inbound side. Back-off is per upstream service: the
harshest of its pods decides, which is the cautious reading of a signal that one pod sent.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from multidict import CIMultiDict

from mesh.reputation import ANONYMOUS
from sidecar.errors import ErrorReason
from sidecar.exchange import Answer, RequestHead, json_answer
from sidecar.metrics import CallerMetrics
from sidecar.phases import EarlyAnswer, ProxyPhases, RequestContext, RequestHeaders
from wire.bid import APP_BID_HEADER, APP_PRICE_HEADER, format_bid, parse_bid
from wire.errors import WireError
from wire.headers import BID, IDENTITY, PRICE, REPUTATION
from wire.identity import CALLER_ID_PATTERN, sign_identity
from wire.standing import parse_standing

log = logging.getLogger(__name__)

MAX_BACKOFF = 300.0
"""Longest local back-off honoured (seconds), whatever an upstream says."""


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
    ) -> None:
        self.inner = inner or ProxyPhases()
        self.caller_id = caller_id
        self.mesh_key = mesh_key
        self.default_bid = default_bid
        self.clock = clock
        self.wall_clock = wall_clock
        self.metrics = metrics
        self._backoff_until: dict[str, float] = {}
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
        until = self._backoff_until.get(upstream)
        if until is None:
            return 0.0
        if now >= until:
            del self._backoff_until[upstream]
            self.metrics.punished.labels(upstream).set(0)
            return 0.0
        return until - now

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
        left = self.backing_off(upstream, self.clock())
        if left > 0:
            self.metrics.backoff.labels(upstream).inc()
            return EarlyAnswer(429, {
                "error": f"upstream {upstream!r} punishes this caller; backing off locally",
                "reason": ErrorReason.PUNISHED_BACKOFF, "upstream": upstream,
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
        if not self.signing:
            return
        assert self.mesh_key is not None
        headers[IDENTITY] = sign_identity(self.caller_id, self.mesh_key, self.wall_clock())
        bid = ctx.extra.get("bid", self.default_bid)
        if isinstance(bid, float | int) and bid > 0:
            headers[BID] = format_bid(float(bid))

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
        raw = ctx.game_response_headers.get(REPUTATION.lower())
        if raw is None or not ctx.upstream:
            return
        try:
            standing = parse_standing(raw)
        except WireError as exc:
            self.metrics.bad_signals.labels(REPUTATION.lower(), exc.reason).inc()
            log.info("%s: ignored %s: %s", ctx.upstream, REPUTATION, exc)
            return
        if standing.punished and standing.retry_after:
            now = self.clock()
            until = now + min(standing.retry_after, MAX_BACKOFF)
            if until > self._backoff_until.get(ctx.upstream, -math.inf):
                self._backoff_until[ctx.upstream] = until
                self.metrics.punished.labels(ctx.upstream).set(1)
                log.info("upstream %s punishes %s (level %d): backing off %.0f s", ctx.upstream,
                         self.caller_id, standing.level, standing.retry_after)

    def logging(self, ctx: RequestContext, now: float) -> None:
        self.inner.logging(ctx, now)
