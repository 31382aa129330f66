"""equilibrium.lab.bench.scenarios: the registry loads every scenario and rejects unknown ones."""

from __future__ import annotations

import pytest

from equilibrium.lab.bench.scenarios import SCENARIOS, load_scenario


def test_registry_loads_every_scenario_and_rejects_unknown() -> None:
    for name in SCENARIOS:
        assert load_scenario(name).name == name
    with pytest.raises(ValueError, match="unknown scenario 'nope'"):
        load_scenario("nope")
