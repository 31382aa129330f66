"""Whether a pod's network namespace has IPv6 for ``equilibrium init`` to intercept.

Owns the reading of ``/proc/net/if_inet6`` (one line per IPv6 address: 32 hex digits, then
interface index, prefix length, scope and flags in hex, then the interface name) and the
verdict drawn from it:

- no file: the kernel has no IPv6 (``ipv6.disable=1``): nothing to intercept;
- no address at all: IPv6 is disabled on every interface (``disable_ipv6=1``): nothing can
  leave or arrive over IPv6, nothing to intercept;
- ``::1`` on ``lo``: intercept. Locally generated IPv6 that ip6tables REDIRECTs goes to
  ``::1``, so the sidecar's outbound listener must be reachable there;
- addresses but no ``::1`` (``net.ipv6.conf.lo.disable_ipv6=1``): IPv6 traffic exists but a
  redirect would have nowhere to land. Not intercepted, and said so loudly: the app's IPv6
  connections bypass the sidecar.

``ipv6_state`` is pure (the file's text in, a verdict out); ``probe`` reads the file.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

IF_INET6 = Path("/proc/net/if_inet6")
LOOPBACK = ipaddress.IPv6Address("::1")


@dataclass(frozen=True, slots=True)
class Ipv6State:
    """The verdict: intercept IPv6 or not, why (one log line), and whether IPv6 traffic can
    flow at all (when it can but is not intercepted, it bypasses the sidecar)."""

    intercept: bool
    reason: str
    traffic_possible: bool


def parse_if_inet6(text: str) -> list[tuple[str, ipaddress.IPv6Address]]:
    """(interface, address) per line; ``ValueError`` naming the line if one is malformed."""
    addresses = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 6 or len(fields[0]) != 32:
            raise ValueError(f"line {number}: expected 6 fields starting with 32 hex digits, "
                             f"got {line.strip()!r}")
        try:
            address = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
        except ValueError:
            raise ValueError(f"line {number}: {fields[0]!r} is not an IPv6 address") from None
        addresses.append((fields[5], address))
    return addresses


def ipv6_state(text: str | None) -> Ipv6State:
    """The verdict for ``/proc/net/if_inet6``'s text (None: the file does not exist)."""
    if text is None:
        return Ipv6State(False, "the kernel has no IPv6 (no /proc/net/if_inet6)", False)
    try:
        addresses = parse_if_inet6(text)
    except ValueError as exc:
        return Ipv6State(False, f"/proc/net/if_inet6 is unreadable ({exc})", True)
    if not addresses:
        return Ipv6State(False, "IPv6 is disabled on every interface (no IPv6 address)", False)
    others = [f"{name} {address}" for name, address in addresses if address != LOOPBACK]
    seen = ", ".join(others) if others else "no other address"
    if not any(address == LOOPBACK and name == "lo" for name, address in addresses):
        return Ipv6State(
            False,
            f"IPv6 is on ({seen}) but lo has no ::1 (net.ipv6.conf.lo.disable_ipv6=1?), "
            "where redirected IPv6 connections land",
            True,
        )
    return Ipv6State(True, f"IPv6 is on (lo ::1, {seen})", True)


def probe(path: Path = IF_INET6) -> Ipv6State:
    """The verdict for this process's network namespace."""
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return ipv6_state(None)
    except OSError as exc:
        return Ipv6State(False, f"cannot read {path}: {exc.strerror or exc}", True)
    return ipv6_state(text)
