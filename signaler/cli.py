"""``equilibrium signaler``: flags, the mesh key, the admin listener, and exit codes.

Owns the command line only; the work is :class:`signaler.service.SignalerService`. Exit codes:
0 after SIGTERM/SIGINT (SIGHUP is logged and ignored), 2 for a bad configuration (no mesh
key, bad flag; message on stderr), 1 when the admin listener cannot be bound.

The mesh key (HMAC key of the recommendations) comes from ``EQUILIBRIUM_MESH_SECRET`` or from
``--mesh-secret-file``; without one the signaler refuses to start: unsigned routing signals are
never an option.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import socket
from typing import Any

from mesh.address import AddressError, parse_host_port
from mesh.errors import ConfigError
from wire import logs
from wire.errors import WireError
from wire.keys import check_redis_url, unverified_tls
from wire.signing import MESH_SECRET_ENV, read_mesh_key

DEFAULT_ADMIN = "127.0.0.1:15020"
DEFAULT_EPOCH = 1.0
DEFAULT_TOKENS = 32

EPILOG = f"""\
environment: EQUILIBRIUM_REDIS_URL (for --redis), {MESH_SECRET_ENV} (the mesh key,
  at least 16 bytes; or --mesh-secret-file), EQUILIBRIUM_SIGNALER_ID (for --id).
redis URLs: redis://[user:password@]host:port/db, rediss:// for TLS
  (add ?ssl_ca_certs=/path/ca.pem to trust a private CA).
several replicas may run: one leads each upstream (a Redis lease fenced by a token), the
  others stand by and take over within --lease-epochs epochs if it dies.
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "signaler",
        help="run the correlated-equilibrium signaler",
        description="Read regret summaries from Redis, solve the correlated-equilibrium LP each "
        "epoch, publish signed private routing recommendations.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--redis", metavar="URL",
                        default=os.environ.get("EQUILIBRIUM_REDIS_URL"),
                        help="Redis URL (default $EQUILIBRIUM_REDIS_URL)")
    parser.add_argument("--epoch", metavar="SECONDS", default=str(DEFAULT_EPOCH),
                        help=f"seconds between solves (default {DEFAULT_EPOCH:g})")
    parser.add_argument("--id", default=os.environ.get("EQUILIBRIUM_SIGNALER_ID"),
                        help="this replica's id (default signaler-HOSTNAME-PID)")
    parser.add_argument("--admin", metavar="HOST:PORT", default=DEFAULT_ADMIN,
                        help=f"admin listener: /metrics /healthz /readyz /debug/state /dashboard "
                             f"(default {DEFAULT_ADMIN})")
    parser.add_argument("--tokens", metavar="N", default=str(DEFAULT_TOKENS),
                        help=f"tokens the traffic is quantised into (default {DEFAULT_TOKENS})")
    parser.add_argument("--upstream", dest="upstreams", action="append", metavar="NAME",
                        help="serve only these upstreams (repeatable; default: discover)")
    parser.add_argument("--mesh-secret-file", metavar="FILE",
                        help=f"file holding the mesh key ({MESH_SECRET_ENV} wins)")
    parser.add_argument("--lease-epochs", metavar="N", default="3",
                        help="lease time-to-live in epochs: how soon a standby takes over (3)")
    parser.add_argument("--seed", metavar="N", default=None,
                        help="seed of the configuration sampling (default: random)")
    logs.add_level_option(parser)
    logs.add_option(parser)
    parser.set_defaults(func=main)


def _number(text: str, flag: str, low: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{flag}: expected a number, got {text!r}") from None
    if not (low <= value < float("inf")):
        raise ConfigError(f"{flag}: must be a finite number >= {low:g}, got {text!r}")
    return value


def _listen(text: str) -> tuple[str, int]:
    """``--admin``: ``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (loopback)."""
    try:
        address = parse_host_port(text, default_host="127.0.0.1")
    except AddressError as exc:
        raise ConfigError(f"--admin: {exc}") from None
    return address.host, address.port


def build_config(args: argparse.Namespace) -> tuple[Any, tuple[str, int]]:
    """The service config and admin address from the parsed flags (ConfigError if bad)."""
    from signaler.service import SignalerConfig

    if not args.redis:
        raise ConfigError("--redis URL (or EQUILIBRIUM_REDIS_URL) is required")
    try:
        check_redis_url(args.redis)
    except ValueError as exc:
        raise ConfigError(f"--redis: {exc}") from None
    if (weak := unverified_tls(args.redis)) is not None:
        logging.getLogger(__name__).warning(
            "signaler: the --redis URL's TLS verifies nothing (%s)", weak)
    try:
        key = read_mesh_key(os.environ, args.mesh_secret_file, required=True)
    except WireError as exc:
        raise ConfigError(f"{exc}; signaling refuses to run without one") from None
    signer = args.id or f"signaler-{socket.gethostname()}-{os.getpid()}"
    try:
        config = SignalerConfig(
            redis_url=args.redis,
            signer=signer,
            key=key,
            epoch=_number(args.epoch, "--epoch", 0.05),
            tokens=int(_number(args.tokens, "--tokens", 1)),
            upstreams=tuple(args.upstreams or ()),
            lease_epochs=_number(args.lease_epochs, "--lease-epochs", 1.5),
            backoff_max=min(5.0, max(1.0, 4 * _number(args.epoch, "--epoch", 0.05))),
            seed=None if args.seed is None else int(_number(args.seed, "--seed", 0)),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    from wire.keys import leader_key

    if len(signer) > 115:  # the lease holder is "<id>.<12 hex>", a protocol name (<= 128)
        raise ConfigError(f"--id: at most 115 characters, got {len(signer)}")
    try:  # ids and upstream names must be valid protocol names
        leader_key(signer)
        for upstream in config.upstreams:
            leader_key(upstream)
    except WireError as exc:
        raise ConfigError(f"--id/--upstream: {exc.detail}") from None
    return config, _listen(args.admin)


async def serve(config: Any, admin: tuple[str, int]) -> int:
    """Run the service and its admin listener until SIGTERM/SIGINT."""
    from aiohttp import web

    from signaler.admin import make_admin_app
    from signaler.dashboard import SignalerDashboard
    from signaler.service import SignalerService
    from wire.redis_store import RedisSignalStore

    service = SignalerService(
        config, store=RedisSignalStore(config.redis_url, config.redis_timeout))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    log = logging.getLogger(__name__)

    def stopping(sig: signal.Signals) -> None:
        if not stop.is_set():
            log.info("signaler %s: %s: releasing its leases and stopping", config.signer,
                     sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping, sig)
    # the sidecar's reload signal: here there is nothing to reload (flags and environment
    # only), and it must not kill the process as its default action would
    loop.add_signal_handler(signal.SIGHUP, lambda: log.warning(
        "signaler %s: SIGHUP ignored: its settings are flags and environment; restart it "
        "to change them", config.signer))
    runner = web.AppRunner(
        make_admin_app(service.metrics, service.health, service.state,
                       SignalerDashboard(service)), access_log=None
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, admin[0], admin[1], reuse_address=True).start()
    except OSError as exc:
        await runner.cleanup()
        logs.fatal(f"equilibrium signaler: cannot listen on {admin[0]}:{admin[1]}: "
                   f"{exc.strerror}")
        return 1
    log.info("signaler %s: epoch %gs, %d tokens, admin %s:%d", config.signer, config.epoch,
             config.tokens, admin[0], admin[1])
    # What exists by now (the solver's, numpy's and aiohttp's modules: some 100,000 objects)
    # lives as long as the process: frozen out of the collector's reach, a full collection
    # walks only what the service makes as it runs (docs/benchmarks.md, "summaries in one body")
    gc.collect()
    gc.freeze()
    try:
        await service.run(stop)
    finally:
        await runner.cleanup()
    log.info("signaler %s: stopped", config.signer)
    return 0


def main(args: argparse.Namespace) -> int:
    if not logs.start("equilibrium signaler", args.log_level, args.log_format):
        return 2
    try:
        config, admin = build_config(args)
    except ConfigError as exc:
        logs.fatal(f"equilibrium signaler: {exc}")
        return 2
    return asyncio.run(serve(config, admin))
