"""Probes: what an inbound sidecar reports about its app, and when a caller asks.

Prequal (Wydrowski et al., "Load is not what you should balance", NSDI '24) routes by asking
the servers (requests in flight, recent latency) instead of experimenting on user traffic. In
this mesh every meshed pod has an inbound sidecar in front of it that knows exactly that, so a
caller asks it with a probe (wire format: :mod:`wire.probe`; exchange: docs/protocol.md).

This module owns the pure parts, all with the clock and the random generator passed in:

- :class:`ProbeReport` — one verified answer: the app's requests in flight, the latency of its
  recent requests (mean, median, p90, sample count), congestion level, concurrency limit,
  draining.
- :class:`LatencyWindow` — the inbound side's record of its app's recent latencies, from which
  a report is made (bounded in time and in samples).
- :class:`AwaitedAnswers` — the requests at the app still waiting for their answer's head, so
  that an app that stopped answering (a hung pod) shows in the report at once, before any of
  them times out, instead of with the latencies it had before.
- :class:`ProbeSchedule` — the caller's timetable: when each endpoint is next probed, jittered,
  a few times a second for an endpoint this caller does not use, less often for one that
  carries its traffic (its responses report through ``X-GT-Congestion`` anyway).

It must not do I/O, read a clock or use the global random generator.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice


@dataclass(frozen=True, slots=True)
class ProbeReport:
    """What an inbound sidecar said about its app, verified (signed with the mesh key and
    bound to the caller's nonce).

    Latencies are in seconds over the responder's last window; with ``samples == 0`` they are
    0 and mean nothing (the app served nobody in the window). ``in_flight`` counts requests at
    the app through that listener, from every caller."""

    in_flight: int
    mean: float
    p50: float
    p90: float
    samples: int
    congestion: float
    limit: int
    draining: bool

    @property
    def has_latency(self) -> bool:
        """Whether the report carries latency evidence (the app served someone recently)."""
        return self.samples > 0


class LatencyWindow:
    """The app's latencies of the last ``span`` seconds, at most ``max_samples`` of them
    (the newest kept), and never fewer than the newest ``min_samples`` not older than
    ``max_age``: what a probe answer summarises. The floor keeps a rarely used app's answers
    from swinging with each lone request (a pod slow on half its requests must not look
    healthy after one lucky answer).

    Why 16: an idle app is measured by the inbound side's idle check, a few samples a second,
    so the floor is what its answers are made of. The seed's bad pod is slow on half its
    requests; the chance that some run of ``m`` of its samples is all fast is about ``n /
    2**(m + 1)`` over ``n`` samples. At ``m = 8`` that happened in two of three 120-s
    ``slow-pod`` runs (about 250 samples each): the answer's mean fell to the good pods'
    latency for a moment and the callers moved traffic back onto the bad pod (a relapse,
    docs/benchmarks.md, 2026-12-04). At ``m = 16`` it is about once in 130,000 samples.
    Pure; ``now`` is passed in."""

    def __init__(self, span: float = 2.0, max_samples: int = 256, min_samples: int = 16,
                 max_age: float = 10.0) -> None:
        if span <= 0 or max_samples < 1 or not 1 <= min_samples <= max_samples \
                or max_age < span:
            raise ValueError("need span > 0, 1 <= min_samples <= max_samples, max_age >= span")
        self.span = span
        self.min_samples = min_samples
        self.max_age = max_age
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)

    def add(self, now: float, latency: float) -> None:
        """One finished request of the app (``latency`` seconds, finished at ``now``)."""
        if math.isfinite(latency) and latency >= 0.0:
            samples = self._samples
            samples.append((now, latency))
            if samples[0][0] < now - self.max_age:  # older than any answer reads
                self._prune(now)

    def _prune(self, now: float) -> None:
        samples, oldest = self._samples, now - self.max_age
        while samples and samples[0][0] < oldest:
            samples.popleft()

    def _recent(self, now: float) -> list[float]:
        self._prune(now)
        samples = self._samples
        horizon = now - self.span
        recent = [latency for at, latency in samples if at >= horizon]
        if len(recent) >= self.min_samples:
            return recent
        return [latency for _, latency in list(samples)[-self.min_samples:]]

    def __len__(self) -> int:
        """Samples kept: at most ``max_samples``, none more than ``max_age`` older than the
        newest."""
        return len(self._samples)

    def summary(self, now: float) -> tuple[float, float, float, int]:
        """(mean, median, p90, count) of the window at ``now``; zeros when it is empty.
        Quantiles are nearest-rank (the smallest sample with at least q of them at or
        below it)."""
        values = sorted(self._recent(now))
        n = len(values)
        if n == 0:
            return 0.0, 0.0, 0.0, 0
        return sum(values) / n, _rank(values, 0.5), _rank(values, 0.9), n


def _rank(ordered: list[float], q: float) -> float:
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


STALL_MIN = 0.05
"""Seconds a stall must last before a report shows it (as the caller's own stall detection,
:data:`mesh.estimators.STALL_MIN`)."""


class AwaitedAnswers:
    """The requests the inbound side sent its app that have no answer head yet, in the order
    they were sent. A :class:`LatencyWindow` learns only from requests that finished: an app
    that accepts requests and never answers (a hung pod) adds nothing to it, and for up to its
    ``max_age`` the report went on showing the latencies from before the hang while requests
    piled up at the app (a helper measured 10 s of healthy answers from a hung pod, and callers
    raised its share meanwhile). The *stall* is the age of the second request still waiting
    among those sent since the app's last answer head: one alone is no stall, however long,
    and an app that answers others meanwhile is not stalled, whatever long polls or slow
    uploads it holds, as on the caller's side
    (:meth:`mesh.estimators.EndpointStats.stalled_for`). :meth:`fold` makes it a lower bound
    on the latency the report states. Pure; ``now`` is passed in."""

    def __init__(self) -> None:
        self._sent: dict[int, float] = {}
        self._next = 0
        self._answered_at = -math.inf  # when the app last sent an answer head

    def __len__(self) -> int:
        return len(self._sent)

    def sent(self, now: float) -> int:
        """A request went to the app at ``now``; the key to pass to :meth:`answered`."""
        key = self._next
        self._next += 1
        self._sent[key] = now
        return key

    def answered(self, key: int, now: float) -> None:
        """The request's answer head came at ``now``: what was sent before it is no stall."""
        if self._sent.pop(key, None) is not None:
            self._answered_at = max(self._answered_at, now)

    def ended(self, key: int) -> None:
        """The request ended, answered or not (idempotent)."""
        self._sent.pop(key, None)

    def stall(self, now: float) -> float:
        """The age of the second request still waiting among those sent since the app's last
        answer head (0 with fewer than two)."""
        since = self._answered_at
        waiting = (sent for sent in self._sent.values() if sent >= since)  # in the order sent
        second = next(islice(waiting, 1, None), None)
        return 0.0 if second is None else max(0.0, now - second)

    def fold(self, now: float, summary: tuple[float, float, float, int]
             ) -> tuple[float, float, float, int]:
        """``summary`` (mean, median, p90, count of a :class:`LatencyWindow`) with the stall
        as a lower bound on each latency, when it is over :data:`STALL_MIN` and twice the
        window's p90 (slow answers are no stall); the count is then at least the requests
        waiting."""
        mean, p50, p90, n = summary
        stall = self.stall(now)
        if stall <= STALL_MIN or (n and stall <= 2.0 * p90):
            return summary
        return max(mean, stall), max(p50, stall), max(p90, stall), max(n, len(self._sent))


@dataclass(frozen=True, slots=True)
class ProbeRates:
    """How often a caller probes one endpoint (per second, before jitter)."""

    idle: float = 4.0
    """Endpoints this caller sends (almost) nothing: probes are all it learns from."""
    busy: float = 0.5
    """Endpoints that carry this caller's traffic (their responses report too). Half a probe a
    second: at 500 req/s the caller's probes then cost about 1 % of its CPU (docs/benchmarks.md,
    ``probe-cost``); an answer that old says little about the next request's queue anyway, only
    about a lasting one."""
    jitter: float = 0.5
    """Each interval is drawn uniformly from ``[1 - jitter, 1 + jitter]`` of its mean, so
    many sidecars never probe in step."""

    def __post_init__(self) -> None:
        if not (0 < self.busy <= self.idle <= 20.0):
            raise ValueError("need 0 < busy <= idle <= 20 probes per second")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError("jitter must be in [0, 1)")


REFUSED_WAIT_MAX = 30.0
"""Seconds between probes, at most, of an endpoint whose answers are not probe answers."""


class ProbeSchedule:
    """When each endpoint is next due for a probe.

    :meth:`due` returns the endpoints whose time has come and schedules their next probe at
    once (so a slow or lost answer never doubles the rate); :meth:`sync` follows the endpoint
    set (a new endpoint is probed within one jittered idle interval, spread so that a fleet of
    new endpoints is not probed all at once)."""

    def __init__(self, rates: ProbeRates | None = None) -> None:
        self.rates = rates or ProbeRates()
        self._next: dict[str, float] = {}
        self._refused: dict[str, int] = {}  # endpoint -> probes refused in a row

    def sync(self, endpoints: Iterable[str], now: float, rng: random.Random) -> None:
        wanted = set(endpoints)
        for gone in set(self._next) - wanted:
            del self._next[gone]
            self._refused.pop(gone, None)
        for endpoint in sorted(wanted - set(self._next)):
            self._next[endpoint] = now + rng.random() / self.rates.idle

    def interval(self, busy: bool, rng: random.Random) -> float:
        """One jittered interval between two probes of an endpoint."""
        mean = 1.0 / (self.rates.busy if busy else self.rates.idle)
        jitter = self.rates.jitter
        return mean * (1.0 - jitter + 2.0 * jitter * rng.random())

    def due(self, now: float, busy: Iterable[str], rng: random.Random) -> list[str]:
        """Endpoints to probe now (in name order); their next probe is scheduled here.
        ``busy`` are the endpoints that carry this caller's traffic.

        An endpoint that is not busy is never due later than the longest idle interval from
        now, so one the caller just dropped is brought forward at once: its next probe was set
        up to ``(1 + jitter) / busy`` seconds away, longer than an answer stays fresh
        (:data:`mesh.estimators.PROBE_FRESH`), and in that gap the dropped endpoint would be
        explored with user requests again."""
        busy_set = set(busy)
        latest = now + (1.0 + self.rates.jitter) / self.rates.idle  # the longest idle interval
        refused = self._refused
        for endpoint, at in self._next.items():
            if at > latest and endpoint not in busy_set and endpoint not in refused:
                self._next[endpoint] = latest
        ready = sorted(e for e, at in self._next.items() if at <= now)
        for endpoint in ready:
            self._next[endpoint] = now + self.interval(endpoint in busy_set, rng)
        return ready

    def refused(self, endpoint: str, now: float, rng: random.Random) -> None:
        """``endpoint`` answered a probe with something other than a probe answer (no
        sidecar in front of it, or one that cannot sign): its next probe waits twice as long
        as the last, up to :data:`REFUSED_WAIT_MAX` (jittered), until it answers one. A
        catch-all app outside the mesh is then asked a few times a minute, not a few times
        a second. An endpoint that does not answer at all is not slowed: it may be a pod on
        its way back, and its probes are how it is readmitted in seconds."""
        if endpoint not in self._next:
            return
        n = self._refused[endpoint] = self._refused.get(endpoint, 0) + 1
        wait = min(REFUSED_WAIT_MAX, 2.0 ** n / self.rates.idle)
        jitter = self.rates.jitter
        self._next[endpoint] = now + wait * (1.0 - jitter + 2.0 * jitter * rng.random())

    def answered(self, endpoint: str) -> None:
        """``endpoint`` answered a probe as a sidecar does: back to the usual rate."""
        self._refused.pop(endpoint, None)

    def next_at(self) -> float | None:
        """The earliest time any endpoint is due (None: no endpoint)."""
        return min(self._next.values(), default=None)

