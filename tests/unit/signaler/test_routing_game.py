"""signaler.routing_game: the configurations of n tokens over k endpoints."""

from __future__ import annotations

import numpy as np

from signaler.routing_game import (
    enumerate_configurations,
)


def test_enumeration_counts_and_covers_every_configuration() -> None:
    configurations = enumerate_configurations(5, 3)
    assert configurations.shape == (21, 3)  # C(7, 2)
    assert np.all(configurations.sum(axis=1) == 5)
    assert len({tuple(row) for row in configurations}) == 21
