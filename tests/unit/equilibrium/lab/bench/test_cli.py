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


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_the_recorded_command_repeats_the_run_with_the_scenarios_own_options(name: str) -> None:
    """The header's command holds every option of the scenario, given or defaulted: run
    again, it resolves to the same command and the same values."""
    scenarios, _ = all_scenarios()
    scenario = next(s for s in scenarios if s.name == name)
    args = _parse(["bench", "--scenario", name])
    _, argv = cli.resolve(args)
    again = _parse(argv)
    _, argv_again = cli.resolve(again)
    assert argv_again == argv
    for action in cli.scenario_options(scenario):
        assert getattr(again, action.dest) == getattr(args, action.dest), action.dest
        if action.nargs != 0 and getattr(args, action.dest) is not None:
            assert action.option_strings[0] in argv


def test_a_scenario_option_given_is_in_the_recorded_command() -> None:
    args = _parse(["bench", "--scenario", "signaler-scale", "--scale-publishers", "1000",
                   "--scale-warmup", "8"])
    _, argv = cli.resolve(args)
    text = " ".join(argv)
    assert "--scale-publishers 1000" in text and "--scale-warmup 8" in text
    assert "--scale-encodings 2" in text  # a default is recorded too
    flag = _parse(["bench", "--scenario", "demo", "--demo-no-signaler"])
    assert "--demo-no-signaler" in cli.resolve(flag)[1]
    assert "--demo-no-signaler" not in cli.resolve(_parse(["bench", "--scenario", "demo"]))[1]
