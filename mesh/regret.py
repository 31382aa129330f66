"""Regret matching (Hart & Mas-Colell 2000), as plain numpy functions plus two small classes.

Hart, S. and Mas-Colell, A. (2000). "A simple adaptive procedure leading to correlated
equilibrium." Econometrica 68(5), 1127-1150.

Conditional (internal) regret. For a player who played action j, the regret toward k after t
periods is::

    D_t(j, k) = (1/t) * sum over periods tau <= t with s_tau = j of [u(k, s_-i) - u(s_tau)]
    R_t(j, k) = max(D_t(j, k), 0)

The procedure: having played j last, switch to k != j with probability R_t(j, k) / mu and stay
on j with the remaining probability (``mu`` large enough that staying keeps positive
probability — the "inertia"). If every player does this, the empirical distribution of joint
play converges almost surely to the set of correlated equilibria. D(j, k) is exactly the
player's correlated-equilibrium constraint evaluated at the empirical distribution, so the
regrets are themselves a live measure of distance from a CE.

Unconditional (external) regret matching plays k with probability proportional to
[U(k)]^+ where U(k) = (1/t) * sum over all periods of [u(k) - u(s)]; it only reaches the
coarse correlated equilibria (Hart & Mas-Colell 2000, section 4(c)).

For routing (:class:`RoutingRegret`) the payoff is minus latency; the payoff of an endpoint not
chosen is estimated from the estimators; averages are discounted so that the learner tracks a
changing fleet; and the mixed strategy handed to the proxy is the stationary distribution of the
switching chain above — the long-run frequency with which the Hart & Mas-Colell chain plays each
action (the fixed point used by Blum & Mansour 2007 to turn external into swap-regret
minimisation). Sampling requests independently from it gives the same long-run play without
sending a burst of consecutive requests to one endpoint.
"""

from __future__ import annotations

import math
import random
from typing import Literal

import numpy as np

Mode = Literal["conditional", "unconditional"]


def positive_part(x: np.ndarray) -> np.ndarray:
    part: np.ndarray = np.maximum(x, 0.0)
    return part


def switching_matrix(regrets: np.ndarray, mu: float) -> np.ndarray:
    """Hart & Mas-Colell's transition matrix: P[j, k] = R(j, k)/mu for k != j, the rest stays.

    ``regrets`` is the (k x k) conditional regret matrix D; ``mu`` must exceed every row sum of
    positive regrets (ValueError otherwise), which keeps P[j, j] > 0 (inertia).
    """
    r = positive_part(np.asarray(regrets, dtype=float)).copy()
    np.fill_diagonal(r, 0.0)
    if mu <= 0 or np.any(r.sum(axis=1) >= mu):
        raise ValueError(f"mu={mu} must exceed every row sum of positive regrets")
    p = r / mu
    np.fill_diagonal(p, 1.0 - p.sum(axis=1))
    return p


def next_action(last: int, regrets: np.ndarray, mu: float, rng: random.Random,
                *, row_index: int | None = None) -> int:
    """One step of the Hart & Mas-Colell procedure from the last action played:
    switch to k with probability R(last, k)/mu, otherwise stay. ``regrets`` is the whole
    matrix, or (with ``row_index``) just the row of the last action."""
    r = 0 if row_index is not None else last
    row = np.maximum(np.asarray(regrets[r], dtype=float), 0.0)
    row[last] = 0.0
    total = float(row.sum())
    if total >= mu:
        raise ValueError(f"mu={mu} must exceed the row sum of positive regrets {total}")
    x = rng.random() * mu
    if x >= total:
        return last
    return int(np.searchsorted(np.cumsum(row), x, side="right"))


def stationary_strategy(regrets: np.ndarray, epsilon: float = 1e-9) -> np.ndarray:
    """The stationary distribution q of the switching chain: q P = q.

    q does not depend on mu: q P = q  <=>  q (R - diag(R 1)) = 0. ``epsilon`` (relative to the
    largest regret, floored at an absolute 1e-12) is added to every off-diagonal rate so that
    the chain is irreducible and q unique; with no regret at all q is uniform.
    """
    r = positive_part(np.asarray(regrets, dtype=float))  # a new array, ours to change
    k = r.shape[0]
    if k == 1:
        return np.ones(1)
    np.fill_diagonal(r, 0.0)
    scale = float(r.max()) if r.size else 0.0
    r += max(epsilon * scale, 1e-12)
    np.fill_diagonal(r, 0.0)
    # The generator G = R - diag(R 1); solve q G = 0 with sum(q) = 1, one equation replaced
    # by the normalisation: the system's matrix is G transposed.
    a = r.T.copy()
    np.fill_diagonal(a, -r.sum(axis=1))
    a[-1, :] = 1.0
    b = np.zeros(k)
    b[-1] = 1.0
    try:
        q = np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        q = np.full(k, 1.0 / k)
    q = np.clip(q, 0.0, None)
    total = q.sum()
    return q / total if total > 0 and math.isfinite(total) else np.full(k, 1.0 / k)


UNIFORM_CHECK_FROM = 128
"""From this many endpoints up, :meth:`RoutingRegret.strategy` answers uniform rates without a
solve (exactly 1/k; the solve, cheap below, gives 1/k to the last bit or two, and the
simulator's results are kept bit for bit at the sizes its scenarios use)."""


def _switches_evenly(rates: np.ndarray) -> bool:
    """Whether every off-diagonal entry of ``rates`` is one and the same positive number."""
    k = rates.shape[0]
    if k < 2:
        return True
    value = rates[0, 1]
    if not value > 0.0:
        return False
    off = rates.copy()
    np.fill_diagonal(off, value)
    return bool((off == value).all())


def unconditional_strategy(unconditional_regrets: np.ndarray) -> np.ndarray:
    """Play k with probability proportional to [U(k)]^+; uniform when no regret is positive."""
    u = positive_part(np.asarray(unconditional_regrets, dtype=float))
    total = float(u.sum())
    if total <= 0 or not math.isfinite(total):
        return np.full(u.shape[0], 1.0 / u.shape[0])
    return u / total


def _sample(probabilities: np.ndarray, rng: random.Random) -> int:
    x = rng.random()
    acc = 0.0
    for i, p in enumerate(probabilities):
        acc += float(p)
        if x < acc:
            return i
    return int(len(probabilities) - 1)


class RegretMatcher:
    """A player of a repeated finite game using regret matching (full-information version).

    Each period, call :meth:`choose` to get the action, then :meth:`observe` with the payoff
    every action would have earned against what the others actually played. ``mode`` selects
    the conditional procedure (converges to the set of correlated equilibria) or the
    unconditional one (coarse correlated equilibria). ``mu`` defaults to
    2 * max|payoff| * (k - 1) + 1, which satisfies the paper's condition for payoffs bounded by
    ``payoff_bound``.
    """

    def __init__(self, n_actions: int, *, mode: Mode = "conditional",
                 payoff_bound: float = 1.0, mu: float | None = None) -> None:
        if n_actions < 1:
            raise ValueError("a player needs at least one action")
        self.k = n_actions
        self.mode: Mode = mode
        self.mu = mu if mu is not None else 2.0 * payoff_bound * max(1, n_actions - 1) + 1.0
        self.t = 0
        self.last: int | None = None
        self._cond_sum = np.zeros((n_actions, n_actions))
        self._uncond_sum = np.zeros(n_actions)
        self.counts = np.zeros(n_actions)

    @property
    def conditional_regrets(self) -> np.ndarray:
        return self._cond_sum / max(1, self.t)

    @property
    def unconditional_regrets(self) -> np.ndarray:
        return self._uncond_sum / max(1, self.t)

    def choose(self, rng: random.Random) -> int:
        if self.mode == "unconditional":
            action = _sample(unconditional_strategy(self.unconditional_regrets), rng)
        elif self.last is None:
            action = rng.randrange(self.k)
        else:
            row = self._cond_sum[self.last] / max(1, self.t)
            action = next_action(self.last, row[None, :], self.mu, rng, row_index=self.last)
        return action

    def observe(self, played: int, payoffs: np.ndarray) -> None:
        """``payoffs[k]`` is what action k would have earned this period (others fixed)."""
        payoffs = np.asarray(payoffs, dtype=float)
        gain = payoffs - payoffs[played]
        self._cond_sum[played] += gain
        self._uncond_sum += gain
        self.counts[played] += 1
        self.t += 1
        self.last = played


def _finite_or_zero(x: np.ndarray) -> np.ndarray:
    """``x`` with every infinite or NaN entry set to 0 (``x`` itself, if none is: a sum is
    finite only when all its terms are, and one pass of summing is cheaper than a mask)."""
    if math.isfinite(float(x.sum())):
        return x
    cleaned: np.ndarray = np.where(np.isfinite(x), x, 0.0)
    return cleaned


class RoutingRegret:
    """Discounted conditional and unconditional regrets of one sidecar over one upstream.

    Payoff is minus latency. Each tick the sidecar reports, per endpoint j, how many requests
    it sent there (n_j, out of N) and their mean observed cost c_j, plus the current latency
    estimate e_k of every endpoint. The batch form of Hart & Mas-Colell's average is::

        D(j, k) <- [g * W * D(j, k) + (n_j / N) * (c_j - e_k - m_jk)] / (g * W + 1)

    with g = exp(-dt / memory) the discount and W the discounted number of ticks so far, so D
    stays in seconds and forgets a fleet that has changed. Gains within an indifference margin
    m_jk (``tolerance`` of the smaller latency, at least ``tolerance_abs`` seconds) count as
    zero, so the learner targets an epsilon-correlated equilibrium and does not chase jitter.

    D is what the paper defines and what the sidecar publishes (it is the CE constraint at the
    empirical distribution). The routing strategy uses the same regrets per play of j,
    ``D~(j, k) = D(j, k) / f_j`` with f_j the discounted frequency of j: the switching rate out
    of an endpoint then reflects how much *each* request sent there is regretted, not how
    often it was sent, so an endpoint that stops being regretted (it recovered) is re-admitted
    as soon as the few requests that keep exploring it show it. A per-play regret is used only
    as far as the current estimates still confirm it (``min(D~(j, k), e_j - e_k - m_jk)``), so
    a long bad history is not held against an endpoint whose fresh measurements are good —
    otherwise it would take many memory constants for a large old regret to be averaged away
    by the small margins of a recovered pod. A baseline rate ``theta`` (a fraction of the best
    latency) is added to every switch, so that among equally good endpoints the chain is
    uniform.
    """

    def __init__(self, k: int, memory: float, *, tolerance: float = 0.10,
                 tolerance_abs: float = 0.001, theta: float = 0.02) -> None:
        self.k = k
        self.memory = memory
        self.tolerance = tolerance
        self.tolerance_abs = tolerance_abs
        self.theta = theta
        self.conditional = np.zeros((k, k))
        self.unconditional = np.zeros(k)
        self._per_play = np.zeros((k, k))
        self._freq = np.zeros(k)
        self._weight = 0.0
        self._scale = 0.0
        self._current = np.zeros((k, k))
        # the rates of the last conditional strategy and the strategy (strategy())
        self._last_strategy: tuple[np.ndarray, np.ndarray] | None = None

    def resize(self, keep: list[int | None]) -> None:
        """Re-index after an endpoint-set change: ``keep[new] = old index or None``."""
        k = len(keep)
        cond, per_play = np.zeros((k, k)), np.zeros((k, k))
        uncond, freq = np.zeros(k), np.zeros(k)
        kept = [(a, oa) for a, oa in enumerate(keep) if oa is not None]
        if kept:  # one gathered copy each (a Python k x k loop took 3.7 s at k = 2,000)
            new = np.array([a for a, _ in kept])
            old = np.array([oa for _, oa in kept])
            uncond[new], freq[new] = self.unconditional[old], self._freq[old]
            n = len(kept)
            for into, source in ((cond, self.conditional), (per_play, self._per_play)):
                moved = source.take(old, axis=0).take(old, axis=1)
                if new[-1] == n - 1:  # the kept ones first, in order (the usual change)
                    into[:n, :n] = moved
                else:
                    into[np.ix_(new, new)] = moved
        self.k, self.conditional, self.unconditional = k, cond, uncond
        self._per_play, self._freq = per_play, freq
        self._current = np.zeros((k, k))

    def _indifference(self, mean_costs: np.ndarray, estimates: np.ndarray) -> np.ndarray:
        """The margin below which a latency difference is treated as noise (an epsilon-CE):
        ``max(tolerance_abs, tolerance * |min(c_j, e_k)|)``. Without it, endpoints whose
        latencies differ only by jitter would trade the whole load back and forth (flapping).

        For latencies (no negative, no NaN) and a positive tolerance it is the outer minimum of
        each side's own margin: multiplying by the tolerance and rounding keep order, and max
        distributes over min, so the result is the same to the last bit at O(k) work before
        one k x k pass (instead of four)."""
        tol, floor = self.tolerance, self.tolerance_abs
        if tol > 0.0 and bool((mean_costs >= 0.0).all()) and bool((estimates >= 0.0).all()):
            own: np.ndarray = np.minimum.outer(np.maximum(floor, tol * mean_costs),
                                               np.maximum(floor, tol * estimates))
            return own
        smaller = np.minimum(mean_costs[:, None], estimates[None, :])
        margin: np.ndarray = np.maximum(self.tolerance_abs, self.tolerance * np.abs(smaller))
        return margin

    def update(self, counts: np.ndarray, mean_costs: np.ndarray, estimates: np.ndarray,
               dt: float) -> None:
        counts = np.asarray(counts, dtype=float)
        mean_costs = np.asarray(mean_costs, dtype=float)
        estimates = np.asarray(estimates, dtype=float)
        finite = estimates[np.isfinite(estimates)]
        if finite.size:
            self._scale = float(finite.min())
        current = np.subtract.outer(estimates, estimates)
        current -= self._indifference(estimates, estimates)
        self._current = _finite_or_zero(current)
        total = counts.sum()
        g = math.exp(-dt / self.memory) if self.memory > 0 and dt > 0 else 1.0
        prior = g * self._weight
        if total <= 0:
            # Nothing was played: only forget (rows keep their per-play value).
            self._weight = prior
            self._freq = g * self._freq
            return
        share = counts / total
        gains = np.subtract.outer(mean_costs, estimates)  # c_j - e_k: what moving j->k saves
        gains -= self._indifference(mean_costs, estimates)
        gains = _finite_or_zero(gains)
        np.fill_diagonal(gains, 0.0)
        batch = gains
        batch *= share[:, None]
        conditional = prior * self.conditional  # a new array: the old one may be shown
        conditional += batch
        conditional /= prior + 1.0
        self.conditional = conditional
        freq = g * self._freq + share
        played = share > 0
        # Per-play average: weighted by how often j was played, recent plays dominating.
        self._per_play[played] = (
            (g * self._freq[played])[:, None] * self._per_play[played] + batch[played]
        ) / freq[played][:, None]
        self._freq = freq
        realised = float(share @ mean_costs)
        margin = np.maximum(self.tolerance_abs, self.tolerance * np.minimum(realised, estimates))
        uncond_batch = np.where(np.isfinite(estimates), realised - estimates - margin, 0.0)
        self.unconditional = (prior * self.unconditional + uncond_batch) / (prior + 1.0)
        self._weight = prior + 1.0

    def strategy(self, mode: Mode) -> np.ndarray:
        if mode == "unconditional":
            return unconditional_strategy(self.unconditional)
        rates = np.minimum(self._per_play, self._current)  # confirmed regrets
        np.maximum(rates, 0.0, out=rates)
        rates += max(self.theta * self._scale, 1e-9)
        # The same rates give the same strategy: an upstream nobody calls keeps its rates
        # tick after tick, and the solve is O(k^3) (0.2 s at k = 1,000, a stranger's
        # finding: a large Service nobody called stalled the sidecar); the check is O(k^2).
        last = self._last_strategy
        if last is not None and last[0].shape == rates.shape and np.array_equal(last[0], rates):
            return last[1].copy()
        k = rates.shape[0]
        if k > UNIFORM_CHECK_FROM and _switches_evenly(rates):
            # every switch at one rate: the chain is symmetric, its stationary strategy
            # uniform (what a large upstream nobody measured yet has after each change of
            # its set, with no earlier rates to reuse: 0.15 s of solving at 1,000)
            q = np.full(k, 1.0 / k)
        else:
            q = stationary_strategy(rates, epsilon=0.0)
        self._last_strategy = (rates, q.copy())
        return q

    def endpoint_regret(self) -> np.ndarray:
        """Per endpoint j: the largest positive regret max_k R(j, k) of having used it."""
        r = positive_part(self.conditional)
        return r.max(axis=1) if self.k else np.zeros(0)
