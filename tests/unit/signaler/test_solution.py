"""signaler.solution: a solution's arrays cannot be changed by whoever reads them."""

from __future__ import annotations

import pytest

from signaler.lp import (
    CorrelatedEquilibriumLP,
)
from tests.signaling_samples import ASYMMETRIC


def test_solution_arrays_are_read_only() -> None:
    solution = CorrelatedEquilibriumLP(ASYMMETRIC, 4, 2.0).solve()
    with pytest.raises(ValueError):
        solution.probabilities[0] = 0.5
