"""The sidecar's command-line options as data.

Owns how an option is declared: one :class:`Option` names its destination, metavar, help and
environment variable, so that the parser (:func:`add_options`), the values handed on
(:func:`option_values`) and the fallback to the environment (:func:`from_flag_or_env`,
:func:`switch_from_flag_or_env`) all read the same table and cannot drift apart. What a value
means is checked elsewhere: by :mod:`sidecar.config` for the settings layered with the
environment and the config file (:data:`sidecar.cli.CONFIG_OPTIONS`), by the wiring that reads
them for the rest (:mod:`sidecar.kube_wiring`). Nothing here reads the environment itself:
it is passed in.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

TRUE = frozenset({"1", "true", "yes", "on"})


@dataclass(frozen=True, slots=True)
class Option:
    """One command-line option.

    ``help`` may name the environment variable as ``{env}``. A ``switch`` takes no value
    (``store_true``, None when absent so the environment can decide); ``repeat`` collects
    every occurrence in a list.
    """

    dest: str
    help: str
    metavar: str | None = None
    env: str | None = None
    flag: str | None = None
    """Default: ``--`` and ``dest`` with dashes."""
    switch: bool = False
    repeat: bool = False

    @property
    def name(self) -> str:
        return self.flag or "--" + self.dest.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option]) -> None:
    for option in options:
        text = option.help.replace("{env}", option.env or "")
        if option.switch:
            parser.add_argument(option.name, dest=option.dest, action="store_true",
                                default=None, help=text)
        else:
            parser.add_argument(option.name, dest=option.dest, metavar=option.metavar,
                                action="append" if option.repeat else "store", help=text)


def option_values(args: argparse.Namespace, options: Iterable[Option]) -> dict[str, Any]:
    """``dest -> value`` of ``options`` (None when not given)."""
    return {option.dest: getattr(args, option.dest, None) for option in options}


def from_flag_or_env(args: argparse.Namespace, env: Mapping[str, str], option: Option) -> str:
    """The flag's value, else the option's environment variable, else ``""`` (stripped)."""
    value = getattr(args, option.dest, None)
    if value:
        return str(value)
    return env.get(option.env, "").strip() if option.env else ""


def switch_from_flag_or_env(args: argparse.Namespace, env: Mapping[str, str],
                            option: Option) -> bool:
    """A switch given on the command line, else its environment variable read as a boolean
    (``1``, ``true``, ``yes``, ``on``)."""
    value = getattr(args, option.dest, None)
    if value is not None:
        return bool(value)
    return bool(option.env) and env.get(option.env or "", "").strip().lower() in TRUE
