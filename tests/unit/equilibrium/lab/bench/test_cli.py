"""equilibrium.lab.bench.cli: scenario defaults resolved into an exact command, and a scenario
that fails to import reported without hiding the others."""

from __future__ import annotations

import argparse

import pytest

from equilibrium.lab.bench import cli
from equilibrium.lab.bench.scenarios import SCENARIOS, all_scenarios


def test_a_scenario_module_that_fails_to_import_does_not_hide_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(SCENARIOS, "broken", "equilibrium.lab.bench.no_such_module")
    loaded, broken = all_scenarios()
    assert "slow-pod" in [s.name for s in loaded]
    assert list(broken) == ["broken"] and "ModuleNotFoundError" in broken["broken"]
    assert cli.main(_parse(["bench", "--scenario", "broken"])) == 2


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    return parser.parse_args(argv)


def test_cli_resolves_scenario_defaults_into_an_exact_command() -> None:
    args = _parse(["bench", "--scenario", "slow-pod", "--policies", "round-robin,equilibrium"])
    scenario, argv = cli.resolve(args)
    assert scenario.name == "slow-pod"
    assert args.policies == ["round-robin", "equilibrium"]
    assert args.duration == scenario.default_duration
    assert argv[:5] == ["bench", "--scenario", "slow-pod", "--policies",
                        "round-robin,equilibrium"]
    assert "--duration" in argv and "--rate" in argv
    assert args.clients == 2  # the scenario's default number of callers
    herding = _parse(["bench", "--scenario", "herding"])
    cli.resolve(herding)
    assert (herding.clients, herding.rate) == (4, 27.5)
    given = _parse(["bench", "--scenario", "herding", "--clients", "3"])
    cli.resolve(given)
    assert given.clients == 3
    args = _parse(["bench", "--policies", "equilibrium,equilibrium"])
    with pytest.raises(ValueError, match="twice"):
        cli.resolve(args)
    assert cli.main(_parse(["bench", "--scenario", "nope"])) == 2
