"""``equilibrium init``: install (or remove) the pod's interception rules.

Runs as the ``equilibrium-init`` container (root in the pod's network namespace, NET_ADMIN and
NET_RAW only). The rules come from ``injector.iptables.build_rules``; this module only parses
flags and runs ``iptables``. Applying first removes any earlier copy, so a re-run is harmless.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from typing import Any

from injector.config import AnnotationError, parse_port_list
from injector.iptables import InterceptionConfig, build_rules, cleanup_rules


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "init",
        help="install the transparent-interception iptables rules",
        description="Redirect the pod's TCP to the sidecar (outbound and inbound), as istio-init "
                    "does. Needs NET_ADMIN in the pod's network namespace.",
    )
    parser.add_argument("--outbound-port", type=_port, default=15001,
                        help="sidecar outbound listener (default 15001)")
    parser.add_argument("--inbound-port", type=_port, default=15006,
                        help="sidecar inbound listener (default 15006)")
    parser.add_argument("--proxy-uid", type=int, default=1337,
                        help="UID whose traffic is never redirected (default 1337)")
    parser.add_argument("--proxy-gid", type=int, default=1337,
                        help="GID whose traffic is never redirected (default 1337; -1: none)")
    parser.add_argument("--exclude-inbound-ports", type=_ports, default=(15020,),
                        metavar="P1,P2", help="inbound ports not redirected (default 15020)")
    parser.add_argument("--exclude-outbound-ports", type=_ports, default=(),
                        metavar="P1,P2", help="destination ports not redirected")
    parser.add_argument("--iptables", default="iptables",
                        help="iptables binary (e.g. iptables-legacy; default iptables)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the commands instead of running them")
    parser.add_argument("--cleanup", action="store_true", help="remove the rules instead")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = InterceptionConfig(
            outbound_port=args.outbound_port,
            inbound_port=args.inbound_port,
            proxy_uid=args.proxy_uid,
            proxy_gid=None if args.proxy_gid < 0 else args.proxy_gid,
            exclude_outbound_ports=args.exclude_outbound_ports,
            exclude_inbound_ports=args.exclude_inbound_ports,
        )
    except ValueError as exc:
        print(f"equilibrium init: {exc}", file=sys.stderr)
        return 2
    rules = cleanup_rules() if args.cleanup else build_rules(config)
    if args.dry_run:
        for rule in rules:
            print(shlex.join([args.iptables, *rule]))
        return 0
    binary = shutil.which(args.iptables)
    if binary is None:
        print(f"equilibrium init: {args.iptables!r} not found on PATH", file=sys.stderr)
        return 1
    for rule in cleanup_rules():  # idempotent: drop an earlier copy; misses are expected
        subprocess.run([binary, *rule], capture_output=True, check=False)
    if args.cleanup:
        print("equilibrium init: interception rules removed")
        return 0
    for rule in rules:
        done = subprocess.run([binary, *rule], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"equilibrium init: `{shlex.join([args.iptables, *rule])}` failed "
                  f"({done.returncode}): {done.stderr.strip()}", file=sys.stderr)
            return 1
    print(f"equilibrium init: {len(rules)} rules installed (outbound -> {config.outbound_port}, "
          f"inbound -> {config.inbound_port}, proxy uid {config.proxy_uid})")
    return 0


def _port(text: str) -> int:
    return _ports(text, exactly_one=True)[0]


def _ports(text: str, exactly_one: bool = False) -> tuple[int, ...]:
    try:
        ports = parse_port_list("ports", text)
    except AnnotationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if exactly_one and len(ports) != 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected one port")
    return ports
