"""Adaptive concurrency limit (gradient style) and the ``X-GT-Congestion`` level it reports.

This module owns how the inbound sidecar decides how many requests its app may have in flight,
and how congested the app is. It is pure: the sidecar passes ``now`` and each request's
round-trip time, and an optional ``random.Random`` for jitter.

The algorithm follows Envoy's adaptive concurrency filter (gradient controller) and Netflix's
concurrency-limits ``Gradient2Limit``:

- **minRTT** is the app's round-trip time with no queueing. It is measured in a *probe*: the
  limit is pinned to ``probe_limit`` (a few requests) until ``probe_samples`` requests *started
  during the probe* have finished (a request started at ``now - rtt``), and minRTT becomes the
  smallest of them. A probe runs at start-up and again every ``probe_interval`` seconds (plus up
  to ``probe_jitter`` of that, drawn from the injected rng), because a standing queue would
  otherwise hide the true minimum (the same reason BBR drains to ProbeRTT).
- **sampleRTT** is the ``percentile`` of the RTTs that finished in the last ``update_interval``
  (at least ``min_samples`` of them; the window waits for them). The default is a low
  percentile (10 %, the window's minimum for windows of up to ten RTTs): the *standing* RTT
  of Copa (Arun & Balakrishnan, "Copa: Practical delay-based congestion control for the
  Internet", NSDI 2018), after TCP Vegas's base-RTT comparison. Queueing delays every request,
  so it raises even the fastest of a window; an app's own slow answers (a pod that sleeps
  500 ms on half of its requests, a heavy-tailed or exponential service time) do not, so a
  latency distribution that is merely wide is not taken for congestion. (The median, Envoy's
  default, of an exponential service time is already 0.69 x its mean while minRTT is the
  minimum of a probe: against a tolerance of 1.5 such an app reads as congested for ever and
  its limit sits at ``min_limit``.)
- Every window: ``gradient = clamp((1 + tolerance) * minRTT / sampleRTT, min_gradient, 1)`` and
  ``limit <- (1 - smoothing) * limit + smoothing * (limit * gradient + sqrt(limit))``, bounded to
  ``[min_limit, max_limit]``. The ``sqrt(limit)`` headroom (Envoy's default) lets the limit grow
  while RTT stays within the tolerance and settles where ``limit * (1 - gradient) = headroom``.
  As in Gradient2, a window in which the app was *app-limited* (its peak in-flight count stayed
  below half the limit) leaves the limit unchanged, so an idle app keeps a meaningful limit.

``congestion_level()`` is ``in_flight / limit`` in [0, 1] (1 during a probe once the probe's
few slots are taken); it travels on every response as ``X-GT-Congestion``.
``capacity_estimate()`` is Little's law, ``limit / meanRTT`` requests per second (the app's
throughput when saturated; meanRTT is the mean of the same window, since Little's law holds
for the mean), which :mod:`mesh.reputation` divides into fair shares.

The probe never pins the limit below ``min_limit`` (an operator's ``min_limit``, e.g. the
pod's server count, is a promise the probe must keep too): during a probe the limit is
``max(probe_limit, min_limit)``.
``snapshot()`` gathers these observers for ``/debug/state``.

**Long requests.** A long poll, a watch or a streamed answer holds its slot for seconds or
minutes while the app serves others in milliseconds: counted in flight, a few of them fill
the limit (and pin a minRTT probe, whose few slots they take) and the app's quick requests
wait for a slot they do not need (a helper measured 26 of 1,600 requests failed and quick
requests' p99 at 5.3 s with 30 % long polls). Like the Kubernetes API server, which keeps
long-running requests (watches) out of its max-in-flight limits, the gate
(:class:`mesh.admission.AdmissionGate`) takes such a request out of the count with
:meth:`AdaptiveConcurrencyLimit.park` once it is :meth:`AdaptiveConcurrencyLimit.long_after`
old (``long_after`` seconds, and ``long_factor`` times the standing RTT) *and* the app has
answered a request admitted after it: a queue that serves in order overtakes nobody, so an
overloaded app's slow requests stay counted and keep the limit in force. A parked request's
end teaches the limiter nothing (:meth:`AdaptiveConcurrencyLimit.on_parked_end`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ConcurrencySnapshot:
    """The limiter at one instant (:meth:`AdaptiveConcurrencyLimit.snapshot`)."""

    limit: int
    """The limit in force (the probe's pinned limit while probing)."""
    estimated_limit: float
    in_flight: int
    congestion: float
    probing: bool
    long_running: int
    """Admitted requests taken out of ``in_flight`` as long (see *Long requests*)."""
    min_rtt: float | None
    sample_rtt: float | None
    capacity_estimate: float | None


@dataclass(frozen=True, slots=True)
class ConcurrencyParams:
    """Tuning of :class:`AdaptiveConcurrencyLimit` (defaults after Envoy / Gradient2)."""

    initial_limit: float = 20.0
    min_limit: float = 1.0
    max_limit: float = 1000.0
    tolerance: float = 0.5
    """RTT may exceed minRTT by this fraction before the limit shrinks."""
    min_gradient: float = 0.5
    smoothing: float = 0.2
    update_interval: float = 0.1
    min_samples: int = 5
    percentile: float = 0.1
    """The window's RTT statistic the gradient compares with minRTT (the standing RTT)."""
    probe_limit: int = 3
    probe_samples: int = 10
    probe_interval: float = 60.0
    probe_jitter: float = 0.15
    max_window_samples: int = 1000
    long_after: float = 1.0
    """Seconds before a request may count as long (see *Long requests*; inf: never)."""
    long_max: int = 256
    """Requests parked as long at once, at most (the rest keep their slots): an app whose
    server holds a thread per request should set its spare threads."""
    long_factor: float = 50.0
    """... and this many times the standing RTT (sampleRTT, else minRTT). The standing RTT is
    a low percentile: an exponential service time's 10th percentile is 0.105 x its mean, so
    at 10 x a third of an app's ordinary requests would pass for long (and, overtaken, leave
    the count); at 50 x, 0.5 %."""

    def __post_init__(self) -> None:
        if not 1.0 <= self.min_limit <= self.initial_limit <= self.max_limit:
            raise ValueError("need 1 <= min_limit <= initial_limit <= max_limit")
        if self.tolerance < 0 or not 0 < self.min_gradient <= 1 or not 0 < self.smoothing <= 1:
            raise ValueError("need tolerance >= 0, 0 < min_gradient <= 1, 0 < smoothing <= 1")
        if self.update_interval <= 0 or self.probe_interval <= 0 or self.probe_jitter < 0:
            raise ValueError("intervals must be positive and the jitter non-negative")
        if self.min_samples < 1 or self.probe_samples < 1 or self.probe_limit < 1:
            raise ValueError("sample counts and probe_limit must be at least 1")
        if not 0 < self.percentile <= 1:
            raise ValueError("percentile must be in (0, 1]")
        if not self.long_after > 0 or not self.long_factor > 0 or self.long_max < 0:
            raise ValueError("need long_after > 0, long_factor > 0 and long_max >= 0")


class AdaptiveConcurrencyLimit:
    """Gradient concurrency limiter for one app (see the module docstring for the rules).

    Call order per request: ``if limiter.on_start(now): ...forward...;
    limiter.on_finish(rtt, now)``; a request that ends without a usable RTT (cancelled, connect
    error) calls ``on_abandon(now)`` instead, so the in-flight count stays exact.
    """

    def __init__(self, params: ConcurrencyParams | None = None,
                 rng: random.Random | None = None) -> None:
        self.params = params or ConcurrencyParams()
        self._rng = rng
        self._limit = float(self.params.initial_limit)
        self._in_flight = 0
        self._long = 0  # parked: admitted, still running, not counted in _in_flight
        self._min_rtt: float | None = None
        self._sample_rtt: float | None = None
        self._mean_rtt: float | None = None
        self._window: list[float] = []
        self._window_start: float | None = None
        self._window_peak = 0
        self._probe_start: float | None = None  # set while probing; None before the first call
        self._probe_rtts: list[float] = []
        self._next_probe = -math.inf  # the first call starts a probe

    # --- request path ---------------------------------------------------------------------

    def on_start(self, now: float) -> bool:
        """Take a slot if one is free under the current limit; False means over the limit."""
        self._maybe_start_probe(now)
        if self._in_flight >= self.limit:
            return False
        self._in_flight += 1
        self._window_peak = max(self._window_peak, self._in_flight)
        return True

    def on_finish(self, rtt: float, now: float) -> None:
        """A request admitted by :meth:`on_start` finished after ``rtt`` seconds."""
        self._in_flight = max(0, self._in_flight - 1)
        if not math.isfinite(rtt) or rtt <= 0:
            return
        if self._probe_start is not None:
            if now - rtt >= self._probe_start:
                self._probe_rtts.append(rtt)
                if len(self._probe_rtts) >= self.params.probe_samples:
                    self._finish_probe(now)
            return
        if self._window_start is None:
            self._window_start = now
        if len(self._window) < self.params.max_window_samples:
            self._window.append(rtt)
        if (now - self._window_start >= self.params.update_interval
                and len(self._window) >= self.params.min_samples):
            self._update_limit(now)

    def on_abandon(self, now: float) -> None:
        """A request admitted by :meth:`on_start` ended without an RTT worth learning from."""
        self._in_flight = max(0, self._in_flight - 1)

    def long_after(self) -> float:
        """How old an admitted request must be to count as long: ``long_after`` seconds and
        ``long_factor`` times the standing RTT (sampleRTT, else minRTT), whichever is more.
        During a minRTT probe only the factor, on the least RTT known (minRTT and the probe's
        samples so far): the probe's few slots are the app's only ones, and a long poll in
        one would stall every other request for ``long_after`` (a quarter of it as a floor
        took the quick requests' p99 from 9 to 163 ms in ``benchmarks/long_polls.py``). An
        app's ordinary slow answers (300 ms among 2 ms ones) may then be parked during the
        probe: more of them run at once meanwhile, though a review's simulation found the
        probe's minRTT unchanged (``long_after`` inf: never, in a probe too)."""
        p = self.params
        if self._probe_start is not None and math.isfinite(p.long_after):
            known = self._probe_rtts if self._min_rtt is None else [self._min_rtt,
                                                                     *self._probe_rtts]
            if known:
                return p.long_factor * min(known)
        rtt = self._sample_rtt if self._sample_rtt is not None else self._min_rtt
        return max(p.long_after, p.long_factor * (rtt or 0.0))

    def queueing(self) -> bool:
        """Whether the last window's standing RTT was past the tolerance over minRTT (the
        app queues: the gradient is below 1)."""
        return (self._sample_rtt is not None and self._min_rtt is not None
                and self._sample_rtt > (1.0 + self.params.tolerance) * self._min_rtt)

    def park(self) -> None:
        """An admitted request turned out long: it leaves the in-flight count (its slot is
        free) and ends with :meth:`on_parked_end` (see *Long requests*)."""
        if self._in_flight > 0:
            self._in_flight -= 1
            self._long += 1

    def on_long_start(self) -> None:
        """A request admitted outside the limit from the start (declared long by the
        operator): counted with the parked ones; it ends with :meth:`on_parked_end`."""
        self._long += 1

    def on_parked_end(self) -> None:
        """A request taken out with :meth:`park` ended: its RTT says nothing about queueing
        (it was long by its nature), so nothing is learned."""
        self._long = max(0, self._long - 1)

    # --- observers ------------------------------------------------------------------------

    @property
    def limit(self) -> int:
        """The current concurrency limit (the probe's pinned limit while probing, never below
        ``min_limit``)."""
        if self.probing:
            return max(self.params.probe_limit, int(self.params.min_limit))
        return int(self._limit)

    @property
    def estimated_limit(self) -> float:
        """The learned limit (unaffected by a probe's pinning), as a float."""
        return self._limit

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def long_running(self) -> int:
        """Admitted requests parked as long (not in :attr:`in_flight`)."""
        return self._long

    @property
    def probing(self) -> bool:
        return self._probe_start is not None

    @property
    def min_rtt(self) -> float | None:
        return self._min_rtt

    @property
    def sample_rtt(self) -> float | None:
        return self._sample_rtt

    @property
    def mean_rtt(self) -> float | None:
        """The mean RTT of the last window (Little's law's RTT)."""
        return self._mean_rtt

    def available(self) -> int:
        """Free slots under the current limit (how many queued requests may be released)."""
        return max(0, self.limit - self._in_flight)

    def congestion_level(self) -> float:
        """``in_flight / limit`` clamped to [0, 1]: the ``X-GT-Congestion`` value."""
        return min(1.0, self._in_flight / max(1, self.limit))

    def capacity_estimate(self) -> float | None:
        """The app's throughput at the limit by Little's law, ``limit / meanRTT`` requests/s
        (``minRTT`` before the first window; None before the first probe has finished).

        It is the app's capacity while the app is saturated (in flight = limit, each request
        taking meanRTT on average), which is when :mod:`mesh.reputation` divides it into fair
        shares.
        """
        rtt = self._mean_rtt if self._mean_rtt is not None else self._min_rtt
        if rtt is None:
            return None
        return self._limit / rtt

    def snapshot(self) -> ConcurrencySnapshot:
        """Every observer above at once (reads only)."""
        return ConcurrencySnapshot(self.limit, self._limit, self._in_flight,
                                   self.congestion_level(), self.probing, self._long,
                                   self._min_rtt,
                                   self._sample_rtt, self.capacity_estimate())

    # --- internals ------------------------------------------------------------------------

    def _maybe_start_probe(self, now: float) -> None:
        if self._probe_start is None and now >= self._next_probe:
            self._probe_start = now
            self._probe_rtts = []

    def _finish_probe(self, now: float) -> None:
        self._min_rtt = min(self._probe_rtts)
        self._probe_start = None
        self._probe_rtts = []
        jitter = self._rng.uniform(0.0, self.params.probe_jitter) if self._rng else 0.0
        self._next_probe = now + self.params.probe_interval * (1.0 + jitter)
        self._window, self._window_start, self._window_peak = [], None, self._in_flight

    def _update_limit(self, now: float) -> None:
        p = self.params
        ordered = sorted(self._window)
        index = min(len(ordered) - 1, max(0, math.ceil(p.percentile * len(ordered)) - 1))
        self._sample_rtt = ordered[index]
        self._mean_rtt = math.fsum(ordered) / len(ordered)
        if self._min_rtt is None:  # on_finish without on_start: nothing to compare against
            self._window, self._window_start = [], now
            return
        gradient = (1.0 + p.tolerance) * self._min_rtt / self._sample_rtt
        gradient = min(1.0, max(p.min_gradient, gradient))
        if self._window_peak < self._limit / 2:
            # app-limited: the window says nothing about the limit (Gradient2's rule)
            self._window, self._window_start, self._window_peak = [], now, self._in_flight
            return
        target = self._limit * gradient + math.sqrt(self._limit)
        new_limit = (1.0 - p.smoothing) * self._limit + p.smoothing * target
        self._limit = min(p.max_limit, max(p.min_limit, new_limit))
        self._window, self._window_start, self._window_peak = [], now, self._in_flight
