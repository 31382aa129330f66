"""The mesh dashboard: one read-only page, its static files, and the frame it draws.

Owns the page (``dashboard/static/``: ``index.html``, ``dashboard.js``, ``dashboard.css``,
package data, nothing from a CDN) and the live feed both admin listeners serve with it
(:mod:`dashboard.feed`). The signaler fills the frame from the regret summaries and plans it
holds (:mod:`signaler.dashboard`), each sidecar from its own ``/debug/state``
(:mod:`sidecar.dashboard`); the page draws whichever it gets. It must not import the services
(they import it) and holds no secret: a frame carries ids, endpoints and numbers only.

The frame (version 1), JSON, times in unix seconds, latencies and gaps in seconds, non-finite
numbers as null::

    {"v": 1, "source": "signaler" | "sidecar", "id": str, "boot": float, "time": float,
     "seq": int, "note": str | null,
     "redis": bool, "epoch": int,            # the signaler's only
     "upstreams": [{
        "name": str, "leader": bool | null,
        "endpoints": [{"endpoint": str, "share": float, "regret": float | null,
                       "latency": {"estimate": float | null, "p50": float | null,
                                   "p99": float | null},
                       "requests": int, "failures": int, "tokens": int | null}],
        "nash_gap": float | null, "ce_gap": float | null, "plan_ce_gap": float | null,
        "sidecars": [{"id": str, "following": bool | null, "demand": float | null,
                      "distance": float | null}],     # at most 50: see sidecars_total
        "sidecars_total": int, "sidecars_following": int,   # the signaler's only
        "plan": null | {"solver": str, "status": str, "tokens": int, "solve_seconds": float,
                        "expected_latency": float, "played_over_optimum": float | null,
                        "plan_over_optimum": float | null, "kept": bool}}],
     "policing": [{"sidecar": str, "congestion": float, "capacity": float,
                   "price": float, "queue": int, "admitted": float, "throttled": float,
                   "callers": [{"caller": str, "phase": str, "level": int,
                                "reputation": float, "rate": float}]}]}

``share`` is the endpoint's share of the traffic (0..1); ``boot`` is when the serving process
started (a page that sees it change knows the process restarted).
"""

from __future__ import annotations

FRAME_VERSION = 1
