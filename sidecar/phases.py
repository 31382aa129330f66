"""The outbound proxy's named phases (after pingora's ``ProxyHttp``) and per-request context.

A request goes through these hooks, in this order; every hook has a working default, so a
feature (the caller's identity and bid: :mod:`sidecar.identity_phase`) overrides only the
phases it needs by subclassing ``ProxyPhases`` and handing the instance to the runner::

    request_filter          may answer early (return an ``Answer``) or annotate ``ctx``; its
                            header-only part, ``request_check``, is what HTTP/2 runs
    upstream_pick           choose an endpoint (default: the upstream's policy), per attempt
    upstream_request_filter edit the headers sent upstream (default: X-GT-Retry)
    response_signals        which of the answer's X-GT-* signals to believe (default: all)
    response_filter         edit the headers handed back to the app (X-GT-* already consumed)
    logging                 after the response finished or failed (default: debug log line)

The forwarding itself (hop-by-hop rules, streaming, retries, metrics) is not a hook: it is
the proxy's job and stays correct whatever the phases do.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Protocol

from multidict import CIMultiDict

from sidecar.exchange import Answer, RequestHead
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
    long: bool = False  # a declared long request of its upstream (wire.long_paths)

    @property
    def upstream_label(self) -> str:
        """The ``upstream`` label of this request's metrics: its configured group's name, or
        "" before one was found (an unknown Host, a loop, a bad target): never the Host as
        the app sent it, which would make one series per made-up name."""
        group = self.group
        return group.name if group is not None else ""


class RequestHeaders(Protocol):
    """Request headers as the phases read them (aiohttp's, or an HTTP/2 block's)."""

    def get(self, key: str, /) -> str | None: ...


@dataclass(frozen=True, slots=True)
class EarlyAnswer:
    """An answer to the app instead of forwarding: the HTTP status, the JSON body (with
    ``error`` and ``reason``) and more headers; HTTP/2 turns it into a gRPC status for a
    gRPC caller."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


UNSENT = "unsent_attempts"
"""``ctx.extra`` key: earlier attempts of this request that never connected (connect timeout or
error), or that the endpoint's sidecar refused before its app saw them (a signed
``X-GT-Refused``), so no upstream's app can have seen them."""


def unsent_attempts(ctx: RequestContext) -> int:
    """Earlier attempts of ``ctx``'s request that never reached any upstream."""
    value = ctx.extra.get(UNSENT, 0)
    return value if isinstance(value, int) else 0


class ProxyPhases:
    """Default behaviour of every phase; subclass and override to extend the proxy."""

    async def request_filter(
        self, request: RequestHead, ctx: RequestContext
    ) -> Answer | None:
        """Return an answer to give the app without forwarding; default: forward."""
        return None

    def request_check(self, headers: RequestHeaders, ctx: RequestContext) -> EarlyAnswer | None:
        """The part of ``request_filter`` that needs only the headers (the HTTP/2 path runs
        this one); default: forward."""
        return None

    def upstream_pick(
        self, ctx: RequestContext, rng: random.Random, now: float
    ) -> str | None:
        """An endpoint of ``ctx.group`` not tried yet for this request, or None."""
        assert ctx.group is not None
        return ctx.group.policy.pick(rng, now, frozenset(ctx.tried))

    def upstream_request_filter(self, ctx: RequestContext, headers: CIMultiDict[str]) -> None:
        """Edit the headers sent upstream (app's X-GT-* are already stripped)."""
        resent = ctx.attempt - unsent_attempts(ctx)
        if resent > 0:
            headers[RETRY] = str(resent)  # 1 = first re-send

    def response_signals(self, ctx: RequestContext, game: dict[str, str]) -> dict[str, str]:
        """The answer's game headers (lower-case names) that may be acted on; default: all.
        Called before anything reads them (:mod:`sidecar.identity_phase` keeps only signed
        ones)."""
        return game

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
