"""The signaler's admin listener: ``/metrics``, ``/healthz``, ``/readyz``, ``/debug/state`` and
the mesh dashboard (``/dashboard`` and its stream, :mod:`dashboard.feed`).

Owns the aiohttp app and :class:`SignalerHealth`, what the service tells it. The probes' JSON
and paths are :mod:`wire.admin`'s (the sidecar's admin app answers the same); ``/debug/state``
is the service's own shape (:meth:`signaler.service.SignalerService.state`: leadership,
sidecars, the last plan per upstream); the dashboard's frame is :mod:`signaler.dashboard`'s.
Never touches Redis or the planner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from dashboard.feed import DashboardFeed
from signaler.metrics import CONTENT_TYPE, SignalerMetrics
from wire.admin import (
    DEBUG_STATE_PATH,
    HEALTHZ_PATH,
    METRICS_PATH,
    READYZ_PATH,
    json_safe,
    liveness,
    readiness,
)


@dataclass(slots=True)
class SignalerHealth:
    """Alive while the loop runs; ready once an epoch completed with Redis reachable."""

    started: bool = False
    redis_ok: bool = False
    stopping: bool = False
    refused: str | None = None  # what Redis refused last (wire.store.refusal), until it serves

    @property
    def ready(self) -> bool:
        return self.not_ready is None

    @property
    def not_ready(self) -> str | None:
        """Why ``/readyz`` answers 503 (None: ready)."""
        if self.stopping:
            return "stopping"
        if not self.started:
            return "starting"
        if self.refused is not None:
            return f"redis-refused-{self.refused}"  # a setting to fix: user, password, ACL
        return None if self.redis_ok else "redis-unreachable"


def make_admin_app(
    metrics: SignalerMetrics, health: SignalerHealth, state: Callable[[], dict[str, Any]],
    dashboard: Callable[[], dict[str, Any]] | None = None,
) -> web.Application:
    """``/metrics`` (Prometheus text), ``/healthz``, ``/readyz`` (503 until ready or while
    stopping), ``/debug/state`` (JSON: leadership, sidecars, last plan per upstream) and, given
    ``dashboard`` (a frame builder, :class:`signaler.dashboard.SignalerDashboard`), the page."""

    async def metrics_handler(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def healthz(_: web.Request) -> web.Response:
        status, body = liveness()
        return web.json_response(body, status=status)

    async def readyz(_: web.Request) -> web.Response:
        status, body = readiness(health.not_ready)
        return web.json_response(body, status=status)

    async def debug_state(_: web.Request) -> web.Response:
        return web.json_response(json_safe(state()))

    app = web.Application()
    app.router.add_get(METRICS_PATH, metrics_handler)
    app.router.add_get(HEALTHZ_PATH, healthz)
    app.router.add_get(READYZ_PATH, readyz)
    app.router.add_get(DEBUG_STATE_PATH, debug_state)
    if dashboard is not None:
        DashboardFeed(dashboard).attach(app)
    return app
