"""Simulated pods: queues with a service-time distribution, in virtual time.

Owns :class:`PodSpec` (what a pod is: its servers, how long a request takes, the seed's bad-pod
delay) and :class:`Pod` (its state during a run: busy servers, a FIFO queue, up or gone). The
two modes mirror :class:`equilibrium.lab.fleet.PodBehaviour`, the real fleet's pods:

- ``servers=None`` (the fleet's default): every request is served at once, in parallel, taking
  ``service_time`` ± uniform ``jitter`` (an M/G/inf station: no queue);
- ``servers=c``: at most c requests in service, the rest wait FIFO; service times are drawn
  from ``distribution`` with mean ``1 / service_rate`` (``exponential``: an M/M/c queue;
  ``lognormal`` or ``pareto``: heavy tails of the same mean).

A ``bad`` pod adds ``bad_delay`` to a random ``bad_fraction`` of its requests, after the server
is released, as the fleet does. Must not schedule events or read clocks: the engine
(:mod:`equilibrium.lab.simulate.engine`) asks a pod what happens and schedules it.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Distribution = Literal["exponential", "lognormal", "pareto", "constant"]
#: shape of the heavy-tailed service times: lognormal sigma, Pareto alpha (finite mean, and a
#: finite variance only for the lognormal)
LOGNORMAL_SIGMA = 1.0
PARETO_ALPHA = 1.5


@dataclass(frozen=True, slots=True)
class PodSpec:
    """How one pod answers (times in seconds, rates per second)."""

    servers: int | None = None
    service_time: float = 0.003
    jitter: float = 0.001
    service_rate: float = 200.0
    distribution: Distribution = "exponential"
    bad: bool = False
    bad_delay: float = 0.5
    bad_fraction: float = 0.5

    def healed(self) -> PodSpec:
        return replace(self, bad=False)

    def mean_service(self) -> float:
        """Mean time in service (without queueing and without the bad delay)."""
        return self.service_time if self.servers is None else 1.0 / self.service_rate

    def capacity(self) -> float:
        """Requests per second it can serve (inf without a server limit)."""
        return math.inf if self.servers is None else self.servers * self.service_rate

    def as_dict(self) -> dict[str, Any]:
        return {
            "servers": self.servers, "service_time": self.service_time, "jitter": self.jitter,
            "service_rate": self.service_rate, "distribution": self.distribution,
            "bad": self.bad, "bad_delay": self.bad_delay, "bad_fraction": self.bad_fraction,
        }


def service_sampler(spec: PodSpec, rng: random.Random) -> Any:
    """A function drawing one service time for ``spec`` (mean ``spec.mean_service()``)."""
    if spec.servers is None:
        base, jitter, uniform = spec.service_time, spec.jitter, rng.uniform
        if jitter <= 0:
            return lambda: base
        return lambda: max(0.0, base + uniform(-jitter, jitter))
    mean = 1.0 / spec.service_rate
    if spec.distribution == "exponential":
        rate, expo = spec.service_rate, rng.expovariate
        return lambda: expo(rate)
    if spec.distribution == "constant":
        return lambda: mean
    if spec.distribution == "lognormal":
        sigma = LOGNORMAL_SIGMA
        mu = math.log(mean) - sigma * sigma / 2.0  # E[X] = exp(mu + sigma^2 / 2)
        lognorm = rng.lognormvariate
        return lambda: lognorm(mu, sigma)
    if spec.distribution == "pareto":
        alpha = PARETO_ALPHA
        scale = mean * (alpha - 1.0) / alpha  # E[X] = scale * alpha / (alpha - 1)
        pareto = rng.paretovariate
        return lambda: scale * pareto(alpha)
    raise ValueError(f"unknown service-time distribution {spec.distribution!r}")


@dataclass(slots=True)
class Pod:
    """One pod during a run (see the module docstring)."""

    name: str
    spec: PodSpec
    rng: random.Random
    up: bool = True
    busy: int = 0
    queue: deque[Any] = field(default_factory=deque)
    served: int = 0
    direct: bool = False
    free: list[float] = field(default_factory=list)
    _draw: Any = None

    def __post_init__(self) -> None:
        self._draw = service_sampler(self.spec, self.rng)

    def start_direct(self) -> None:
        """Serve FIFO by computing each request's departure when it arrives, instead of by
        events (:meth:`departure`). Exact -- the same times from the same draws as the queue
        of events -- for a pod whose behaviour and presence never change during the run and
        that is never bad (the bad delay is drawn as a request leaves, which FIFO does not
        order); the same order of events too unless two fall at the very same instant (the
        engine keeps constant service times on events for that): the engine decides which
        pods qualify."""
        self.direct = True
        self.free = [0.0] * (self.spec.servers or 0)

    def departure(self, arrival: float) -> float:
        """A direct pod (:meth:`start_direct`) with c servers: when the request arriving at
        ``arrival`` leaves. Under FIFO it starts on the server that frees first, at once if
        that one is idle (Kiefer & Wolfowitz 1955's workload vector: the c instants at which
        the servers free up, kept as a heap), and takes a service time drawn then -- requests
        start in the order they arrive, so the draws are those the queue of events makes."""
        free = self.free
        start = free[0]
        done = (arrival if start <= arrival else start) + self._draw()
        heapq.heapreplace(free, done)
        return done

    def change(self, spec: PodSpec) -> None:
        """New behaviour from now on (requests in service keep their drawn times)."""
        self.spec = spec
        self._draw = service_sampler(spec, self.rng)

    def draw_service(self) -> float:
        return float(self._draw())

    def draw_extra(self) -> float:
        """The bad delay for this request (0 unless the pod is bad and the coin says so)."""
        spec = self.spec
        if spec.bad and self.rng.random() < spec.bad_fraction:
            return spec.bad_delay
        return 0.0
