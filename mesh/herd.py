"""The thundering-herd defence: shaping a learned strategy into the weights actually used.

Regret matching says where traffic *should* go; this module decides how fast and how far it may
go there. The shaped weights are the Euclidean projection of the (smoothed) target onto a box
inside the probability simplex::

    lower_i <= w_i <= upper_i,   sum_i w_i = 1

- **Cap** (default 0.8): no endpoint gets more than ``cap`` of the traffic, however good it
  looks; the rest stays spread over the other *good* endpoints, so a recovered pod is never
  handed the whole load and the others keep being measured. (With a single endpoint the cap
  cannot hold and the weight is 1.) An endpoint the caller knows to be bad (``good`` False:
  the policy passes those whose recommended share its own evidence overruled) takes
  none of what the cap, the ramp or the rounding leaves over: it gets at most what the
  smoothed target gives it, and its floor. Where that leaves no room, the good endpoints'
  bounds give way in turn: first the rule that one the target wants less of does not grow,
  then the ramp, then the cap itself (two pods, one of them bad: the good one takes all but
  the floor, instead of the bad one being handed the fifth the cap set aside). A weight
  above the cap comes back down at the ramp's pace, so that a pod that heals, or joins, is
  not handed what it sheds in one tick.
- **Ramp** (gradual re-admission): a weight may grow by at most ``ramp_per_s`` per second. An
  endpoint that recovers, or joins, climbs back linearly instead of being stampeded — the
  slow-start that Envoy applies only to new hosts, applied here also to hosts that come back.
- **Exploration floor**: every live endpoint keeps at least ``explore_floor`` of the traffic
  (bounded: at most ``explore_budget`` in total), so a bad pod is re-checked with a small,
  bounded share of user requests rather than never (stale) or often (costly).
  An endpoint *covered by probes* (its inbound sidecar answers them: :mod:`mesh.probes`) is
  explored by the probes instead: it has no floor, and once the smoothed target gives it less
  than the floor it gets no user request at all (the target's crumbs below the floor are the
  learner's baseline switching rate, not a wish to use it).
- **Ejected** endpoints (too many consecutive failures) get weight 0 until their ejection ends.
- **Smoothing**: the target is approached by a fraction ``smoothing`` per tick, damping noise
  so that shares settle instead of flapping.

The projection is computed exactly from the sorted breakpoints of the shift ``lambda`` in
``w_i = clip(t_i + lambda, lower_i, upper_i)`` (:func:`project_box_simplex`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class HerdGuard:
    cap: float = 0.8
    ramp_per_s: float = 0.10
    explore_floor: float = 0.005
    explore_budget: float = 0.05
    smoothing: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.cap <= 1.0:
            raise ValueError("cap must be in (0, 1]")
        if self.ramp_per_s <= 0.0:
            raise ValueError("ramp_per_s must be positive")
        if not 0.0 <= self.explore_floor < 1.0 or not 0.0 <= self.explore_budget < 1.0:
            raise ValueError("explore_floor and explore_budget must be in [0, 1)")
        if not 0.0 < self.smoothing <= 1.0:
            raise ValueError("smoothing must be in (0, 1]")

    def floor(self, n: int) -> float:
        """Each endpoint's exploration floor among ``n`` (at least 1): ``explore_floor``,
        or less where ``n`` of them would pass ``explore_budget``."""
        return min(self.explore_floor, self.explore_budget / max(1, n))

    def shape(self, target: np.ndarray, previous: np.ndarray, dt: float,
              live: np.ndarray | None = None, covered: np.ndarray | None = None,
              good: np.ndarray | None = None) -> np.ndarray:
        """New weights from the learned ``target``, the ``previous`` weights and the time step.

        ``live[i]`` is False for ejected endpoints; ``covered[i]`` True for endpoints explored
        by probes (no floor); ``good[i]`` False for endpoints known to be bad, which take no
        leftover (module docstring; None: every live endpoint is good, and no weight is above
        the cap because it gave way). Returns weights summing to 1 (or all zeros when no
        endpoint is live).
        """
        t = _normalise(np.asarray(target, dtype=float))
        p = np.asarray(previous, dtype=float)
        k = t.shape[0]
        live = np.ones(k, dtype=bool) if live is None else np.asarray(live, dtype=bool)
        n_live = int(live.sum())
        if n_live == 0:
            return np.zeros(k)
        if n_live == 1:
            return live.astype(float)
        t = np.where(live, t, 0.0)
        t = _normalise(t) if t.sum() > 0 else live / n_live
        goal = p + self.smoothing * (t - p) if p.shape == t.shape and p.sum() > 0 else t
        floor = self.floor(n_live)
        probed = (np.zeros(k, dtype=bool) if covered is None
                  else np.asarray(covered, dtype=bool) & live)
        lower = np.where(live & ~probed, floor, 0.0)
        cap = max(self.cap, 1.0 / n_live)
        step = self.ramp_per_s * max(dt, 0.0)
        upper = np.where(live, np.minimum(cap, p + step), 0.0)
        if p.shape == t.shape:
            # An endpoint the target wants less of never grows, even when the ramp holds back
            # the endpoints it wants more of: the leftover stays where it was instead of being
            # spread over every endpoint (a bad pod included).
            upper = np.where(goal < p, np.minimum(upper, p), upper)
        upper = np.maximum(upper, lower)
        dropped = probed & (goal < floor)
        if dropped.any():
            # the crumbs it had (at most a floor's worth) may go to the others, within the
            # cap, even to those the target wants a hair less of
            relaxed = np.where(dropped | ~live, 0.0,
                               np.maximum(upper, np.minimum(cap, p + floor))
                               if p.shape == t.shape else upper)
            if relaxed.sum() >= 1.0 - 1e-12:
                upper = relaxed
        bad = np.zeros(k, dtype=bool)
        if good is not None:
            fine = live & np.asarray(good, dtype=bool)
            # known bad, and the target wants none of it: queued pods the target still
            # spreads over (capacity-limited ones) keep taking their part of the leftover
            bad = live & ~fine & (t < floor)
            if bad.any() and fine.any():
                upper = np.where(bad, np.where(dropped, 0.0, np.maximum(
                    lower, np.minimum(upper, goal))), upper)
                if upper.sum() < 1.0 - 1e-12:  # the good ones take the rest, bounds relaxed
                    same = p.shape == t.shape
                    bounds = [np.minimum(cap, p + step) if same else upper]
                    if same:  # one above the cap sheds at the ramp's pace (below)
                        bounds.append(np.where(p > cap, p - step, 0.0))
                    for bound in (*bounds, np.full(k, cap), np.ones(k)):
                        upper = np.where(fine, np.maximum(upper, bound), upper)
                        if upper.sum() >= 1.0 - 1e-12:
                            break
        if upper.sum() < 1.0 - 1e-12 and good is not None and p.shape == t.shape:
            # A weight above the cap because the cap gave way for bad pods (``good`` is given
            # while it sheds) must go somewhere: first where the target wants less, within
            # the ramp (the goal rule gives way before the ramp does); then it comes down
            # only at the ramp's pace, so that a healed or new pod takes it no faster.
            upper = np.maximum(upper, np.where(live & ~bad, np.minimum(cap, p + step), 0.0))
            if upper.sum() < 1.0 - 1e-12:
                upper = np.where(live & (p > cap), np.maximum(upper, p - step), upper)
        if upper.sum() < 1.0 - 1e-12 and p.shape == t.shape:
            # The endpoints live now held less than the ramp lets them take in one step (one
            # with a large weight was ejected): each may take its part of what is gone, in
            # proportion to what it had (as a set change renormalises), within the cap, so
            # a pod that just joined or came back is not handed the lot in one tick (a
            # stranger's finding: a new pod from 0.10 to 0.49 in a tick when an old one died)
            held = float(np.where(live, p, 0.0).sum())
            if held > 0.0:
                share = np.where(live, np.minimum(cap, np.maximum(upper, p / held)), 0.0)
                upper = np.maximum(upper, share)
        if upper.sum() < 1.0 - 1e-12:
            # still short (the cap binds, or nothing was held): keep only the cap
            upper = np.where(live, cap, 0.0)
        return project_box_simplex(goal, lower, upper)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.where(np.isfinite(x) & (x > 0), x, 0.0)
    s = x.sum()
    return x / s if s > 0 else np.full(x.shape[0], 1.0 / max(1, x.shape[0]))


def project_box_simplex(x: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Euclidean projection of ``x`` onto {lower <= w <= upper, sum w = 1}.

    Requires sum(lower) <= 1 <= sum(upper) (ValueError otherwise). The projection has the form
    clip(x + lambda, lower, upper) (the KKT conditions of the problem; e.g. Helgason, Kennington
    & Lall 1980 for the continuous quadratic knapsack). Its sum is piecewise linear and
    nondecreasing in lambda, with breakpoints where a coordinate leaves its lower bound
    (``lower - x``) or reaches its upper one (``upper - x``); the sum is evaluated at all 2k
    breakpoints at once from prefix sums over the sorted breakpoints, and lambda interpolated
    on the segment where it crosses 1: O(k log k), exact up to rounding.
    """
    if lower.sum() > 1.0 + 1e-12 or upper.sum() < 1.0 - 1e-12:
        raise ValueError("infeasible bounds for a probability vector")
    leave, reach = lower - x, upper - x
    by_leave, by_reach = np.argsort(leave), np.argsort(reach)
    leave_sorted, reach_sorted = leave[by_leave], reach[by_reach]
    zero = np.zeros(1)
    lower_sums = np.concatenate((zero, np.cumsum(lower[by_leave])))
    x_by_leave = np.concatenate((zero, np.cumsum(x[by_leave])))
    upper_sums = np.concatenate((zero, np.cumsum(upper[by_reach])))
    x_by_reach = np.concatenate((zero, np.cumsum(x[by_reach])))
    points = np.sort(np.concatenate((leave, reach)))
    # at lambda = b: coordinates with leave > b sit at lower, those with reach <= b at upper
    # (disjoint, as leave <= reach), the rest at x + b
    j = np.searchsorted(leave_sorted, points, side="right")
    m = np.searchsorted(reach_sorted, points, side="right")
    sums = (lower_sums[-1] - lower_sums[j]) + upper_sums[m] \
        + (x_by_leave[j] - x_by_reach[m]) + points * (j - m)
    first = int(np.searchsorted(sums, 1.0, side="left"))
    if first == 0:
        lam = float(points[0])
    elif first >= points.shape[0]:
        lam = float(points[-1])
    else:
        p0, p1, s0, s1 = (float(points[first - 1]), float(points[first]),
                          float(sums[first - 1]), float(sums[first]))
        lam = p1 if s1 <= s0 else p0 + (1.0 - s0) * (p1 - p0) / (s1 - s0)
    w = np.clip(x + lam, lower, upper)
    # Remove the last rounding error on coordinates with room to move.
    slack = 1.0 - w.sum()
    room = (w < upper - 1e-15) if slack > 0 else (w > lower + 1e-15)
    if room.any():
        w[room] += slack / room.sum()
    return np.clip(w, lower, upper)
