"""``equilibrium sidecar``: the command line, and the mapping of failures to exit codes.

Owns the flags only: :data:`CONFIG_OPTIONS` declares each one once (:class:`Option`: its
destination, metavar and help), so the parser (:func:`add_options`) and the values handed on
(:func:`option_values`) read the same table and cannot drift apart. Each ``dest`` is a setting
of :mod:`sidecar.config`, which layers the flags over the environment (its ``ENV_VARS`` names
every variable, and the help text here quotes it) and the config file, and validates the
result into one ``SidecarConfig``. :mod:`sidecar.runner` builds the process from that config,
then starts it. Exit codes: 0 after a clean drain, 2 for a bad configuration (message on
stderr), 1 when a listener cannot be bound.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from mesh.errors import ConfigError
from sidecar.config import (
    DEFAULT_ADMIN,
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_OUTBOUND,
    DEFAULT_POLICY,
    DEFAULT_STRATEGY,
    ENV_VARS,
    ConfigSource,
)
from wire import logs

EPILOG = """\
precedence: flags > environment > config file > defaults.
environment: EQUILIBRIUM_OUTBOUND, EQUILIBRIUM_ADMIN, EQUILIBRIUM_UPSTREAMS="a=url,url;b=url",
  EQUILIBRIUM_STRATEGY, EQUILIBRIUM_POLICY, EQUILIBRIUM_ID, EQUILIBRIUM_DRAIN_TIMEOUT,
  EQUILIBRIUM_MAX_ATTEMPTS, EQUILIBRIUM_REQUEST_TIMEOUT, EQUILIBRIUM_CONNECT_TIMEOUT,
  EQUILIBRIUM_CONFIG, EQUILIBRIUM_INBOUND, EQUILIBRIUM_APP, EQUILIBRIUM_INBOUND_LONG_PATHS,
  EQUILIBRIUM_MESH_SECRET_FILE,
  EQUILIBRIUM_MESH_SECRET (the mesh key itself; wins over the file), EQUILIBRIUM_TRANSPARENT,
  EQUILIBRIUM_DISCOVERY, EQUILIBRIUM_DISCOVERY_NAMESPACES, EQUILIBRIUM_KUBE_API,
  EQUILIBRIUM_KUBE_TOKEN_FILE (docs/interception.md).
signals: SIGHUP reloads the config file (also re-read when its mtime changes);
  SIGTERM drains in-flight requests up to --drain-timeout, then exits 0.
"""


@dataclass(frozen=True, slots=True)
class Option:
    """One command-line option.

    ``help`` may name the option's environment variable (``sidecar.config.ENV_VARS``) as
    ``{env}``. A ``switch`` takes no value (``store_true``, None when absent so the
    environment can decide); ``repeat`` collects every occurrence in a list.
    """

    dest: str
    help: str
    metavar: str | None = None
    flag: str | None = None
    """Default: ``--`` and ``dest`` with dashes."""
    switch: bool = False
    repeat: bool = False

    @property
    def name(self) -> str:
        return self.flag or "--" + self.dest.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option],
                env_vars: dict[str, str] | None = None) -> None:
    names = ENV_VARS if env_vars is None else env_vars
    for option in options:
        text = option.help.replace("{env}", names.get(option.dest, ""))
        if option.switch:
            parser.add_argument(option.name, dest=option.dest, action="store_true",
                                default=None, help=text)
        else:
            parser.add_argument(option.name, dest=option.dest, metavar=option.metavar,
                                action="append" if option.repeat else "store", help=text)


def option_values(args: argparse.Namespace, options: Iterable[Option]) -> dict[str, Any]:
    """``dest -> value`` of ``options`` (None when not given)."""
    return {option.dest: getattr(args, option.dest, None) for option in options}


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
    Option("retry_budget_ratio", "retries and hedges may add at most this share of the "
           "requests sent (over a 10 s window; default: the profile's, 0.2; env {env})",
           "RATIO"),
    Option("retry_budget_min_per_s", "... plus this many retries a second, so that a quiet "
           "upstream can still retry (default: the profile's, 10; env {env})", "N"),
    Option("source_address", "the IP address connections to endpoints leave from (default: "
           "the kernel's choice; env {env})", "IP"),
    Option("header_timeout", "outbound listener: close a connection that sends no request "
           "byte (or not the whole HTTP/2 preface) in time; answer 408 to an HTTP/1.1 request "
           "head not complete in time (default 10; env {env})", "SECONDS"),
    Option("idle_timeout", "outbound listener: close an HTTP/2 connection with no request in "
           "flight, or an idle HTTP/1.1 keep-alive connection, after this long (default 300, "
           "0: never; env {env})", "SECONDS"),
    Option("max_streams", "outbound listener: concurrent streams per HTTP/2 connection "
           "(default 256; env {env})", "N"),
    Option("max_connections", "outbound listener: open connections (default 4096; env {env})",
           "N"),
    Option("inbound", "inbound listener in front of the local app (policing, congestion, bids)",
           "HOST:PORT"),
    Option("app", "the local app behind --inbound", "URL"),
    Option("inbound_long_paths", "--inbound: path prefixes of the app's long requests (long "
           "polls, watches), kept out of its concurrency limit; replaces the config file's "
           "policing.long_paths (env {env})", "PATH[,PATH...]"),
    Option("mesh_secret_file",
           "mesh key for signed caller identities (or env EQUILIBRIUM_MESH_SECRET)", "FILE"),
    Option("redis", "join the signaling plane: publish regret summaries, follow the signaler's "
           "signed recommendations (redis://, rediss://; or env {env}; needs the "
           "mesh key)", "URL"),
    Option("signaling_epoch",
           "seconds between regret summaries (default 1; env {env})", "SECONDS"),
    Option("hedge", switch=True,
           help="hedged exploration: a request picked only to explore an endpoint that "
           "answers no probe (GET/HEAD/OPTIONS, or PUT/DELETE, never with a body) is also sent "
           "to the best endpoint if no answer came by that one's recent p90; the first answer "
           "wins; spends from the retry budget (env {env}=1)"),
    Option("rescue", switch=True,
           help="rescue: a GET/HEAD/OPTIONS (or PUT/DELETE without a body) still waiting at an "
           "endpoint the policy ejects (hung, or failing in a row) is sent to another, as a "
           "retry within the retry budget, instead of waiting for its timeout; not for "
           "services of long polls (env {env}=1)"),
    Option("transparent", switch=True,
           help="route connections redirected by `equilibrium init` by their original "
           "destination (env {env}=1)"),
    Option("discovery", switch=True,
           help="watch Services and EndpointSlices through the Kubernetes API (env {env}=1)"),
    Option("discovery_namespaces", metavar="NS[,NS...]|*",
           help="namespaces to watch (default: the pod's own, which a RoleBinding allows; "
           "'*': the whole cluster, which needs a ClusterRoleBinding; env {env})"),
    Option("kube_api", metavar="URL",
           help="Kubernetes API server (default: in-cluster; env {env})"),
    Option("kube_token_file", metavar="FILE",
           help="bearer token file (default: the pod's service account; env {env})"),
)
"""Every sidecar option but ``--log-level``: each ``dest`` is a setting of
:class:`sidecar.config.ConfigSource` (layered with the environment and, except the Kubernetes
ones, the config file)."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sidecar",
        help="run the proxy beside an app",
        description="Run the Equilibrium sidecar: outbound proxy and admin listener.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(parser, CONFIG_OPTIONS)
    logs.add_level_option(parser)
    logs.add_option(parser)
    parser.set_defaults(func=main)


def flags_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return option_values(args, CONFIG_OPTIONS)


def main(args: argparse.Namespace) -> int:
    if not logs.start("equilibrium sidecar", args.log_level, args.log_format):
        return 2
    from sidecar.mesh_key import sidecar_mesh_key
    from sidecar.runner import SidecarRunner, StartupError  # heavy imports only when running

    try:
        source = ConfigSource.from_sources(flags_from_args(args))
        config = source.load()
        runner = SidecarRunner(source, config, mesh_key=sidecar_mesh_key(config, source.env))
    except ConfigError as exc:
        logs.fatal(f"equilibrium sidecar: bad configuration: {exc}")
        return 2
    try:
        return run_event_loop(runner.run(), uvloop_ok=not config.transparent)
    except StartupError as exc:
        logs.fatal(f"equilibrium sidecar: {exc}")
        return 1


def run_event_loop(main: Coroutine[Any, Any, int], *, uvloop_ok: bool = True) -> int:
    """Run ``main`` on uvloop when it is installed (a dependency on Linux: it halves the
    event loop's share of each proxied request), else on asyncio's own loop.

    Not in transparent mode (``uvloop_ok`` False): its byte relay for what is not a Service's
    HTTP leans on ``pause_writing``, and uvloop calls it only for what it still buffers itself,
    not for what it has handed to libuv's write queue, so a fast sender and a slow receiver
    grew the sidecar's peak RSS by 34-67 MB relaying 64 MiB (3 runs of 6 in
    tests/integration/test_interception.py), against under 16 MB on asyncio's loop (5 of 5).
    """
    if not uvloop_ok:
        return asyncio.run(main)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
