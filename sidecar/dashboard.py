"""A sidecar's own dashboard frame, built from its ``/debug/state``.

Owns turning the sidecar's ``/debug/state`` (:mod:`sidecar.admin`) into the frame
:mod:`dashboard` draws, so a single sidecar without Redis has the same page as the signaler,
for its own view: its routing per upstream and, with an inbound listener, its policing. Reads
the state callable only; never touches the request path.

An endpoint's **share** is its share of the requests this sidecar sent since the previous
frame (the routing weight while it sent none); latency p50/p99 are the signaler's (from the
regret summaries), so here they are null and the estimate is the policy's. The **CE gap** is
the largest off-diagonal conditional regret D(j, k) of the sidecar (``ce_gap`` in
``/debug/state``); the **Nash gap** the policy's own; the sidecar **follows** when its policy
routes by the signaler's recommendation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

NOTE_LOCAL = "one sidecar's view (the signaler's /dashboard has the mesh)"


class SidecarDashboard:
    """Builds a sidecar's frames from ``state()`` (the ``/debug/state`` dict)."""

    def __init__(self, state: Callable[[], Mapping[str, Any]]) -> None:
        self.state = state
        self._counts: dict[tuple[str, str], int] = {}

    def __call__(self) -> dict[str, Any]:
        state = self.state()
        sidecar = str(state.get("id", ""))
        upstreams = [self.upstream(name, up, sidecar)
                     for name, up in sorted((state.get("upstreams") or {}).items())]
        inbound = state.get("inbound")
        return {"source": "sidecar", "id": sidecar, "note": NOTE_LOCAL,
                "upstreams": upstreams,
                "policing": [] if not inbound else [policing(sidecar, inbound)]}

    def upstream(self, name: str, up: Mapping[str, Any], sidecar: str) -> dict[str, Any]:
        endpoints = list(up.get("endpoints") or [])
        deltas = []
        for e in endpoints:
            key = (name, str(e.get("endpoint")))
            count = int(e.get("requests") or 0)
            deltas.append(max(0, count - self._counts.get(key, count)))
            self._counts[key] = count
        sent = sum(deltas)
        rows = []
        for e, delta in zip(endpoints, deltas, strict=True):
            rows.append({
                "endpoint": e.get("endpoint"),
                "share": delta / sent if sent else float(e.get("weight") or 0.0),
                "regret": e.get("regret"),
                "latency": {"estimate": e.get("latency_estimate"), "p50": None, "p99": None},
                "requests": int(e.get("requests") or 0),
                "failures": int(e.get("failures") or 0),
                "tokens": None,
            })
        following = bool(up.get("following"))
        return {
            "name": name, "leader": None, "endpoints": rows,
            "nash_gap": up.get("nash_gap"), "ce_gap": up.get("ce_gap"), "plan_ce_gap": None,
            "sidecars": [{"id": sidecar, "following": following, "demand": None,
                          "distance": None}],
            "plan": None,
        }


def policing(sidecar: str, inbound: Mapping[str, Any]) -> dict[str, Any]:
    """The policing part of a frame from ``/debug/state``'s ``inbound`` section."""
    callers = list(inbound.get("callers") or [])
    auction = inbound.get("auction") or {}
    return {
        "sidecar": sidecar,
        "congestion": inbound.get("congestion"),
        "capacity": inbound.get("capacity"),
        "price": auction.get("last_price"),
        "queue": auction.get("queue_length"),
        "admitted": sum(float((c.get("recent") or {}).get("admitted") or 0.0) for c in callers),
        "throttled": sum(float((c.get("recent") or {}).get("throttled") or 0.0)
                         for c in callers),
        "callers": [{"caller": c.get("caller"), "phase": c.get("phase"),
                     "level": c.get("level"), "reputation": c.get("reputation"),
                     "rate": c.get("rate")} for c in callers],
    }
