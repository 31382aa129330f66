"""``equilibrium bench``: the command line of the benchmark harness.

Parses the common options, resolves the scenario's defaults, runs the scenario, prints the
tables and writes ``<scenario>.json`` and ``<scenario>.md`` into ``--out`` (default
``bench-results/``). The header records the fully resolved command, so a result can be
reproduced exactly. Child processes are stopped on every exit path, including Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from equilibrium.lab.bench import peers
from equilibrium.lab.bench.report import (
    build_document,
    machine_info,
    render_console,
    write_report,
)
from equilibrium.lab.bench.scenarios import SCENARIOS, BenchContext, all_scenarios, load_scenario


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench",
        help="compare routing policies on a real local fleet",
        description=("Run a benchmark scenario against a real fleet of pods on loopback, "
                     "with real sidecar processes and an open-loop load generator."),
    )
    p.add_argument("--scenario", default="slow-pod", help=f"one of: {', '.join(SCENARIOS)}")
    p.add_argument("--policies", default=None,
                   help="comma-separated routing policies, run in this order "
                        "(default: the scenario's)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds of load per policy or mode (default: the scenario's)")
    p.add_argument("--rate", type=float, default=None,
                   help="requests/s per client (default: the scenario's)")
    p.add_argument("--clients", type=int, default=None,
                   help="client apps with a sidecar each (default: the scenario's)")
    p.add_argument("--strategy", default=None, help="sidecar strategy profile")
    p.add_argument("--seed", type=int, default=1, help="fleet RNG seed (1)")
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="folder for the JSON and Markdown results (bench-results/)")
    p.add_argument("--sidecar-arg", action="append", default=[], metavar="ARG",
                   help="extra flag for every sidecar, e.g. --sidecar-arg=--redis=URL "
                        "(repeatable)")
    p.add_argument("--peers", default="auto",
                   help="real peer proxies run as contenders in slow-pod and proxy-overhead: "
                        "auto (HAProxy and nginx when installed, skipped with a note "
                        "otherwise), none, or names such as haproxy-leastconn,nginx-least-conn")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    scenarios, _ = all_scenarios()
    for scenario in scenarios:
        scenario.add_arguments(p.add_argument_group(f"scenario {scenario.name}"))
    p.set_defaults(func=main)


def resolve(args: argparse.Namespace) -> tuple[Any, list[str]]:
    """Fill the scenario's defaults into ``args``; returns the scenario and the exact argv."""
    scenario = load_scenario(args.scenario)
    if args.policies is None:
        args.policies = list(scenario.default_policies)
    elif isinstance(args.policies, str):
        args.policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if args.duration is None:
        args.duration = scenario.default_duration
    if args.rate is None:
        args.rate = scenario.default_rate
    if args.clients is None:
        args.clients = scenario.default_clients
    if not args.policies and scenario.default_policies:
        raise ValueError("--policies is empty")
    if len(set(args.policies)) != len(args.policies):
        raise ValueError("--policies lists a policy twice")
    if not (args.duration > 0 and args.rate > 0 and args.clients >= 1):
        raise ValueError("--duration and --rate must be > 0, --clients >= 1")
    if args.duration > 3600:
        raise ValueError("--duration is limited to 3600 s (the load is always bounded)")
    argv = ["bench", "--scenario", scenario.name]
    if args.policies:
        argv += ["--policies", ",".join(args.policies)]
    argv += ["--duration", f"{args.duration:g}", "--rate", f"{args.rate:g}",
             "--clients", str(args.clients), "--seed", str(args.seed)]
    if args.strategy:
        argv += ["--strategy", args.strategy]
    argv += [f"--sidecar-arg={a}" for a in args.sidecar_arg]
    if getattr(scenario, "uses_peers", False):
        peers.select(args.peers)  # ValueError for an unknown name, before anything starts
        argv += ["--peers", args.peers]
    for action in scenario_options(scenario):  # its own options, given or defaulted
        value = getattr(args, action.dest, None)
        if action.nargs == 0:  # a flag: recorded when it was given
            if value is not None and value != action.default:
                argv.append(action.option_strings[0])
        elif value is not None:
            argv += [action.option_strings[0],
                     f"{value:g}" if isinstance(value, float) else str(value)]
    return scenario, argv


def scenario_options(scenario: Any) -> list[argparse.Action]:
    """The options ``scenario`` adds (``--scale-publishers``...), in its order."""
    probe = argparse.ArgumentParser(add_help=False)
    group = probe.add_argument_group(scenario.name)
    scenario.add_arguments(group)
    return list(group._group_actions)  # argparse's own list of what the group holds


async def _run(scenario: Any, ctx: BenchContext) -> Any:
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await scenario.run(ctx)


def main(args: argparse.Namespace) -> int:
    if args.list:
        scenarios, broken = all_scenarios()
        for scenario in scenarios:
            print(f"{scenario.name:<16} {scenario.summary}")
        for name, error in broken.items():
            print(f"{name:<16} (cannot be loaded: {error})")
        return 0
    try:
        scenario, argv = resolve(args)
    except (ValueError, ImportError, TypeError) as exc:
        print(f"equilibrium bench: {exc}", file=sys.stderr)
        return 2
    logs = Path(tempfile.mkdtemp(prefix=f"equilibrium-bench-{scenario.name}-"))
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = BenchContext(args=args, out=args.out, logs=logs, stream=sys.stdout)
    started = dt.datetime.now(dt.UTC)
    machine = machine_info()  # the load and CPU pressure *before* the run, as the report says
    ctx.say(f"equilibrium bench: {scenario.name} ({scenario.summary}); logs in {logs}")
    try:
        result = asyncio.run(_run(scenario, ctx))
    except KeyboardInterrupt:
        print("\ninterrupted; every child process was stopped", file=sys.stderr)
        return 130
    except asyncio.CancelledError:
        print("\nterminated; every child process was stopped", file=sys.stderr)
        return 143
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"equilibrium bench: {exc} (logs in {logs})", file=sys.stderr)
        return 1
    doc = build_document(scenario.name, scenario.summary, argv, result, started, machine)
    json_path, md_path = write_report(doc, args.out)
    sys.stdout.write("\n" + render_console(doc))
    print(f"results: {json_path}, {md_path}")
    verdict = result.data.get("verdict") if isinstance(result.data, dict) else None
    return 1 if isinstance(verdict, dict) and verdict.get("passed") is False else 0
