"""``equilibrium demo``: the command line of the demo.

Owns the demo's options (``equilibrium demo --help``), turning them into a
:class:`~equilibrium.lab.demo.run.DemoConfig` and a signaling plan, running
:func:`~equilibrium.lab.demo.run.run_demo` under asyncio with SIGTERM and Ctrl-C stopping every
child, and the exit codes: 0 done, 1 a run error, 2 bad options, 130 / 143 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

from equilibrium.lab.demo.plan import default_phases, signaling_for
from equilibrium.lab.demo.run import DemoConfig, run_demo
from equilibrium.lab.signaling_plane import SignalingPlan


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run a local mesh with a bad pod and watch traffic shift",
        description=("Start a local fleet with one bad pod, client apps behind real "
                     "sidecars, an embedded Redis and a signaler, and a bounded load; show "
                     "the traffic shift live (and which sidecars follow the signaler's "
                     "recommendation), then print a summary and write a PNG plot. Needs no "
                     "Docker, cluster or running Redis."),
    )
    d = DemoConfig()
    p.add_argument("--duration", type=float, default=d.duration, help="seconds of load (40)")
    p.add_argument("--rate", type=float, default=d.rate, help="requests/s per client (50)")
    p.add_argument("--clients", type=int, default=d.clients, help="client apps (3)")
    p.add_argument("--pods", type=int, default=d.pods, help="pods of the demo service (5)")
    p.add_argument("--bad", type=int, default=None, help="index of the bad pod (the last)")
    p.add_argument("--bad-delay", type=float, default=d.bad_delay, help="seconds added (0.5)")
    p.add_argument("--bad-fraction", type=float, default=d.bad_fraction,
                   help="share of the bad pod's requests that are slow (0.5)")
    p.add_argument("--policy", default=d.policy, help="sidecar routing policy (equilibrium)")
    p.add_argument("--strategy", default=None, help="sidecar strategy profile")
    p.add_argument("--seed", type=int, default=d.seed, help="fleet RNG seed (1)")
    p.add_argument("--window", type=float, default=d.window, help="live view window, s (2)")
    p.add_argument("--recover-at", type=float, default=None,
                   help="make the bad pod healthy this many seconds into the load")
    p.add_argument("--no-signaler", action="store_true",
                   help="no Redis, no signaler: each sidecar learns alone (regret matching)")
    p.add_argument("--redis", metavar="URL", default=None,
                   help="use this Redis instead of an embedded one (the mesh key must be in "
                        "EQUILIBRIUM_MESH_SECRET)")
    p.add_argument("--tokens", type=int, default=d.tokens,
                   help="tokens the signaler splits the traffic into (16)")
    p.add_argument("--sidecar-arg", action="append", default=[], metavar="ARG",
                   help="extra flag for every sidecar, e.g. --sidecar-arg=--max-attempts=1 "
                        "(repeatable)")
    p.add_argument("--out", type=Path, default=Path("."), help="folder for the PNG and JSON")
    p.add_argument("--no-live", action="store_true", help="no live view, only the summary")
    p.add_argument("--open", action="store_true", dest="open_dashboard",
                   help="open the live dashboard (printed as 'dashboard: URL') in a web browser")
    p.set_defaults(func=main)


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    return DemoConfig(
        pods=args.pods, bad=args.pods - 1 if args.bad is None else args.bad,
        bad_delay=args.bad_delay, bad_fraction=args.bad_fraction, clients=args.clients,
        rate=args.rate, duration=args.duration, policy=args.policy, strategy=args.strategy,
        seed=args.seed, out=args.out, window=args.window, recover_at=args.recover_at,
        sidecar_args=list(args.sidecar_arg), tokens=args.tokens,
        open_dashboard=bool(getattr(args, "open_dashboard", False)),
    )


async def _main_async(config: DemoConfig, signaling: SignalingPlan, live: bool) -> None:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    await run_demo(config, default_phases(config, signaling), live=live)


def main(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        config.validate()
        signaling = signaling_for(config, no_signaler=args.no_signaler, redis_url=args.redis,
                                  environ=os.environ)
    except ValueError as exc:  # SignalingUnavailable is a ValueError
        print(f"equilibrium demo: {exc}", file=sys.stderr)
        return 2
    if signaling.warning:
        print(f"equilibrium demo: warning: {signaling.warning}", file=sys.stderr)
    try:
        asyncio.run(_main_async(config, signaling, live=not args.no_live))
    except KeyboardInterrupt:
        print("\ninterrupted; every child process was stopped", file=sys.stderr)
        return 130
    except asyncio.CancelledError:
        print("\nterminated; every child process was stopped", file=sys.stderr)
        return 143
    except (RuntimeError, OSError) as exc:
        print(f"equilibrium demo: {exc}", file=sys.stderr)
        return 1
    return 0
