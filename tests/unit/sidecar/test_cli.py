"""sidecar.cli: options declared once, parsed and handed on; the sidecar's table of them; and
the flag > environment precedence that sidecar.config applies to them."""

from __future__ import annotations

import argparse
from pathlib import Path

from sidecar.cli import CONFIG_OPTIONS, Option, add_options, flags_from_args, option_values
from sidecar.config import ENV_VARS, ConfigSource, SidecarConfig

ZONE = Option("zone", "where it runs (env {env})", "NAME")
TAGS = Option("tags", "labels (repeatable)", "TAG", flag="--tag", repeat=True)
LOUD = Option("loud", "say more (env {env}=1)", switch=True)
TEST_ENV = {"zone": "TEST_ZONE", "loud": "TEST_LOUD"}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_options(parser, (ZONE, TAGS, LOUD), TEST_ENV)
    return parser.parse_args(argv)


def test_every_flag_is_a_setting_with_an_environment_variable() -> None:
    dests = [o.dest for o in CONFIG_OPTIONS]
    assert sorted(dests) == sorted(ENV_VARS) and len(set(dests)) == len(dests)
    parser = argparse.ArgumentParser()
    add_options(parser, CONFIG_OPTIONS)
    values = flags_from_args(parser.parse_args(
        ["--upstream", "a=http://127.0.0.1:1", "--upstream", "b=http://127.0.0.1:2",
         "--drain-timeout", "3", "--mesh-secret-file", "/k"]))
    assert values["upstreams"] == ["a=http://127.0.0.1:1", "b=http://127.0.0.1:2"]
    assert values["drain_timeout"] == "3" and values["mesh_secret_file"] == "/k"
    assert values["redis"] is None and set(values) == set(ENV_VARS)


def test_options_parse_and_name_their_environment_variable_in_the_help() -> None:
    args = parse("--zone", "eu", "--tag", "a", "--tag", "b", "--loud")
    assert option_values(args, (ZONE, TAGS, LOUD)) == {"zone": "eu", "tags": ["a", "b"],
                                                       "loud": True}
    assert option_values(parse(), (ZONE, TAGS, LOUD)) == {"zone": None, "tags": None,
                                                          "loud": None}
    parser = argparse.ArgumentParser()
    add_options(parser, (ZONE, LOUD), TEST_ENV)
    text = parser.format_help()
    assert "(env TEST_ZONE)" in text and "TEST_LOUD=1" in text and "{env}" not in text


def load(argv: list[str], env: dict[str, str]) -> SidecarConfig:
    parser = argparse.ArgumentParser()
    add_options(parser, CONFIG_OPTIONS)
    return ConfigSource.from_sources(flags_from_args(parser.parse_args(argv)), env=env).load()


def test_a_flag_wins_over_the_environment_which_wins_over_nothing() -> None:
    env = {"EQUILIBRIUM_ID": "  us  ", "EQUILIBRIUM_TRANSPARENT": "yes"}
    assert load(["--id", "eu"], env).id == "eu"
    assert load([], env).id == "us"
    assert load([], env).transparent is True
    assert load(["--transparent"], {"EQUILIBRIUM_TRANSPARENT": "0"}).transparent is True
    assert load([], {"EQUILIBRIUM_TRANSPARENT": "no"}).transparent is False
    assert load([], {}).transparent is False


def test_hedging_is_off_unless_the_flag_or_the_environment_turns_it_on(tmp_path: Path) -> None:
    assert load([], {}).hedge is False
    assert load(["--hedge"], {}).hedge is True
    assert load([], {"EQUILIBRIUM_HEDGE": "1"}).hedge is True
    assert load([], {"EQUILIBRIUM_HEDGE": "off"}).hedge is False
    config = tmp_path / "sidecar.json"
    config.write_text('{"hedge": true}')
    assert load(["--config", str(config)], {}).hedge is True


def test_rescue_is_off_unless_the_flag_the_environment_or_the_file_turns_it_on(
        tmp_path: Path) -> None:
    assert load([], {}).rescue is False
    assert load(["--rescue"], {}).rescue is True
    assert load([], {"EQUILIBRIUM_RESCUE": "1"}).rescue is True
    assert load([], {"EQUILIBRIUM_RESCUE": "off"}).rescue is False
    config = tmp_path / "sidecar.json"
    config.write_text('{"rescue": true}')
    assert load(["--config", str(config)], {}).rescue is True


def test_kube_options_keep_their_flags_and_environment_names() -> None:
    parser = argparse.ArgumentParser()
    add_options(parser, CONFIG_OPTIONS)
    args = parser.parse_args(["--kube-api", "http://127.0.0.1:1", "--transparent"])
    names = [o.name for o in CONFIG_OPTIONS]
    assert names[-5:] == ["--transparent", "--discovery", "--discovery-namespaces",
                          "--kube-api", "--kube-token-file"]
    assert args.kube_api == "http://127.0.0.1:1" and args.transparent is True
    text = parser.format_help()
    for variable in ("EQUILIBRIUM_TRANSPARENT=1", "EQUILIBRIUM_DISCOVERY=1",
                     "EQUILIBRIUM_DISCOVERY_NAMESPACES", "EQUILIBRIUM_KUBE_API",
                     "EQUILIBRIUM_KUBE_TOKEN_FILE", "EQUILIBRIUM_REDIS_URL",
                     "EQUILIBRIUM_SIGNALING_EPOCH"):
        assert variable in " ".join(text.split())
