"""``equilibrium sidecar``: flags, and the mapping of failures to exit codes.

Owns the command-line interface only; settings are validated by :mod:`sidecar.config` and
the process is run by :mod:`sidecar.runner`. Exit codes: 0 after a clean drain, 2 for a bad
configuration (message on stderr), 1 when a listener cannot be bound.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any

from sidecar.config import (
    DEFAULT_ADMIN,
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_OUTBOUND,
    DEFAULT_POLICY,
    DEFAULT_STRATEGY,
    ConfigError,
    ConfigSource,
)
from sidecar.kube_wiring import KubeWiring
from sidecar.kube_wiring import add_arguments as add_kube_arguments

EPILOG = """\
precedence: flags > environment > config file > defaults.
environment: EQUILIBRIUM_OUTBOUND, EQUILIBRIUM_ADMIN, EQUILIBRIUM_UPSTREAMS="a=url,url;b=url",
  EQUILIBRIUM_STRATEGY, EQUILIBRIUM_POLICY, EQUILIBRIUM_ID, EQUILIBRIUM_DRAIN_TIMEOUT,
  EQUILIBRIUM_MAX_ATTEMPTS, EQUILIBRIUM_REQUEST_TIMEOUT, EQUILIBRIUM_CONNECT_TIMEOUT,
  EQUILIBRIUM_CONFIG, EQUILIBRIUM_INBOUND, EQUILIBRIUM_APP, EQUILIBRIUM_MESH_SECRET_FILE,
  EQUILIBRIUM_MESH_SECRET (the mesh key itself; wins over the file), EQUILIBRIUM_TRANSPARENT,
  EQUILIBRIUM_DISCOVERY, EQUILIBRIUM_DISCOVERY_NAMESPACES, EQUILIBRIUM_KUBE_API,
  EQUILIBRIUM_KUBE_TOKEN_FILE (docs/interception.md).
signals: SIGHUP reloads the config file (also re-read when its mtime changes);
  SIGTERM drains in-flight requests up to --drain-timeout, then exits 0.
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sidecar",
        help="run the proxy beside an app",
        description="Run the Equilibrium sidecar: outbound proxy and admin listener.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--outbound", metavar="HOST:PORT", help=f"outbound listener (default {DEFAULT_OUTBOUND})"
    )
    parser.add_argument(
        "--admin", metavar="HOST:PORT", help=f"admin listener (default {DEFAULT_ADMIN})"
    )
    parser.add_argument(
        "--upstream",
        dest="upstreams",
        metavar="NAME=URL[,URL...]",
        action="append",
        help="an upstream service and its endpoints (repeatable)",
    )
    parser.add_argument(
        "--strategy", metavar="PROFILE", help=f"strategy profile (default {DEFAULT_STRATEGY})"
    )
    parser.add_argument(
        "--policy", metavar="NAME", help=f"routing policy (default {DEFAULT_POLICY})"
    )
    parser.add_argument("--id", help="this sidecar's id (default HOSTNAME-PID)")
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON config file")
    parser.add_argument(
        "--drain-timeout",
        type=str,
        metavar="SECONDS",
        help=f"how long SIGTERM waits for in-flight requests (default {DEFAULT_DRAIN_TIMEOUT:g})",
    )
    parser.add_argument(
        "--max-attempts",
        type=str,
        metavar="N",
        help="attempts per request incl. retries (default: the profile's max_retries + 1)",
    )
    parser.add_argument(
        "--request-timeout", metavar="SECONDS",
        help="longest upstream stall: during the upload, waiting for the answer after the last "
        "byte sent, or between body chunks (default: the profile's)",
    )
    parser.add_argument(
        "--connect-timeout", metavar="SECONDS",
        help="upstream connect timeout (default: the profile's)",
    )
    parser.add_argument(
        "--inbound", metavar="HOST:PORT",
        help="inbound listener in front of the local app (policing, congestion, bids)",
    )
    parser.add_argument("--app", metavar="URL", help="the local app behind --inbound")
    parser.add_argument(
        "--mesh-secret-file", metavar="FILE",
        help="mesh key for signed caller identities (or env EQUILIBRIUM_MESH_SECRET)",
    )
    parser.add_argument(
        "--log-level", default=os.environ.get("EQUILIBRIUM_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )
    parser.add_argument(
        "--redis", metavar="URL",
        help="join the signaling plane: publish regret summaries, follow the signaler's signed "
        "recommendations (redis://, rediss://; or env EQUILIBRIUM_REDIS_URL; needs the mesh key)",
    )
    parser.add_argument(
        "--signaling-epoch", metavar="SECONDS",
        help="seconds between regret summaries (default 1; env EQUILIBRIUM_SIGNALING_EPOCH)",
    )
    add_kube_arguments(parser)  # --transparent, --discovery, --kube-api, --kube-token-file
    parser.set_defaults(func=main)


def flags_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "outbound": args.outbound,
        "admin": args.admin,
        "upstreams": args.upstreams,
        "strategy": args.strategy,
        "policy": args.policy,
        "id": args.id,
        "config": args.config,
        "drain_timeout": args.drain_timeout,
        "max_attempts": args.max_attempts,
        "request_timeout": args.request_timeout,
        "connect_timeout": args.connect_timeout,
        "inbound": args.inbound,
        "app": args.app,
        "mesh_secret_file": args.mesh_secret_file,
        "redis": args.redis,
        "signaling_epoch": args.signaling_epoch,
    }


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    source = ConfigSource.from_sources(flags_from_args(args))
    from sidecar.policing import PolicingWiring
    from sidecar.signaling import SignalingWiring

    try:
        config = source.load()
        policing = PolicingWiring.prepare(config, source.env)
        signaling = SignalingWiring.prepare(config, policing.mesh_key)
        kube = KubeWiring.prepare(args, source.env)
    except ConfigError as exc:
        print(f"equilibrium sidecar: bad configuration: {exc}", file=sys.stderr)
        return 2
    from sidecar.runner import SidecarRunner, StartupError  # heavy imports only when running

    async def serve() -> int:
        runner = SidecarRunner(source, config)
        policing.install(runner)
        signaling.install(runner)
        kube.install(runner)
        return await runner.run()

    try:
        return asyncio.run(serve())
    except StartupError as exc:
        print(f"equilibrium sidecar: {exc}", file=sys.stderr)
        return 1
