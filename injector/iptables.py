"""The transparent-interception rules that ``equilibrium init`` installs in a pod, as data.

Owns the iptables ``nat`` rules, in the manner of istio-init: the app's outbound TCP is
REDIRECTed to the sidecar's outbound port and inbound TCP to its inbound port, except
traffic of the sidecar's own UID/GID (so the proxy's upstream connections are not looped
back into itself), loopback traffic, the admin port and excluded ports. The sidecar then
reads the original destination with ``SO_ORIGINAL_DST``.

Dual-stack: the same rules go to ``iptables`` and ``ip6tables``. They name no address (the
loopback exemption is ``-o lo``, which covers 127.0.0.0/8, ``::1`` and the pod's own
addresses of both families; REDIRECT sends locally generated IPv4 to 127.0.0.1 and IPv6 to
``::1``, inbound to the address it arrived on), so one builder serves both families and they
cannot drift apart: ``commands`` only puts each family's binary in front.

Pure: ``build_rules`` and ``cleanup_rules`` return iptables argument lists (without the
binary), ``commands`` the full command lines per binary; ``injector/init_cli.py`` prints or
runs them, and ``injector/ipv6_probe.py`` decides whether the pod has IPv6 to intercept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

INBOUND_CHAIN = "EQUILIBRIUM_INBOUND"
INBOUND_REDIRECT_CHAIN = "EQUILIBRIUM_IN_REDIRECT"
OUTBOUND_CHAIN = "EQUILIBRIUM_OUTPUT"
OUTBOUND_REDIRECT_CHAIN = "EQUILIBRIUM_REDIRECT"
CHAINS = (INBOUND_CHAIN, INBOUND_REDIRECT_CHAIN, OUTBOUND_CHAIN, OUTBOUND_REDIRECT_CHAIN)
# Where our chains hook into the built-in ones (the same argv is used with -A and -D).
JUMPS = (("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTBOUND_CHAIN))


@dataclass(frozen=True, slots=True)
class InterceptionConfig:
    """What to intercept. Ports are validated on construction."""

    outbound_port: int = 15001
    inbound_port: int = 15006
    proxy_uid: int = 1337
    proxy_gid: int | None = 1337
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_inbound_ports: tuple[int, ...] = (15020,)

    def __post_init__(self) -> None:
        ports = (self.outbound_port, self.inbound_port,
                 *self.exclude_outbound_ports, *self.exclude_inbound_ports)
        for port in ports:
            if not 1 <= port <= 65535:
                raise ValueError(f"port {port} is outside 1-65535")
        if self.outbound_port == self.inbound_port:
            raise ValueError("the outbound and inbound ports must differ")
        for uid in (self.proxy_uid, self.proxy_gid):
            if uid is not None and uid < 0:
                raise ValueError(f"uid/gid {uid} is negative")


def build_rules(config: InterceptionConfig) -> list[list[str]]:
    """The ``iptables`` argument lists to run, in order, on a fresh pod network namespace."""
    nat = ["-t", "nat"]
    rules: list[list[str]] = [[*nat, "-N", chain] for chain in CHAINS]
    rules += [
        [*nat, "-A", OUTBOUND_REDIRECT_CHAIN, "-p", "tcp",
         "-j", "REDIRECT", "--to-ports", str(config.outbound_port)],
        [*nat, "-A", INBOUND_REDIRECT_CHAIN, "-p", "tcp",
         "-j", "REDIRECT", "--to-ports", str(config.inbound_port)],
    ]
    # Inbound: everything arriving for the pod, except the excluded ports (the admin port is
    # among them, so kubelet probes and Prometheus reach the sidecar directly).
    rules.append([*nat, "-A", "PREROUTING", "-p", "tcp", "-j", INBOUND_CHAIN])
    rules += [[*nat, "-A", INBOUND_CHAIN, "-p", "tcp", "--dport", str(port), "-j", "RETURN"]
              for port in _unique(config.exclude_inbound_ports)]
    rules.append([*nat, "-A", INBOUND_CHAIN, "-p", "tcp", "-j", INBOUND_REDIRECT_CHAIN])
    # Outbound: what the app connects to, except the proxy's own connections, loopback and
    # excluded destination ports.
    rules.append([*nat, "-A", "OUTPUT", "-p", "tcp", "-j", OUTBOUND_CHAIN])
    rules.append([*nat, "-A", OUTBOUND_CHAIN, "-m", "owner", "--uid-owner",
                  str(config.proxy_uid), "-j", "RETURN"])
    if config.proxy_gid is not None:
        rules.append([*nat, "-A", OUTBOUND_CHAIN, "-m", "owner", "--gid-owner",
                      str(config.proxy_gid), "-j", "RETURN"])
    # Leaving through lo: 127.0.0.0/8 and the pod's own IP (app ↔ sidecar, app ↔ itself).
    rules.append([*nat, "-A", OUTBOUND_CHAIN, "-o", "lo", "-j", "RETURN"])
    rules += [[*nat, "-A", OUTBOUND_CHAIN, "-p", "tcp", "--dport", str(port), "-j", "RETURN"]
              for port in _unique(config.exclude_outbound_ports)]
    rules.append([*nat, "-A", OUTBOUND_CHAIN, "-p", "tcp", "-j", OUTBOUND_REDIRECT_CHAIN])
    return rules


def cleanup_rules() -> list[list[str]]:
    """Argument lists that remove everything ``build_rules`` added (run each, ignore misses)."""
    nat = ["-t", "nat"]
    rules = [[*nat, "-D", hook, "-p", "tcp", "-j", chain] for hook, chain in JUMPS]
    rules += [[*nat, "-F", chain] for chain in CHAINS]
    rules += [[*nat, "-X", chain] for chain in CHAINS]
    return rules


def commands(rules: list[list[str]], binaries: Sequence[str]) -> list[list[str]]:
    """``rules`` (from ``build_rules`` or ``cleanup_rules``) once per binary, in that order:
    ``commands(build_rules(c), ["iptables", "ip6tables"])`` is the dual-stack rule set."""
    return [[binary, *rule] for binary in binaries for rule in rules]


def ip6tables_for(iptables: str) -> str:
    """The IPv6 twin of an iptables binary: ``iptables`` -> ``ip6tables``,
    ``iptables-legacy`` -> ``ip6tables-legacy``, ``/usr/sbin/iptables-nft`` ->
    ``/usr/sbin/ip6tables-nft``. ``ValueError`` for a name that does not start so."""
    head, slash, name = iptables.rpartition("/")
    if not name.startswith("iptables"):
        raise ValueError(f"cannot derive the ip6tables binary from {iptables!r}: "
                         "pass --ip6tables too")
    return f"{head}{slash}ip6{name[2:]}"


def _unique(ports: tuple[int, ...]) -> list[int]:
    return list(dict.fromkeys(ports))
