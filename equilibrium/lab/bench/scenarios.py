"""The benchmark's scenario interface and registry.

A scenario sets up a fleet (and sidecars, and whatever else it needs: Redis, a signaler, a
rogue caller), drives open-loop load, and turns the records into a :class:`ScenarioResult`:
tables for people, raw numbers for machines. The harness around it (command line, machine
header, Markdown/JSON output) is the same for all scenarios.

To add one: write a module in this package that defines a :class:`Scenario` subclass and a
module-level ``SCENARIO`` instance, and add one line to :data:`SCENARIOS`. Modules are imported
only when their scenario is listed or run, as the top-level CLI does with subcommands.
"""

from __future__ import annotations

import abc
import argparse
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

# scenario name -> module defining SCENARIO
SCENARIOS: dict[str, str] = {
    "slow-pod": "equilibrium.lab.bench.slow_pod",
    "grpc-slow-pod": "equilibrium.lab.bench.grpc_slow_pod",
    "proxy-overhead": "equilibrium.lab.bench.proxy_overhead",
    "h2-overhead": "equilibrium.lab.bench.h2_overhead",
    "herding": "equilibrium.lab.bench.herding",
    "recovery": "equilibrium.lab.bench.recovery",
    "retry-flood": "equilibrium.lab.bench.retry_flood",
    "overload-bids": "equilibrium.lab.bench.overload_bids",
    "standings": "equilibrium.lab.bench.standings",
    "signaler-scale": "equilibrium.lab.bench.signaler_scale",
    "soak": "equilibrium.lab.bench.soak",
    "probe-cost": "equilibrium.lab.bench.probe_cost",
    "demo": "equilibrium.lab.demo.scenario",
}


@dataclass(slots=True)
class Table:
    """A result table: ``rows`` are lists of already formatted cells."""

    title: str
    columns: list[str]
    rows: list[list[str]]


@dataclass(slots=True)
class ScenarioResult:
    """What a scenario hands back: tables and notes for the report, ``data`` for the JSON."""

    parameters: dict[str, Any]
    tables: list[Table]
    data: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


@dataclass(slots=True)
class BenchContext:
    """What a scenario gets from the harness."""

    args: argparse.Namespace
    out: Path
    logs: Path
    stream: TextIO

    def say(self, text: str) -> None:
        """Progress line on the console."""
        self.stream.write(text + "\n")
        self.stream.flush()


class Scenario(abc.ABC):
    """One benchmark scenario. Override :meth:`run`; the rest has defaults."""

    name = "scenario"
    summary = ""
    #: policies compared when ``--policies`` is not given (empty: the scenario has none)
    default_policies: tuple[str, ...] = ()
    #: seconds of load per policy (or per mode) when ``--duration`` is not given
    default_duration: float = 30.0
    #: requests/s per client when ``--rate`` is not given
    default_rate: float = 100.0
    #: client apps (each with a sidecar) when ``--clients`` is not given
    default_clients: int = 2
    #: runs real peer proxies (HAProxy, nginx) as contenders, chosen with ``--peers``
    uses_peers: bool = False

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:  # noqa: B027 (optional hook)
        """Scenario-specific options (prefix them with the scenario's name to avoid clashes);
        by default a scenario has none."""

    @abc.abstractmethod
    async def run(self, ctx: BenchContext) -> ScenarioResult:
        """Set up the fleet and sidecars, drive the load, return the tables."""


def load_scenario(name: str) -> Scenario:
    """The registered scenario called ``name``; ValueError lists the known ones."""
    try:
        module_name = SCENARIOS[name]
    except KeyError:
        raise ValueError(
            f"unknown scenario {name!r}; choose one of {', '.join(SCENARIOS)}"
        ) from None
    scenario = importlib.import_module(module_name).SCENARIO
    if not isinstance(scenario, Scenario):
        raise TypeError(f"{module_name}.SCENARIO is not a Scenario")
    return scenario


def all_scenarios() -> tuple[list[Scenario], dict[str, str]]:
    """Every registered scenario that imports, and the import error of each one that does not.

    One broken scenario module must not take the others (or ``--help``) down with it.
    """
    loaded: list[Scenario] = []
    broken: dict[str, str] = {}
    for name in SCENARIOS:
        try:
            loaded.append(load_scenario(name))
        except Exception as exc:  # any import-time failure of that one module
            broken[name] = f"{type(exc).__name__}: {exc}"
    return loaded, broken
