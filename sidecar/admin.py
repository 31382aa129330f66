"""The admin listener: ``/metrics``, ``/healthz``, ``/readyz`` and ``/debug/state``.

Owns the JSON shape of ``/debug/state`` (the demo and the benchmark parse it)::

    {"id": str, "strategy": str, "policy": str, "draining": bool,
     "upstreams": {NAME: {"policy": str, "nash_gap": float, "flapping": float,
                          "converged": bool, "following": bool,
                          "endpoints": [{"endpoint": url, "weight": float,
                                         "latency_estimate": float, "regret": float,
                                         "in_flight": int, "requests": int, "failures": int}]}}}

Everything is read from the last snapshot of each upstream (rebuilt at policy ticks); the
admin listener never touches the request path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from mesh.policy import PolicySnapshot
from sidecar.metrics import CONTENT_TYPE, SidecarMetrics
from sidecar.upstreams import UpstreamTable


@dataclass(slots=True)
class Readiness:
    """Ready once listeners are bound and config loaded; not ready while draining."""

    started: bool = False
    draining: bool = False

    @property
    def ready(self) -> bool:
        return self.started and not self.draining


def _num(value: float) -> float:
    return float(value) if math.isfinite(value) else 0.0


def snapshot_json(snapshot: PolicySnapshot | None, policy_name: str) -> dict[str, Any]:
    if snapshot is None:
        return {
            "policy": policy_name, "nash_gap": 0.0, "flapping": 0.0, "converged": False,
            "following": False, "endpoints": [],
        }
    return {
        "policy": snapshot.policy,
        "nash_gap": _num(snapshot.nash_gap),
        "flapping": _num(snapshot.flapping),
        "converged": bool(snapshot.converged),
        "following": bool(snapshot.following),
        "endpoints": [
            {
                "endpoint": view.endpoint,
                "weight": _num(view.weight),
                "latency_estimate": _num(view.latency_estimate),
                "regret": _num(view.regret),
                "in_flight": int(view.in_flight),
                "requests": int(view.requests),
                "failures": int(view.failures),
            }
            for view in snapshot.endpoints
        ],
    }


def debug_state(
    *, sidecar_id: str, strategy: str, policy: str, draining: bool, table: UpstreamTable
) -> dict[str, Any]:
    return {
        "id": sidecar_id,
        "strategy": strategy,
        "policy": policy,
        "draining": draining,
        "upstreams": {
            group.name: snapshot_json(group.snapshot, policy)
            for group in sorted(table, key=lambda g: g.name)
        },
    }


def make_admin_app(
    *,
    metrics: SidecarMetrics,
    readiness: Readiness,
    state: Callable[[], dict[str, Any]],
) -> web.Application:
    async def metrics_handler(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_: web.Request) -> web.Response:
        if readiness.ready:
            return web.json_response({"status": "ready"})
        status = "draining" if readiness.draining else "starting"
        return web.json_response({"status": status}, status=503)

    async def debug(_: web.Request) -> web.Response:
        return web.json_response(state())

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/debug/state", debug)
    return app
