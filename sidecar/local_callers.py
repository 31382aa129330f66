"""Who may use the outbound listener: the pod's own app, never the network.

Owns the check an outbound socket makes on each accepted connection (issue 14, finding 17).
The outbound listener signs requests with the pod's identity, so it must not be an open proxy:
injected pods bind it to ``0.0.0.0:15001`` and ``[::]:15001`` (for the redirected app traffic),
and with IPv6 interception off or failed anything that can reach the pod could send through it.
A connection is accepted when its peer is

- a loopback address (``127.0.0.0/8``, ``::1``, or either mapped into IPv6), or
- an address of this host or pod (one the kernel lets a socket bind to: an address of its own
  interfaces; cached per address), or
- redirected: it has an original destination that is not the listener itself
  (:func:`sidecar.original_dst.redirected_to`), which the init rules only produce for the pod's
  own outbound traffic;

anything else is closed at once, counted in ``equilibrium_outbound_foreign_callers`` and
logged once per ``LOG_INTERVAL``. ``listener.local_only: false`` turns the check off (a
sidecar deliberately serving other hosts, which then holds its identity for them). (A host
with ``net.ipv4.ip_nonlocal_bind=1`` would take every address for its own: the check then lets
foreign peers through; the pod network namespaces the injector makes do not set it.)
It must not route or answer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter

from sidecar.original_dst import redirected_to

log = logging.getLogger(__name__)

LOG_INTERVAL = 10.0
CACHE_SIZE = 256

PeerCheck = Callable[[asyncio.BaseTransport], bool]
"""What an outbound site asks of each accepted connection: may it stay?"""


def bindable(ip: str) -> bool:
    """Whether ``ip`` is an address of this host (a socket can be bound to it)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((ip, 0))
    except OSError:
        return False
    return True


class LocalCallers:
    """The outbound listener's peer check (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry,
                 is_own: Callable[[str], bool] = bindable,
                 redirected: Callable[[socket.socket], object | None] = redirected_to) -> None:
        self.refused = Counter(
            "equilibrium_outbound_foreign_callers",
            "Connections to the outbound listener closed because their peer is not this pod "
            "(not loopback, not an own address, not redirected app traffic)", registry=registry)
        self._is_own = is_own
        self._redirected = redirected
        self._known: OrderedDict[str, bool] = OrderedDict()
        self._logged = -float("inf")

    def local(self, ip: str) -> bool:
        """Whether ``ip`` is loopback or one of this pod's own addresses (cached)."""
        try:
            address = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address.is_loopback:
            return True
        text = str(address)
        known = self._known.get(text)
        if known is None:
            known = self._known[text] = self._is_own(text)
            while len(self._known) > CACHE_SIZE:
                self._known.popitem(last=False)
        return known

    def admit(self, transport: asyncio.BaseTransport) -> bool:
        """True if the connection may stay; else it is counted (the caller closes it)."""
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if ip and self.local(ip):
            return True
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                if self._redirected(sock) is not None:
                    return True
            except OSError:
                pass
        self.refused.inc()
        now = time.monotonic()
        if now - self._logged >= LOG_INTERVAL:
            self._logged = now
            log.warning("outbound listener: refused a connection from %s, which is not this "
                        "pod (the outbound listener serves the local app only; see "
                        "docs/operations.md, Security)", ip or "an unknown peer")
        return False
