"""``equilibrium init``: install (or remove) the pod's interception rules, IPv4 and IPv6.

Runs as the ``equilibrium-init`` container (root in the pod's network namespace, NET_ADMIN and
NET_RAW only). The rules come from ``injector.iptables.build_rules``; this module only parses
flags, decides the families and runs ``iptables``/``ip6tables``. Applying first removes any
earlier copy, so a re-run is harmless.

IPv6 is tri-state, like Istio's dual-stack switch but with a default that cannot leave IPv6
silently unintercepted: without a flag the rules also go to ip6tables when the pod's namespace
has IPv6 (``injector.ipv6_probe``), and a failing ip6tables is reported and skipped (the pod
starts with IPv4 interception); ``--ipv6`` forces IPv6 and makes any failure fatal;
``--no-ipv6`` leaves IPv6 alone (the injector picks one per pod from ``equilibrium.io/ipv6``).
Every decision is one log line.

This starts in every meshed pod, so its imports stay light: no numpy (the strategy-profile
names come from ``mesh.profile_names``); tests/unit/injector/test_init_cli.py checks it.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from typing import Any

from injector.config import AnnotationError, parse_port_list
from injector.iptables import (
    InterceptionConfig,
    build_rules,
    cleanup_rules,
    commands,
    ip6tables_for,
)
from injector.ipv6_probe import probe as probe_ipv6


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "init",
        help="install the transparent-interception iptables (and ip6tables) rules",
        description="Redirect the pod's TCP to the sidecar (outbound and inbound, IPv4 and, "
                    "when the pod has it, IPv6), as istio-init does. Needs NET_ADMIN in the "
                    "pod's network namespace.",
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
    parser.add_argument("--ip6tables", default=None,
                        help="ip6tables binary (default: --iptables' twin, e.g. "
                             "ip6tables-legacy for iptables-legacy)")
    parser.add_argument("--ipv6", action=argparse.BooleanOptionalAction, default=None,
                        help="also intercept IPv6 with the same rules through ip6tables; "
                             "default: when the pod has IPv6 (::1 on lo), skipped with a "
                             "warning if ip6tables fails; --ipv6 makes a failure fatal; "
                             "--no-ipv6 leaves IPv6 alone")
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
        ip6tables = "" if args.ipv6 is False else args.ip6tables or ip6tables_for(args.iptables)
    except ValueError as exc:
        _say(str(exc), error=True)
        return 2
    rules = cleanup_rules() if args.cleanup else build_rules(config)
    if args.dry_run:  # both families unless --no-ipv6: detection is for the pod, not this host
        binaries = [args.iptables] if args.ipv6 is False else [args.iptables, ip6tables]
        for command in commands(rules, binaries):
            print(shlex.join(command))
        return 0
    binary = shutil.which(args.iptables)
    if binary is None:
        _say(f"{args.iptables!r} not found on PATH", error=True)
        return 1
    if args.cleanup:
        _remove(binary)
        binary6 = shutil.which(ip6tables) if args.ipv6 is not False else None
        if binary6 is not None:
            _remove(binary6)
        _say("interception rules removed" + (" (IPv4 and IPv6)" if binary6 else " (IPv4)"))
        return 0
    failure = _install(binary, args.iptables, rules)
    if failure is not None:
        _say(failure, error=True)
        return 1
    installed = f"{len(rules)} rules installed for IPv4"
    if _ipv6_wanted(args.ipv6):
        binary6 = shutil.which(ip6tables)
        failure = (f"{ip6tables!r} not found on PATH" if binary6 is None
                   else _install(binary6, ip6tables, rules))
        if failure is None:
            installed += f" and {len(rules)} for IPv6"
        elif args.ipv6:  # forced: a pod that must intercept IPv6 does not start without it
            _say(f"IPv6: {failure}", error=True)
            return 1
        else:
            _say(f"IPv6: {failure}; the pod's IPv6 traffic is NOT intercepted (pass --ipv6 "
                 "to make this fatal, --no-ipv6 to intercept IPv4 only)", error=True)
    _say(f"{installed} (outbound -> {config.outbound_port}, inbound -> {config.inbound_port}, "
         f"proxy uid {config.proxy_uid})")
    return 0


def _ipv6_wanted(flag: bool | None) -> bool:
    """--ipv6: yes; --no-ipv6: no; neither: when the pod's network namespace has IPv6."""
    if flag is not None:
        _say("IPv6: " + ("intercepted (--ipv6)" if flag else "not intercepted (--no-ipv6)"))
        return flag
    state = probe_ipv6()
    if state.intercept:
        _say(f"IPv6: intercepted: {state.reason}")
    elif state.traffic_possible:  # IPv6 flows but around the sidecar: say so loudly
        _say(f"IPv6: NOT intercepted: {state.reason}; the pod's IPv6 traffic bypasses the "
             "sidecar (pass --no-ipv6 to acknowledge, or fix the namespace)", error=True)
    else:
        _say(f"IPv6: not intercepted: {state.reason}")
    return state.intercept


def _install(binary: str, name: str, rules: list[list[str]]) -> str | None:
    """Install ``rules`` with ``binary`` after removing any earlier copy (idempotent). On a
    failure, remove what was added (no half-configured family) and say what failed."""
    _remove(binary)
    for rule in rules:
        done = subprocess.run([binary, *rule], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            _remove(binary)
            return (f"`{shlex.join([name, *rule])}` failed ({done.returncode}): "
                    f"{done.stderr.strip()}")
    return None


def _remove(binary: str) -> None:
    for rule in cleanup_rules():  # misses are expected: nothing may be installed yet
        subprocess.run([binary, *rule], capture_output=True, check=False)


def _say(message: str, error: bool = False) -> None:
    print(f"equilibrium init: {message}", file=sys.stderr if error else sys.stdout, flush=True)


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
