"""Routing shifts as log lines: an endpoint the policy moves its traffic off, and back.

Envoy logs an outlier ejection, and the question an operator brings to the logs is the same
here: why did this pod stop getting traffic at 03:12, and when did it get it back? The
policies here do not eject; they move weight. So the lines come from the weights of each
tick's snapshot: an endpoint whose share falls below :data:`SHUNNED` of its fair share (one
over the usable endpoints) is *shifted off*, and one that climbs back above
:data:`RESTORED` of it is *back*. The gap between the two marks is the hysteresis that keeps a
share hovering at one mark from logging every tick. Each line says why, from the snapshot:
the endpoint's latency estimate against the best one's, its failures among its requests of
the last :data:`WINDOW` seconds, and whether the signaler's plan was being followed.

Pure bookkeeping: :class:`ShiftLog` returns the lines; the runner logs them (INFO).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from mesh.policy import EndpointView, PolicySnapshot

SHUNNED = 0.25  # of the fair share: below it, traffic was shifted off the endpoint
RESTORED = 0.5  # of the fair share: above it again, the endpoint is back
WINDOW = 10.0  # seconds of requests and failures a line reports
DECIDING_POLICY = "equilibrium"  # the policy whose weights are its routing decision (the
# baselines' are the shares they happened to send, noisy at low rates)


@dataclass(slots=True)
class _Seen:
    shunned: bool = False
    counts: deque[tuple[float, int, int]] = field(default_factory=deque)  # (at, requests, fails)

    def recent(self, view: EndpointView, now: float) -> tuple[int, int]:
        """Requests and failures of the last WINDOW seconds (counts are cumulative)."""
        counts = self.counts
        counts.append((now, view.requests, view.failures))
        while counts[0][0] < now - WINDOW:  # the current sample always stays
            counts.popleft()
        _, requests, failures = counts[0]
        return max(0, view.requests - requests), max(0, view.failures - failures)


@dataclass(slots=True)
class ShiftLog:
    """Each upstream's endpoints that traffic was shifted off (see the module docstring)."""

    _seen: dict[str, dict[str, _Seen]] = field(default_factory=dict)

    def observe(self, upstream: str, snapshot: PolicySnapshot, now: float) -> list[str]:
        """The lines for what changed since the last snapshot of ``upstream``."""
        views = list(snapshot.endpoints)
        seen = self._seen.setdefault(upstream, {})
        if snapshot.policy != DECIDING_POLICY:  # the baselines' weights are observed shares
            return []
        for gone in set(seen) - {v.endpoint for v in views}:
            del seen[gone]
        usable = snapshot.usable if snapshot.usable is not None else len(views)
        if usable < 2:  # a lone endpoint has nowhere to shift to
            for view in views:
                seen.setdefault(view.endpoint, _Seen()).recent(view, now)
            return []
        fair = 1.0 / usable
        finite = [v.latency_estimate for v in views
                  if math.isfinite(v.latency_estimate) and v.latency_estimate > 0]
        best = min(finite) if finite else math.nan
        lines = []
        for view in views:
            state = seen.setdefault(view.endpoint, _Seen())
            requests, failures = state.recent(view, now)
            if not state.shunned and view.weight < SHUNNED * fair:
                state.shunned = True
                lines.append(
                    f"upstream {upstream}: traffic shifted off {view.endpoint} (share "
                    f"{view.weight:.1%} of {usable} endpoints; "
                    f"{_why(view, best, requests, failures, snapshot.following)})")
            elif state.shunned and view.weight > RESTORED * fair:
                state.shunned = False
                lines.append(
                    f"upstream {upstream}: {view.endpoint} back in rotation (share "
                    f"{view.weight:.1%} of {usable} endpoints; "
                    f"{_why(view, best, requests, failures, snapshot.following)})")
        return lines

    def keep(self, upstreams: set[str]) -> None:
        """Forget the upstreams not in ``upstreams`` (removed by a reload or discovery)."""
        for gone in set(self._seen) - upstreams:
            del self._seen[gone]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if math.isfinite(seconds) else "unmeasured"


def _why(view: EndpointView, best: float, requests: int, failures: int,
         following: bool) -> str:
    parts = [f"latency estimate {_ms(view.latency_estimate)}, best {_ms(best)}",
             f"{failures} failures in {requests} requests in the last {WINDOW:g} s"]
    if following:
        parts.append("following the signaler's plan")
    return "; ".join(parts)
