"""Routing shifts as log lines: an endpoint the policy moves its traffic off, and back.

Envoy logs an outlier ejection, and the question an operator brings to the logs is the same
here: why did this pod stop getting traffic at 03:12, and when did it get it back? The
policies here do not eject; they move weight. So the lines come from the weights of each
tick's snapshot. An endpoint is *in rotation* once its share reaches :data:`RESTORED` of its
fair share (one over the usable endpoints); one in rotation whose share stays below
:data:`SHUNNED` of it for :data:`DWELL` seconds is *shifted off*, and one shifted off whose
share stays above :data:`RESTORED` of it for as long is *back*; each line says how long ago
the share crossed its mark (the dwell: the line comes that much later, and an operator
reading "back in rotation" must not take its time for the return's, a stranger's finding).
The gap between the marks and the dwell keep a share that wanders with the noise of
near-equal pods from logging (the policy's own weights do wander). The anti-herd cap keeps
every endpoint above a floor when there are few (with two, and a cap of 80 %, the other
keeps 20 %): an endpoint held at that floor has had its traffic shifted off as far as the
cap allows, so the low mark is never below just above the floor, and the high mark stays
above it. An endpoint new to the upstream (a scale-up, a reload) ramps in from nothing and
is not said to be shifted off before it was ever in rotation. Each line says why, from the
snapshot: the endpoint's latency estimate against the best one's, its failures among its
requests of the last :data:`WINDOW` seconds, whether it is out of use (ejected or draining:
its share is nothing and it does not count among the usable endpoints), and whether the
signaler's plan was being followed. An ejection (failures in a row, or a hang) is said at
once, whatever the shares: a hang's is over in seconds, before any share could stay past a
mark for the dwell.

Pure bookkeeping: :class:`ShiftLog` returns the lines; the runner logs them (INFO).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from mesh.policy import EndpointView, PolicySnapshot

SHUNNED = 0.25  # of the fair share: below it (for DWELL), traffic was shifted off
RESTORED = 0.5  # of the fair share: above it (for DWELL), the endpoint is in rotation
DWELL = 10.0  # seconds a share must stay past a mark before a line says it crossed
FLOOR_MARGIN = 0.05  # of the fair share: how near the cap's floor counts as held at it
WINDOW = DWELL + 10.0  # seconds of requests and failures a line reports: back past the
# dwell to what moved the share (a line comes DWELL after the crossing)
DECIDING_POLICY = "equilibrium"  # the policy whose weights are its routing decision (the
# baselines' are the shares they happened to send, noisy at low rates)


@dataclass(slots=True)
class _Seen:
    in_rotation: bool = False  # its share reached RESTORED of the fair share once
    shunned: bool = False  # a "shifted off" line was the last said
    crossing_since: float | None = None  # when the share went past the mark it is heading to
    counts: deque[tuple[float, int, int]] = field(default_factory=deque)  # (at, requests, fails)
    ejected: tuple[int, int] = (0, 0)  # its ejections (failures, hung) at the last snapshot

    def recent(self, view: EndpointView, now: float) -> tuple[int, int]:
        """Requests and failures of the last WINDOW seconds (counts are cumulative)."""
        counts = self.counts
        counts.append((now, view.requests, view.failures))
        while counts[0][0] < now - WINDOW:  # the current sample always stays
            counts.popleft()
        _, requests, failures = counts[0]
        return max(0, view.requests - requests), max(0, view.failures - failures)

    def crossed(self, past_mark: bool, now: float) -> bool:
        """Whether the share has stayed past the mark it is heading to for DWELL seconds."""
        if not past_mark:
            self.crossing_since = None
            return False
        if self.crossing_since is None:
            self.crossing_since = now
        return now - self.crossing_since >= DWELL


@dataclass(slots=True)
class ShiftLog:
    """Each upstream's endpoints and where their shares stand (see the module docstring);
    ``cap``: the policy's anti-herd cap on one endpoint's share (:class:`mesh.herd.HerdGuard`)."""

    cap: float = 1.0
    _seen: dict[str, dict[str, _Seen]] = field(default_factory=dict)
    _none_usable: set[str] = field(default_factory=set)  # upstreams said to have none

    def observe(self, upstream: str, snapshot: PolicySnapshot, now: float) -> list[str]:
        """The lines for what changed since the last snapshot of ``upstream``."""
        views = list(snapshot.endpoints)
        first = upstream not in self._seen
        seen = self._seen.setdefault(upstream, {})
        if snapshot.policy != DECIDING_POLICY:  # the baselines' weights are observed shares
            return []
        for gone in set(seen) - {v.endpoint for v in views}:
            del seen[gone]
        usable = snapshot.usable if snapshot.usable is not None else len(views)
        fair = 1.0 / max(usable, 1)
        # what the cap leaves the others (a lone usable endpoint is held at no floor: it
        # has all the traffic there is, and nowhere to shift it off to)
        floor = max(0.0, 1.0 - self.cap * (usable - 1)) if usable > 1 else 0.0
        low = max(SHUNNED * fair, floor + FLOOR_MARGIN * fair)
        high = max(RESTORED * fair, (low + fair) / 2) if floor > 0 else RESTORED * fair
        finite = [v.latency_estimate for v in views
                  if math.isfinite(v.latency_estimate) and v.latency_estimate > 0]
        best = min(finite) if finite else math.nan
        out_of_use = len(views) - usable
        lines = []
        for view in views:
            state = seen.get(view.endpoint)
            if state is None:  # at the upstream's start every endpoint is in rotation;
                # one added later ramps in from nothing (not "shifted off"); its ejections
                # so far are not news (one removed and added back keeps its stats while it
                # still has requests in flight: a review's finding)
                state = seen[view.endpoint] = _Seen(in_rotation=first, ejected=view.ejected)
            requests, failures = state.recent(view, now)
            if view.ejected != state.ejected:  # said at once: a short ejection (a hang's
                # 5 s) is over before any share could stay past a mark for the dwell
                failing = view.ejected[0] > state.ejected[0]
                hung = view.ejected[1] > state.ejected[1]
                state.ejected = view.ejected
                if failing or hung:
                    why = ("its requests failed in a row" if failing
                           else "hung: it left requests unanswered")
                    lines.append(f"upstream {upstream}: {view.endpoint} ejected ({why}; "
                                 f"{_why(view, best, requests, failures, snapshot)})")
            if (usable < 2 and out_of_use == 0) or usable == 0:  # a lone endpoint has nowhere
                state.crossing_since = None  # to shift to; with none usable, shares say
                continue  # nothing (a last resort routes: the line below says so)
            share = view.weight
            if not state.in_rotation:
                state.in_rotation = share >= high
                continue
            since = state.crossing_since
            if not state.shunned and state.crossed(share < low, now):
                state.shunned, state.crossing_since = True, None
                # held at the cap's floor, above the usual mark (not one ejected, with
                # nothing: a stranger read "share 0.0% ..., as far as the cap allows")
                held = view.usable and share >= SHUNNED * fair
                lines.append(
                    f"upstream {upstream}: traffic shifted off {view.endpoint}"
                    f"{_ago(now, since)} (share "
                    f"{share:.1%} of {usable} usable endpoints"
                    f"{', as far as the anti-herd cap allows' if held else ''}; "
                    f"{_why(view, best, requests, failures, snapshot)})")
            elif state.shunned and state.crossed(share > high, now):
                state.shunned, state.crossing_since = False, None
                lines.append(
                    f"upstream {upstream}: {view.endpoint} back in rotation"
                    f"{_ago(now, since)} (share "
                    f"{share:.1%} of {usable} usable endpoints; "
                    f"{_why(view, best, requests, failures, snapshot)})")
        if len(views) > 1 and (usable == 0) != (upstream in self._none_usable):
            if usable == 0:
                self._none_usable.add(upstream)
                lines.append(
                    f"upstream {upstream}: every endpoint is out of use (ejected or draining): "
                    "as a last resort each request goes to one that holds no request "
                    "unanswered and whose last request did not fail, if any, until one is "
                    "back")
            else:
                self._none_usable.discard(upstream)
                lines.append(f"upstream {upstream}: {usable} of {len(views)} endpoints usable "
                             "again")
        return lines

    def keep(self, upstreams: set[str]) -> None:
        """Forget the upstreams not in ``upstreams`` (removed by a reload or discovery)."""
        for gone in set(self._seen) - upstreams:
            del self._seen[gone]
        self._none_usable &= upstreams


def _ago(now: float, since: float | None) -> str:
    """When the share crossed the mark, which the line says a dwell later: " 10 s ago"."""
    return "" if since is None else f" {now - since:.0f} s ago"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if math.isfinite(seconds) else "unmeasured"


def _why(view: EndpointView, best: float, requests: int, failures: int,
         snapshot: PolicySnapshot) -> str:
    parts = [f"latency estimate {_ms(view.latency_estimate)}, best {_ms(best)}",
             f"{failures} failures in {requests} requests in the last {WINDOW:g} s"]
    if view.stalled > 0:  # a hung pod: no latency yet, requests waiting
        parts.append(f"{view.in_flight} requests in flight, unanswered for "
                     f"{_ms(view.stalled)}")
    if not view.usable:  # this endpoint's own state, not another one's
        parts.append("out of use (ejected or draining)")
    if snapshot.following:
        parts.append("following the signaler's plan")
    return "; ".join(parts)
