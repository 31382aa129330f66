"""The event engine against queueing theory: M/M/1 and M/M/c mean times in the system.

One pod, Poisson arrivals (many sidecars, each Poisson), no network delay and no proxy
overhead, so a request's recorded latency is its time at the pod: the mean must match
``1 / (mu - lambda)`` for M/M/1 and the Erlang C formula for M/M/c within 2 %. The runs are
seeded, so each test is deterministic; the sizes keep the standard error of the mean near
0.5 %, so passing is not luck. Also: the optimum module's curves, Wardrop split and social
optimum on a case solvable by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from equilibrium.lab.simulate.engine import Knobs, simulate
from equilibrium.lab.simulate.optimum import benchmarks, erlang_c, expected_latency
from equilibrium.lab.simulate.pods import PodSpec
from equilibrium.lab.simulate.scenarios import Setup, Sizes, build

EXACT = Knobs(network=0.0, overhead=0.0, arrivals="poisson")


def mean_time_in_system(servers: int, mu: float, lam: float, duration: float) -> float:
    setup = Setup("queue", (PodSpec(servers=servers, service_rate=mu),), sidecars=1,
                  rate=lam, duration=duration, warmup=0.0)
    result = simulate(setup, "round-robin", seed=3, knobs=EXACT)
    intended = np.frombuffer(result.records.intended, dtype=np.float64)
    latency = np.frombuffer(result.records.latency, dtype=np.float64)
    return float(latency[intended >= 50.0].mean())  # past the transient


def test_erlang_c_matches_known_values() -> None:
    assert erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: P(wait) = rho
    # M/M/2 at a = 1 (rho = 0.5): C = (a^2/2 / (1 - rho)) / (1 + a + a^2/2/(1 - rho)) = 1/3
    assert erlang_c(2, 1.0) == pytest.approx(1.0 / 3.0)


@pytest.mark.slow
def test_mm1_mean_time_in_system() -> None:
    mu, lam = 100.0, 60.0
    measured = mean_time_in_system(1, mu, lam, 1050.0)
    assert measured == pytest.approx(1.0 / (mu - lam), rel=0.02)


@pytest.mark.slow
def test_mmc_mean_time_in_system() -> None:
    c, mu, lam = 4, 25.0, 70.0
    expected = erlang_c(c, lam / mu) / (c * mu - lam) + 1.0 / mu
    measured = mean_time_in_system(c, mu, lam, 1050.0)
    assert measured == pytest.approx(expected, rel=0.02)
    assert expected == pytest.approx(expected_latency(PodSpec(servers=c, service_rate=mu), lam))


def test_wardrop_and_optimum_on_two_mm1_pods() -> None:
    """Two M/M/1 pods, mu = 100 and 50, demand 60. Wardrop: equal 1/(mu - x) -> x1 - x2 = 50,
    so (55, 5); optimum: equal mu/(mu - x)^2 -> (100 - x1) = sqrt(2) (50 - x2)."""
    pods = [PodSpec(servers=1, service_rate=100.0), PodSpec(servers=1, service_rate=50.0)]
    out = benchmarks(pods, 60.0, fixed=0.0)
    assert out is not None
    assert out["wardrop_shares"][0] * 60 == pytest.approx(55.0, abs=1e-4)
    r = math.sqrt(2.0)
    x2 = (50.0 * r - 40.0) / (1.0 + r)  # with x1 = 60 - x2
    assert out["optimum_shares"][1] * 60 == pytest.approx(x2, abs=1e-4)
    wardrop_mean = 1.0 / (100.0 - 55.0)
    assert out["wardrop_mean"] == pytest.approx(wardrop_mean, rel=1e-6)
    assert out["price_of_anarchy"] > 1.0


@pytest.mark.parametrize(("scenario", "distribution", "policy"), [
    ("herding", "exponential", "equilibrium"),
    ("herding", "pareto", "peak-ewma"),
    ("recovery", "lognormal", "equilibrium"),  # its bad pod heals: that one by events
    ("churn", "exponential", "peak-ewma"),  # pods leave and join: those by events
    ("herding", "constant", "equilibrium"),  # ties to the instant: every pod by events
])
def test_departures_computed_on_arrival_are_those_of_the_queue_of_events(
        scenario: str, distribution: str, policy: str) -> None:
    """A pod that never changes serves FIFO on c servers the same whether each departure is
    computed when the request arrives or found by events, from the same draws: the same
    records to the last bit, in about half the events. (With ``--jitter`` the jitter's draws
    go to the requests in another order: the same distribution, not the same bits.)"""
    setup = build(scenario, Sizes(12, 6, 40.0, 8.0, distribution))
    assert any(p.servers is not None for p in setup.pods)
    direct = simulate(setup, policy, seed=4)
    by_events = simulate(setup, policy, seed=4, direct=False)
    for column in ("intended", "latency", "pod", "ok", "sidecar"):
        assert getattr(direct.records, column) == getattr(by_events.records, column), column
    assert len(direct.records) > 3000
    if distribution != "constant":
        assert direct.events < 0.75 * by_events.events
    else:
        assert direct.events == by_events.events
