"""The admin listener: ``/metrics``, ``/healthz``, ``/readyz``, ``/debug/state`` and the
sidecar's own dashboard (``/dashboard``: :mod:`dashboard.feed`, frames by
:mod:`sidecar.dashboard` from ``/debug/state``).

The probes' paths and JSON are :mod:`wire.admin`'s (the signaler's admin app answers the same);
``/readyz`` says ``starting`` or ``draining`` while not ready. Owns the aiohttp app and the JSON
shape of ``/debug/state`` (the demo and the benchmark parse it)::

    {"id": str, "strategy": str, "policy": str, "draining": bool,
     "upstreams": {NAME: {"policy": str, "nash_gap": float, "ce_gap": float, "flapping": float,
                          "converged": bool, "following": bool, "dormant": bool,
                          "endpoints": [{"endpoint": url, "weight": float,
                                         "latency_estimate": float, "regret": float,
                                         "in_flight": int, "requests": int, "failures": int,
                                         "overruled": bool, "bad": bool, "usable": bool,
                                         "stalled": float, "long_in_flight": int}]}},
                         # dormant (a discovered upstream before its first request): its
                         # endpoints with weight 0 and no statistics
     "inbound": null | {                 # null (or absent): no --inbound listener
         "mode": str, "app": url, "mesh_key": bool,
         "in_flight": int, "congestion": float, "congested": bool,
         "capacity": float, "fair_share": float,
         "concurrency": {"limit": int, "estimated_limit": float, "in_flight": int,
                         "probing": bool, "min_rtt": float | null, "sample_rtt": float | null,
                         "capacity_estimate": float | null},
         "auction": {"last_price": float, "queue_length": int,
                     "highest_waiting_bid": float | null},
         "callers_tracked": int, "callers_active": int, "punished_callers": int,
         "callers": [{"caller": str, "phase": "good" | "punished" | "probation",
                      "reputation": float, "level": int, "punishments": int,
                      "punished_until": RFC 3339 UTC | null, "punished_for": float,
                      "rate": float, "retry_rate": float, "demand": float | null,
                      "recent": {"admitted": float, "throttled": float},
                      "budget": {"balance": float, "reserved": float, "available": float,
                                 "cap": float} | null}]}}

The upstreams are read from the last snapshot of each upstream (rebuilt at policy ticks), the
inbound side from :meth:`sidecar.inbound.InboundProxy.snapshot`; the admin listener never
touches the request path. :class:`sidecar.runner.SidecarRunner` adds the ``inbound`` section
when it builds the process.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from dashboard.feed import DashboardFeed
from mesh.policy import PolicySnapshot
from sidecar.dashboard import SidecarDashboard
from sidecar.metrics import CONTENT_TYPE, SidecarMetrics
from sidecar.upstreams import UpstreamTable
from wire.admin import DEBUG_STATE_PATH, HEALTHZ_PATH, METRICS_PATH, READYZ_PATH, liveness
from wire.admin import readiness as ready_answer

if TYPE_CHECKING:
    from sidecar.inbound import InboundSnapshot


@dataclass(slots=True)
class Readiness:
    """What the process tells its admin listener: ready once listeners are bound and config
    loaded, not ready while draining."""

    started: bool = False
    draining: bool = False

    @property
    def ready(self) -> bool:
        return self.not_ready is None

    @property
    def not_ready(self) -> str | None:
        """Why ``/readyz`` answers 503 (None: ready)."""
        if self.draining:
            return "draining"
        return None if self.started else "starting"


def _num(value: float) -> float:
    return float(value) if math.isfinite(value) else 0.0


def _opt(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _date(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="milliseconds")


def ce_gap(matrix: Any) -> float:
    """The largest off-diagonal conditional regret D(j, k) (>= 0): the sidecar's distance from
    a correlated equilibrium at its empirical play (Hart & Mas-Colell 2000)."""
    return max((_num(v) for j, row in enumerate(matrix) for k, v in enumerate(row) if j != k),
               default=0.0) if matrix else 0.0


def snapshot_json(snapshot: PolicySnapshot | None, policy_name: str,
                  dormant: tuple[str, ...] | None = None) -> dict[str, Any]:
    """An upstream's part of ``/debug/state``; ``dormant``: the endpoints of a group that is
    dormant (:mod:`sidecar.upstreams`), listed without statistics."""
    if snapshot is None or dormant is not None:
        return {
            "policy": policy_name, "nash_gap": 0.0, "ce_gap": 0.0, "flapping": 0.0,
            "converged": False, "following": False, "dormant": dormant is not None,
            "endpoints": [
                {"endpoint": e, "weight": 0.0, "latency_estimate": 0.0, "regret": 0.0,
                 "in_flight": 0, "requests": 0, "failures": 0, "overruled": False,
                 "bad": False, "usable": True, "stalled": 0.0, "long_in_flight": 0}
                for e in dormant or ()
            ],
        }
    return {
        "dormant": False,
        "policy": snapshot.policy,
        "nash_gap": _num(snapshot.nash_gap),
        "ce_gap": max(ce_gap(snapshot.regret_matrix), 0.0),
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
                "overruled": bool(view.overruled),
                "bad": bool(view.bad),
                "usable": bool(view.usable),
                "stalled": _num(view.stalled),
                "long_in_flight": int(view.long_in_flight),
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
            group.name: snapshot_json(group.snapshot, policy,
                                      group.endpoints if group.dormant else None)
            for group in sorted(table, key=lambda g: g.name)
        },
    }


def inbound_json(snap: InboundSnapshot | None) -> dict[str, Any] | None:
    """The ``inbound`` section of ``/debug/state`` (None without an inbound listener)."""
    if snap is None:
        return None
    book, lim, auction = snap.book, snap.concurrency, snap.auction
    callers = []
    for s in book.callers:
        budget = auction.budgets.get(s.caller)
        callers.append({
            "caller": s.caller,
            "phase": s.phase.value,
            "reputation": round(_num(s.reputation), 4),
            "level": int(s.level),
            "punishments": int(s.punishments),
            "punished_until": (_date(snap.wall(s.punished_until))
                               if s.punished_until is not None else None),
            "punished_for": round(_num(s.punished_for), 3),
            "rate": round(_num(s.rate), 3),
            "retry_rate": round(_num(s.retry_rate), 3),
            # the even-spread demand its sidecar declared (X-GT-Demand): the norm judges the
            # smaller of it and ``rate`` (docs/policing.md); null: none declared
            "demand": None if s.demand is None else round(_num(s.demand), 3),
            "recent": {"admitted": round(_num(s.admitted), 1),
                       "throttled": round(_num(s.throttled), 1)},
            "budget": None if budget is None else {
                "balance": round(_num(budget.balance), 3),
                "reserved": round(_num(budget.reserved), 3),
                "available": round(_num(budget.available), 3),
                "cap": _num(budget.cap),
            },
        })
    return {
        "mode": snap.mode,
        "app": snap.app,
        "mesh_key": snap.mesh_key,
        "in_flight": int(snap.in_flight),
        "congestion": round(_num(snap.congestion), 4),
        "congested": bool(book.congested),
        "capacity": round(_num(snap.capacity), 3),
        "fair_share": round(_num(book.capacity / book.active_callers), 3),
        "concurrency": {
            "limit": int(lim.limit),
            "estimated_limit": round(_num(lim.estimated_limit), 3),
            "in_flight": int(lim.in_flight),
            "probing": bool(lim.probing),
            "long_running": int(lim.long_running),
            "long_paths": list(snap.long_paths),  # declared (policing.long_paths)
            "min_rtt": _opt(lim.min_rtt),
            "sample_rtt": _opt(lim.sample_rtt),
            "capacity_estimate": _opt(lim.capacity_estimate),
        },
        "auction": {
            "last_price": _num(auction.last_price),
            "queue_length": int(auction.queue_length),
            "highest_waiting_bid": _opt(auction.highest_waiting_bid),
        },
        "callers_tracked": int(book.tracked),
        "callers_active": int(book.active_callers),
        "punished_callers": int(book.punished),
        "callers": callers,
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
        status, body = liveness()
        return web.json_response(body, status=status)

    async def readyz(_: web.Request) -> web.Response:
        status, body = ready_answer(readiness.not_ready)
        return web.json_response(body, status=status)

    async def debug(_: web.Request) -> web.Response:
        return web.json_response(state())

    app = web.Application()
    app.router.add_get(METRICS_PATH, metrics_handler)
    app.router.add_get(HEALTHZ_PATH, healthz)
    app.router.add_get(READYZ_PATH, readyz)
    app.router.add_get(DEBUG_STATE_PATH, debug)
    DashboardFeed(SidecarDashboard(state)).attach(app)
    return app
