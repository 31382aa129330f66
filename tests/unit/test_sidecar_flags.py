"""sidecar.flags: options declared once, parsed, handed on, and resolved flag > environment;
and the sidecar's own tables of them (sidecar.cli, sidecar.kube_wiring)."""

from __future__ import annotations

import argparse

from sidecar.cli import CONFIG_OPTIONS, flags_from_args
from sidecar.config import ENV_VARS
from sidecar.flags import (
    Option,
    add_options,
    from_flag_or_env,
    option_values,
    switch_from_flag_or_env,
)
from sidecar.kube_wiring import KUBE_API, OPTIONS, TRANSPARENT, add_arguments

ZONE = Option("zone", "where it runs (env {env})", "NAME", env="TEST_ZONE")
TAGS = Option("tags", "labels (repeatable)", "TAG", flag="--tag", repeat=True)
LOUD = Option("loud", "say more (env {env}=1)", switch=True, env="TEST_LOUD")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_options(parser, (ZONE, TAGS, LOUD))
    return parser.parse_args(argv)


def test_every_layered_flag_is_a_setting_with_an_environment_variable() -> None:
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
    add_options(parser, (ZONE, LOUD))
    text = parser.format_help()
    assert "(env TEST_ZONE)" in text and "TEST_LOUD=1" in text and "{env}" not in text


def test_a_flag_wins_over_the_environment_which_wins_over_nothing() -> None:
    env = {"TEST_ZONE": "  us  ", "TEST_LOUD": "yes"}
    assert from_flag_or_env(parse("--zone", "eu"), env, ZONE) == "eu"
    assert from_flag_or_env(parse(), env, ZONE) == "us"
    assert from_flag_or_env(parse(), {}, ZONE) == ""
    assert switch_from_flag_or_env(parse(), env, LOUD) is True
    assert switch_from_flag_or_env(parse("--loud"), {"TEST_LOUD": "0"}, LOUD) is True
    assert switch_from_flag_or_env(parse(), {"TEST_LOUD": "no"}, LOUD) is False
    assert switch_from_flag_or_env(parse(), {}, LOUD) is False
    # a namespace without the attribute (another command's) reads the environment
    assert switch_from_flag_or_env(argparse.Namespace(), env, LOUD) is True


def test_kube_options_keep_their_flags_and_environment_names() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--kube-api", "http://127.0.0.1:1", "--transparent"])
    assert [o.name for o in OPTIONS] == ["--transparent", "--discovery",
                                         "--discovery-namespaces", "--kube-api",
                                         "--kube-token-file"]
    assert from_flag_or_env(args, {"EQUILIBRIUM_KUBE_API": "http://other"}, KUBE_API) \
        == "http://127.0.0.1:1"
    assert switch_from_flag_or_env(args, {}, TRANSPARENT) is True
    assert "EQUILIBRIUM_DISCOVERY_NAMESPACES" in parser.format_help()
