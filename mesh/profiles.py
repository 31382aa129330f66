"""Named strategy profiles: the values behind ``equilibrium.io/strategy``.

A profile is a documented bundle of parameters, so that operators choose a behaviour by name
rather than tune a dozen knobs:

- ``balanced`` (default) — learns within a few seconds, caps any endpoint at 80 %, re-admits a
  recovered endpoint over about 5 s, explores a bad endpoint with at most 0.5 % of requests.
- ``aggressive-learning`` — shorter memories and faster ticks: moves traffic off a bad pod
  roughly twice as fast, at the price of more noise in the shares (more flapping).
- ``conservative`` — longer memories, slower ticks, a lower cap (60 %) and a slower ramp:
  very stable shares, slower to react; for fleets where herding is the main risk.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from mesh.herd import HerdGuard
from mesh.profile_names import PROFILE_NAMES


@dataclass(frozen=True, slots=True)
class StrategyProfile:
    name: str
    # learning
    regret_mode: Literal["conditional", "unconditional"] = "conditional"
    tick_interval: float = 0.5          # seconds between strategy rebuilds
    estimator_tau: float = 2.0          # EWMA time constant of latency estimates (s)
    regret_memory: float = 5.0          # time constant of the discounted regrets (s)
    peak_ewma_decay: float = 10.0       # Linkerd's default, for the peak-ewma baseline
    default_rtt: float = 0.030          # estimate of an endpoint never measured (s)
    # how many requests an endpoint may run ahead of or behind its share so that each request
    # goes where it should finish first (mesh.pacing; the callee's reported in-flight count
    # included, mesh.estimators.EndpointStats.finish_cost); 0 draws every request at random
    # from the weights instead
    pacing_window: float = 4.0
    # shaping (thundering-herd defence)
    herd: HerdGuard = field(default_factory=HerdGuard)
    # failures
    failure_penalty: float = 1.0        # latency charged to a failed request (s)
    eject_after_failures: int = 5       # consecutive failures that eject an endpoint
    eject_base: float = 10.0            # first ejection (s); doubles per repeat, max 8x
    # proxying
    request_timeout: float = 15.0
    connect_timeout: float = 1.0
    retry_budget_ratio: float = 0.2
    retry_budget_min_per_s: float = 10.0
    max_retries: int = 2
    # the proxy hedges exploratory picks (--hedge, mesh.hedging): a look at a pod held back
    # costs its caller little, so a quick answer of one gets the next request at once
    # (RegretMatchingPolicy._confirmation_due)
    hedged: bool = False
    # stability checks
    stability_window: float = 5.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# One entry per name in mesh/profile_names.py, in its order (a unit test holds them equal).
PROFILES: dict[str, StrategyProfile] = {
    "balanced": StrategyProfile(name="balanced"),
    "aggressive-learning": StrategyProfile(
        name="aggressive-learning",
        tick_interval=0.25,
        estimator_tau=1.0,
        regret_memory=2.0,
        herd=HerdGuard(cap=0.8, ramp_per_s=0.2, explore_floor=0.01, smoothing=0.8),
        eject_after_failures=3,
        stability_window=3.0,
    ),
    "conservative": StrategyProfile(
        name="conservative",
        tick_interval=1.0,
        estimator_tau=5.0,
        regret_memory=15.0,
        herd=HerdGuard(cap=0.6, ramp_per_s=0.05, explore_floor=0.005, smoothing=0.3),
        eject_after_failures=7,
        stability_window=10.0,
    ),
}


def get_profile(name: str) -> StrategyProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown strategy profile {name!r}; choose one of {', '.join(PROFILE_NAMES)}"
        ) from None
