"""``equilibrium sidecar``: flags, and the mapping of failures to exit codes.

Owns the command-line interface only: :data:`CONFIG_OPTIONS`, the flags layered over the
environment and the config file (declared with :mod:`sidecar.flags`), plus ``--log-level`` and
the Kubernetes flags of :mod:`sidecar.kube_wiring`. Settings are validated by
:mod:`sidecar.config` and the process is run by :mod:`sidecar.runner`. Exit codes: 0 after
a clean drain, 2 for a bad configuration (message on stderr), 1 when a listener cannot be
bound.
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
from sidecar.flags import Option, add_options, option_values
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


CONFIG_OPTIONS: tuple[Option, ...] = (
    Option("outbound", f"outbound listener (default {DEFAULT_OUTBOUND})", "HOST:PORT"),
    Option("admin", f"admin listener (default {DEFAULT_ADMIN})", "HOST:PORT"),
    Option("upstreams", "an upstream service and its endpoints (repeatable)",
           "NAME=URL[,URL...]", flag="--upstream", repeat=True),
    Option("strategy", f"strategy profile (default {DEFAULT_STRATEGY})", "PROFILE"),
    Option("policy", f"routing policy (default {DEFAULT_POLICY})", "NAME"),
    Option("id", "this sidecar's id (default HOSTNAME-PID)"),
    Option("config", "YAML or JSON config file", "FILE"),
    Option("drain_timeout", "how long SIGTERM waits for in-flight requests "
           f"(default {DEFAULT_DRAIN_TIMEOUT:g})", "SECONDS"),
    Option("max_attempts",
           "attempts per request incl. retries (default: the profile's max_retries + 1)", "N"),
    Option("request_timeout", "longest upstream stall: during the upload, waiting for the "
           "answer after the last byte sent, or between body chunks (default: the profile's)",
           "SECONDS"),
    Option("connect_timeout", "upstream connect timeout (default: the profile's)", "SECONDS"),
    Option("inbound", "inbound listener in front of the local app (policing, congestion, bids)",
           "HOST:PORT"),
    Option("app", "the local app behind --inbound", "URL"),
    Option("mesh_secret_file",
           "mesh key for signed caller identities (or env EQUILIBRIUM_MESH_SECRET)", "FILE"),
    Option("redis", "join the signaling plane: publish regret summaries, follow the signaler's "
           "signed recommendations (redis://, rediss://; or env EQUILIBRIUM_REDIS_URL; needs the "
           "mesh key)", "URL"),
    Option("signaling_epoch",
           "seconds between regret summaries (default 1; env EQUILIBRIUM_SIGNALING_EPOCH)",
           "SECONDS"),
)
"""The options layered with the environment and the config file (:mod:`sidecar.config`):
each ``dest`` is a setting of :class:`sidecar.config.ConfigSource`."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sidecar",
        help="run the proxy beside an app",
        description="Run the Equilibrium sidecar: outbound proxy and admin listener.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(parser, CONFIG_OPTIONS)
    parser.add_argument(
        "--log-level", default=os.environ.get("EQUILIBRIUM_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )
    add_kube_arguments(parser)  # --transparent, --discovery, --kube-api, --kube-token-file
    parser.set_defaults(func=main)


def flags_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return option_values(args, CONFIG_OPTIONS)


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
