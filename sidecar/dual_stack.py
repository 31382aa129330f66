"""The IPv6 twin of an IPv4 wildcard listener, so one listener serves a dual-stack pod.

Owns one rule of the sidecar's listeners: a listener on ``0.0.0.0`` (every IPv4 address, the
injector's default for outbound, inbound and admin) also listens on ``[::]`` (every IPv6
address), on the same port, through a second, IPv6-only socket of the same kind of site. With
``equilibrium init``'s ip6tables rules, a redirected IPv6 connection arrives at ``[::1]``
(outbound) or at the pod's IPv6 address (inbound), and kubelet probes an IPv6-primary pod on
its IPv6 address: without the twin all of them would be refused. Go's ``net.Listen("tcp",
"0.0.0.0:P")`` makes the same choice (a wildcard listens on both families).

Two sockets rather than one dual-stack socket (``IPV6_V6ONLY=0``), so IPv4 peers keep plain
IPv4 addresses (no ``::ffff:a.b.c.d`` in logs, ``X-Forwarded-For`` and caller identities).
A specific address (``127.0.0.1``, ``[::]``, ``[::1]``) is left as it is.

A kernel without IPv6 is no error: the listener serves IPv4 only and says so once. IPv6
present but the port taken on it is a startup error for a fixed port (IPv6 connections would
be refused); for port 0 (tests, tools) the twin is skipped with a warning.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

from aiohttp import web

log = logging.getLogger(__name__)

IPV4_WILDCARD = "0.0.0.0"
IPV6_WILDCARD = "::"
# socket(AF_INET6) or bind("::") fail so when the kernel has no IPv6 (ipv6.disable=1)
NO_IPV6 = frozenset({errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.EADDRNOTAVAIL})


def twin_host(host: str) -> str | None:
    """The IPv6 host a listener on ``host`` also binds, or None."""
    return IPV6_WILDCARD if host == IPV4_WILDCARD else None


async def start_ipv6_twin(
    make_site: Callable[[str, int], web.BaseSite],
    name: str,
    host: str,
    requested_port: int,
    bound_port: int,
) -> web.BaseSite | None:
    """Start ``make_site("::", bound_port)`` when ``host`` is the IPv4 wildcard.

    ``make_site`` builds an unstarted site of the same kind as the IPv4 one, on the same app
    runner. Returns the started twin, or None (not a wildcard, no IPv6 here, or port 0 taken
    on IPv6). Raises ``OSError`` when a fixed port cannot be had on IPv6.
    """
    ipv6_host = twin_host(host)
    if ipv6_host is None:
        return None
    try:
        site = make_site(ipv6_host, bound_port)
        await site.start()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno in NO_IPV6:
            log.info("listener %s: no IPv6 here (%s): IPv4 only", name, reason)
            return None
        if requested_port == 0:
            log.warning("listener %s: port %d is taken on IPv6 (%s): IPv4 only",
                        name, bound_port, reason)
            return None
        raise
    return site
