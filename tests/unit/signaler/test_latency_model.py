"""LatencyModel: the curve's shape past the knee, and the robust fit from observations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from signaler.latency_model import (
    DEFAULT_QUEUEING_SHARE,
    LatencyModel,
    _queueing,
    _queueing_rows,
    _weighted_median,
    _weighted_medians,
    fit_latency_model,
)

TRUE = LatencyModel(d=0.005, mu=100.0)


def test_latency_below_knee_is_the_mm1_formula() -> None:
    assert TRUE.latency(0.0) == pytest.approx(0.005 + 1 / 100)
    assert TRUE.latency(60.0) == pytest.approx(0.005 + 1 / 40)


def test_past_the_knee_the_curve_is_the_tangent_line_finite_convex_increasing() -> None:
    kappa = TRUE.knee_load
    slope = 1 / (TRUE.mu - kappa) ** 2
    for x in (kappa + 1, TRUE.mu, 2 * TRUE.mu, 10 * TRUE.mu):
        assert TRUE.latency(x) == pytest.approx(TRUE.latency(kappa) + slope * (x - kappa))
    loads = np.linspace(0, 3 * TRUE.mu, 3001)
    values = np.asarray(TRUE.latency(loads))
    assert np.all(np.isfinite(values))
    assert np.all(np.diff(values) > 0)
    assert np.all(np.diff(values, 2) >= -1e-12)  # convex
    # x * l(x) is convex too: its derivative (the marginal cost) never decreases.
    marginal = np.asarray(TRUE.marginal_cost(loads))
    assert np.all(np.diff(marginal) >= -1e-9)


def test_marginal_cost_is_the_derivative_of_total_cost() -> None:
    for x in (10.0, 80.0, TRUE.knee_load + 3.0):
        h = 1e-5
        numeric = (TRUE.total_cost(x + h) - TRUE.total_cost(x - h)) / (2 * h)
        assert TRUE.marginal_cost(x) == pytest.approx(numeric, rel=1e-5)


@pytest.mark.parametrize(
    ("d", "mu"), [(-1.0, 10.0), (0.1, 0.0), (0.1, -3.0), (math.nan, 1.0), (0.1, math.inf)]
)
def test_invalid_parameters_are_rejected(d: float, mu: float) -> None:
    with pytest.raises(ValueError):
        LatencyModel(d=d, mu=mu)


def test_negative_load_is_rejected() -> None:
    with pytest.raises(ValueError):
        TRUE.latency(-1.0)


def _noisy_observations(seed: int, size: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    loads = rng.uniform(10, 90, size)
    return loads, np.asarray(TRUE.latency(loads)) * rng.lognormal(0, 0.05, size)


@pytest.mark.parametrize("seed", range(4))
def test_fit_recovers_known_parameters_from_noisy_data(seed: int) -> None:
    loads, latencies = _noisy_observations(seed)
    model = fit_latency_model(loads, latencies)
    assert model.mu == pytest.approx(TRUE.mu, rel=0.03)
    assert model.d == pytest.approx(TRUE.d, abs=0.0015)


@pytest.mark.parametrize("seed", range(4))
def test_fit_is_robust_to_outliers(seed: int) -> None:
    loads, latencies = _noisy_observations(seed)
    rng = np.random.default_rng(100 + seed)
    outliers = rng.choice(loads.size, 5, replace=False)
    latencies[outliers] *= 20  # e.g. epochs with a GC pause or a timeout
    robust = fit_latency_model(loads, latencies)
    assert robust.mu == pytest.approx(TRUE.mu, rel=0.05)
    assert robust.d == pytest.approx(TRUE.d, abs=0.002)


def test_fit_respects_observation_weights() -> None:
    loads, latencies = _noisy_observations(7)
    bad = np.array([50.0, 55.0])
    weighted = fit_latency_model(
        np.concatenate([loads, bad]),
        np.concatenate([latencies, [5.0, 5.0]]),
        weights=np.concatenate([np.full(loads.size, 100.0), [1.0, 1.0]]),
    )
    assert weighted.mu == pytest.approx(TRUE.mu, rel=0.05)


def test_no_samples_returns_prior_or_raises() -> None:
    prior = LatencyModel(d=0.01, mu=50.0)
    assert fit_latency_model([], [], prior=prior) == prior
    with pytest.raises(ValueError, match="no observations"):
        fit_latency_model([], [])


def test_one_sample_without_prior_splits_latency_by_convention() -> None:
    model = fit_latency_model([20.0], [0.04])
    assert model.d == pytest.approx((1 - DEFAULT_QUEUEING_SHARE) * 0.04)
    # The point lies on the fitted curve.
    assert model.latency(20.0) == pytest.approx(0.04)


def test_one_sample_with_prior_keeps_d_and_solves_mu() -> None:
    prior = LatencyModel(d=0.005, mu=300.0)
    model = fit_latency_model([60.0], [TRUE.latency(60.0)], prior=prior)
    assert model.d == prior.d
    assert model.mu == pytest.approx(TRUE.mu)


def test_two_samples_with_prior_take_the_median_capacity() -> None:
    prior = LatencyModel(d=0.005, mu=300.0)
    model = fit_latency_model([30.0, 70.0], [TRUE.latency(30.0), TRUE.latency(70.0)], prior=prior)
    assert model.mu == pytest.approx(TRUE.mu, rel=1e-9)


def test_samples_without_visible_queueing_keep_prior_capacity() -> None:
    prior = LatencyModel(d=0.02, mu=80.0)
    model = fit_latency_model([5.0, 6.0], [0.01, 0.012], prior=prior)
    assert model.mu == prior.mu
    assert model.d == pytest.approx(0.01)


def test_samples_all_at_one_load_fall_back_instead_of_guessing() -> None:
    prior = LatencyModel(d=0.005, mu=300.0)
    loads = np.full(20, 60.0)
    model = fit_latency_model(loads, np.full(20, TRUE.latency(60.0)), prior=prior)
    assert model.d == prior.d
    assert model.mu == pytest.approx(TRUE.mu)


@pytest.mark.parametrize(
    ("loads", "latencies"),
    [
        ([1.0, 2.0, math.nan], [0.1, 0.2, 0.3]),
        ([1.0, 2.0, 3.0], [0.1, math.inf, 0.3]),
        ([1.0, -2.0, 3.0], [0.1, 0.2, 0.3]),
        ([1.0, 2.0, 3.0], [0.1, -0.2, 0.3]),
        ([1.0, 2.0], [0.1, 0.2, 0.3]),
    ],
)
def test_bad_observations_are_rejected(loads: list[float], latencies: list[float]) -> None:
    with pytest.raises(ValueError):
        fit_latency_model(loads, latencies)


def test_the_grid_helpers_equal_the_one_candidate_computations() -> None:
    """The fit scores every candidate capacity at once (``_queueing_rows``,
    ``_weighted_medians``); each row must be exactly what the one-candidate helpers give,
    ties and repeated values included."""
    rng = np.random.default_rng(5)
    for trial in range(50):
        n = int(rng.integers(1, 40))
        loads = rng.uniform(0.0, 120.0, n)
        weights = rng.integers(1, 50, n).astype(float)
        mus = np.unique(np.concatenate([rng.uniform(60.0, 400.0, 30), loads[:3] * 0.7 + 1.0]))
        rows = _queueing_rows(loads, mus, 0.95)
        for i, mu in enumerate(mus):
            assert np.array_equal(rows[i], _queueing(loads, float(mu), 0.95))
        values = np.round(rng.normal(0.0, 1.0, (25, n)), 1 if trial % 2 else 6)  # ties
        medians = _weighted_medians(values, weights)
        assert [_weighted_median(row, weights) for row in values] == medians.tolist()


def test_the_golden_section_search_stops_once_the_bracket_is_narrow_enough() -> None:
    from signaler.latency_model import _golden_section

    calls: list[float] = []

    def f(m: float) -> float:
        calls.append(m)
        return (m - 31.7) ** 2

    found = _golden_section(f, 30.0, 34.5)
    assert abs(found - 31.7) <= 1e-8 * 31.7
    assert 40 <= len(calls) <= 50  # not the 62 of a fixed 60 iterations
    calls.clear()
    assert abs(_golden_section(f, 30.0, 34.5, tolerance=0.0) - 31.7) <= 1e-9
    assert len(calls) == 62
