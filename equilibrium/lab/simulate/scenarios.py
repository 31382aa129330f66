"""The simulator's scenarios: which pods, how many sidecars, what happens when.

Owns :class:`Setup` (pods, sidecars, load, the timeline of changes) and one builder per
scenario, each named and sized as ``equilibrium bench`` sizes its namesake where there is one:

- ``slow-pod``: pods answer in 3 ms ± 1 ms without a queue (the real fleet's default pods);
  the last one adds 500 ms to a random half of its requests. Tracked pod: the bad one.
- ``herding``: capacity-limited M/M/c pods. A quarter of them (at least one) are small and
  quick (one server at 50/s per scale unit), the rest big and slow (four servers at 12.5/s);
  the load is 55 % of the capacity. At the bench's size (4 sidecars x 27.5 req/s, 4 pods) the
  scale is one; with more sidecars the servers are multiplied so that the load stays at 55 %.
- ``recovery``: equal M/M/c pods at 55 % load; the last one is bad (500 ms added to half of
  its requests) and heals at a third of the run while every sidecar watches. Tracked pod: it;
  reported: how long until it carries its fair share again and how far the herd overshoots.
- ``churn``: equal M/M/c pods at 55 % load; at 20 %, 40 %, 60 % and 80 % of the run a pod
  leaves (connections refused until discovery drops it), a new pod joins, a tenth of the
  sidecars leave and as many fresh ones join.

Must not run anything: :mod:`equilibrium.lab.simulate.engine` runs a setup.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from equilibrium.lab.simulate.pods import Distribution, PodSpec

#: (time, what, argument): "heal" pod index; "pod-leave" / "pod-join" pod index;
#: "sidecars-leave" / "sidecars-join" count
Change = tuple[float, str, int]


@dataclass(frozen=True, slots=True)
class Setup:
    """One scenario at one size (times in seconds, rates per second per sidecar)."""

    scenario: str
    pods: tuple[PodSpec, ...]
    sidecars: int
    rate: float
    duration: float
    warmup: float = 0.0
    tracked: int | None = None
    """The pod whose share is followed (the bad one, the healing one), if any."""
    absent: frozenset[int] = frozenset()
    """Pods that are not there at the start (they join later)."""
    changes: tuple[Change, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def total(self) -> float:
        return self.warmup + self.duration


@dataclass(frozen=True, slots=True)
class Sizes:
    sidecars: int | None
    endpoints: int | None
    rate: float | None
    duration: float | None
    distribution: Distribution = "exponential"


def _mmc_scale(sidecars: int, rate: float, base_capacity: float, load: float) -> float:
    return sidecars * rate / (load * base_capacity)


def slow_pod(s: Sizes) -> Setup:
    k = s.endpoints or 5
    pods = [PodSpec() for _ in range(k)]
    pods[-1] = replace(pods[-1], bad=True)
    return Setup("slow-pod", tuple(pods), s.sidecars or 2, s.rate or 100.0, s.duration or 30.0,
                 tracked=k - 1)


HERDING_LOAD = 0.55


def herding(s: Sizes) -> Setup:
    k = s.endpoints or 4
    n, rate = s.sidecars or 4, s.rate or 27.5
    small = max(1, k // 4)
    scale = _mmc_scale(n, rate, 50.0 * k, HERDING_LOAD)
    small_servers = max(1, round(scale))
    big_servers = max(1, round(4 * scale))
    pods = [PodSpec(servers=small_servers, service_rate=50.0, distribution=s.distribution)
            for _ in range(small)]
    pods += [PodSpec(servers=big_servers, service_rate=12.5, distribution=s.distribution)
             for _ in range(k - small)]
    return Setup("herding", tuple(pods), n, rate, s.duration or 60.0, warmup=5.0,
                 notes=(f"{small} small pod(s) x {small_servers} server(s) at 50/s, "
                        f"{k - small} big pod(s) x {big_servers} servers at 12.5/s; "
                        f"load {HERDING_LOAD:.0%} of capacity",))


def _equal_mmc(s: Sizes, default_sidecars: int, default_rate: float) -> tuple[PodSpec, int]:
    k = s.endpoints or 5
    n, rate = s.sidecars or default_sidecars, s.rate or default_rate
    per_pod = n * rate / (HERDING_LOAD * k)
    servers = max(1, math.ceil(per_pod / 50.0))  # servers at 50/s each
    return PodSpec(servers=servers, service_rate=per_pod / servers,
                   distribution=s.distribution), k


def recovery(s: Sizes) -> Setup:
    spec, k = _equal_mmc(s, 10, 50.0)
    pods = [spec] * k
    pods[-1] = replace(spec, bad=True)
    duration = s.duration or 60.0
    return Setup("recovery", tuple(pods), s.sidecars or 10, s.rate or 50.0, duration,
                 tracked=k - 1, changes=((duration / 3.0, "heal", k - 1),))


def churn(s: Sizes) -> Setup:
    spec, k = _equal_mmc(s, 10, 50.0)
    duration = s.duration or 60.0
    n = s.sidecars or 10
    pods = [spec] * (k + 1)  # the last one joins later
    step = max(1, n // 10)
    changes = (
        (0.2 * duration, "pod-leave", 0),
        (0.4 * duration, "pod-join", k),
        (0.6 * duration, "sidecars-leave", step),
        (0.8 * duration, "sidecars-join", step),
    )
    return Setup("churn", tuple(pods), n, s.rate or 50.0, duration, tracked=k,
                 absent=frozenset({k}), changes=changes)


SCENARIOS: dict[str, Callable[[Sizes], Setup]] = {
    "slow-pod": slow_pod, "herding": herding, "recovery": recovery, "churn": churn,
}
#: policies compared when --policies is not given
DEFAULT_POLICIES: dict[str, tuple[str, ...]] = {
    "slow-pod": ("round-robin", "p2c-least-request", "peak-ewma", "equilibrium"),
    "herding": ("peak-ewma", "equilibrium", "equilibrium-ce"),
    "recovery": ("peak-ewma", "equilibrium", "equilibrium-ce"),
    "churn": ("peak-ewma", "equilibrium", "equilibrium-ce"),
}


def build(name: str, sizes: Sizes) -> Setup:
    try:
        builder = SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; choose one of "
                         f"{', '.join(SCENARIOS)}") from None
    return builder(sizes)
