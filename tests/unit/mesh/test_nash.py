"""Equilibrium checks: Wardrop gap, flapping index, converged flag."""

from __future__ import annotations

import numpy as np
import pytest

from mesh.nash import StabilityMonitor, wardrop_gap


def test_wardrop_gap_is_zero_at_equal_latencies_and_positive_otherwise() -> None:
    assert wardrop_gap(np.array([0.5, 0.5]), np.array([0.01, 0.01])) == 0.0
    assert wardrop_gap(np.array([0.5, 0.5]), np.array([0.01, 0.03])) == pytest.approx(0.01)
    assert wardrop_gap(np.array([1.0, 0.0]), np.array([0.01, np.inf])) == 0.0


def test_flapping_index_and_convergence() -> None:
    m = StabilityMonitor(window=1.0, settle_windows=2)
    t = 0.0
    for i in range(40):  # alternate between two splits every window: flapping
        w = np.array([0.9, 0.1]) if (i // 4) % 2 else np.array([0.1, 0.9])
        m.record(w, 0.0, t)
        t += 0.25
    assert m.flapping > 0.3 and not m.converged
    for _ in range(40):  # now steady
        m.record(np.array([0.5, 0.5]), 0.0, t)
        t += 0.25
    assert m.flapping < 0.05 and m.converged
