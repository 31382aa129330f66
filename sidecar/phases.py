"""The outbound proxy's named phases (after pingora's ``ProxyHttp``) and per-request context.

A request goes through these hooks, in this order; every hook has a working default, so a
feature (the caller's identity and bid: :mod:`sidecar.identity_phase`) overrides only the
phases it needs by subclassing ``ProxyPhases`` and handing the instance to the runner::

    request_filter          may answer early (return a response) or annotate ``ctx``
    upstream_pick           choose an endpoint (default: the upstream's policy), per attempt
    upstream_request_filter edit the headers sent upstream (default: X-GT-Regret, X-GT-Retry)
    response_filter         edit the headers handed back to the app (X-GT-* already consumed)
    logging                 after the response finished or failed (default: debug log line)

The forwarding itself (hop-by-hop rules, streaming, retries, metrics) is not a hook: it is
the proxy's job and stays correct whatever the phases do.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from aiohttp import web
from multidict import CIMultiDict

from sidecar.upstreams import UpstreamGroup
from wire.headers import RETRY

log = logging.getLogger("sidecar.access")


@dataclass(slots=True)
class RequestContext:
    """State of one proxied request, shared by all phases."""

    started: float  # monotonic seconds
    method: str
    target: str  # origin-form path and query, as received
    authority: str  # Host (or absolute-form authority) as the app sent it
    upstream: str | None = None
    group: UpstreamGroup | None = None
    endpoint: str | None = None
    tried: list[str] = field(default_factory=list)
    attempt: int = 0  # 0 for the original request, n for the n-th retry
    status: int | None = None
    error_reason: str | None = None
    game_response_headers: dict[str, str] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)  # for overriding phases


class ProxyPhases:
    """Default behaviour of every phase; subclass and override to extend the proxy."""

    async def request_filter(
        self, request: web.Request, ctx: RequestContext
    ) -> web.StreamResponse | None:
        """Return a response to answer the app without forwarding; default: forward."""
        return None

    def upstream_pick(
        self, ctx: RequestContext, rng: random.Random, now: float
    ) -> str | None:
        """An endpoint of ``ctx.group`` not tried yet for this request, or None."""
        assert ctx.group is not None
        return ctx.group.policy.pick(rng, now, frozenset(ctx.tried))

    def upstream_request_filter(self, ctx: RequestContext, headers: CIMultiDict[str]) -> None:
        """Edit the headers sent upstream (app's X-GT-* are already stripped)."""
        if ctx.attempt > 0:
            headers[RETRY] = str(ctx.attempt)  # 1 = first retry

    def response_filter(self, ctx: RequestContext, headers: CIMultiDict[str]) -> None:
        """Edit the response headers handed to the app (upstream X-GT-* already consumed)."""

    def logging(self, ctx: RequestContext, now: float) -> None:
        """Called once per request after it finished or failed."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s %s%s -> %s %s %s attempts=%d %.1fms",
                ctx.method, ctx.authority, ctx.target, ctx.endpoint, ctx.status,
                ctx.error_reason or "", ctx.attempt + 1, (now - ctx.started) * 1000,
            )
