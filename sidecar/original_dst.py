"""The original destination of a connection that iptables REDIRECTed to the sidecar.

Owns the ``SO_ORIGINAL_DST`` socket option (netfilter conntrack, ``linux/netfilter_ipv4.h``)
and its IPv6 twin ``IP6T_SO_ORIGINAL_DST`` (``linux/netfilter_ipv6/ip6_tables.h``): both are
option 80, on ``SOL_IP`` and ``SOL_IPV6``, and return the ``sockaddr_in``/``sockaddr_in6``
the app originally connected to, before the NAT rewrite. The decoders are pure functions;
``original_dst`` does the one ``getsockopt`` call.

A connection that was not redirected has no NAT entry: the kernel answers ``ENOENT`` (or
the option is unknown when conntrack is not loaded), reported as ``NotRedirected``. A
connection whose original destination is the listening socket itself (the app used the
proxy on purpose, e.g. ``HTTP_PROXY``) is also "not redirected" for ``redirected_to``.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from typing import Any

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)
SOCKADDR_IN_SIZE = 16
SOCKADDR_IN6_SIZE = 28

Address = tuple[str, int]


class NotRedirected(OSError):
    """The socket has no original destination: it was not NAT-redirected."""


def decode_sockaddr_in(raw: bytes) -> Address:
    """``struct sockaddr_in``: family (host order), port (network order), 4-byte address."""
    if len(raw) < 8:
        raise ValueError(f"sockaddr_in needs 8 bytes, got {len(raw)}")
    family = struct.unpack("=H", raw[:2])[0]
    if family != socket.AF_INET:
        raise ValueError(f"sockaddr_in has family {family}, expected AF_INET")
    (port,) = struct.unpack("!H", raw[2:4])
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), port


def decode_sockaddr_in6(raw: bytes) -> Address:
    """``struct sockaddr_in6``: family, port, flowinfo, 16-byte address, scope id.

    An IPv4-mapped address (``::ffff:a.b.c.d``) is returned as the plain IPv4 address.
    """
    if len(raw) < 24:
        raise ValueError(f"sockaddr_in6 needs 24 bytes, got {len(raw)}")
    family = struct.unpack("=H", raw[:2])[0]
    if family != socket.AF_INET6:
        raise ValueError(f"sockaddr_in6 has family {family}, expected AF_INET6")
    (port,) = struct.unpack("!H", raw[2:4])
    address = ipaddress.IPv6Address(raw[8:24])
    mapped = address.ipv4_mapped
    return (str(mapped) if mapped is not None else str(address)), port


def original_dst(sock: Any) -> Address:
    """The (host, port) the peer of this accepted socket originally connected to.

    ``sock`` is a socket or asyncio's ``TransportSocket``. Raises ``NotRedirected`` when the
    kernel has no NAT record of the connection, ``OSError`` for other socket errors.
    """
    try:
        if sock.family == socket.AF_INET6:
            try:
                raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, SOCKADDR_IN6_SIZE)
                return decode_sockaddr_in6(raw)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOPROTOOPT):
                    raise
            # An IPv4 peer on a dual-stack socket: conntrack knows it as IPv4.
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_SIZE)
            return decode_sockaddr_in(raw)
        if sock.family != socket.AF_INET:
            raise NotRedirected(errno.EAFNOSUPPORT, "not an IP socket")
        return decode_sockaddr_in(sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_SIZE))
    except NotRedirected:
        raise
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise NotRedirected(exc.errno, "no NAT record: not redirected") from None
        if exc.errno == errno.ENOPROTOOPT:
            raise NotRedirected(
                exc.errno, "SO_ORIGINAL_DST unsupported (netfilter conntrack not loaded)"
            ) from None
        raise
    except ValueError as exc:
        raise NotRedirected(errno.EINVAL, f"undecodable original destination: {exc}") from None


def same_address(a: Address, b: Address) -> bool:
    """Equal (host, port), comparing hosts as IP addresses (IPv4-mapped IPv6 = IPv4)."""
    return a[1] == b[1] and _canonical(a[0]) == _canonical(b[0])


def redirected_to(sock: Any) -> Address | None:
    """The original destination if the connection was redirected to us, else None."""
    try:
        dst = original_dst(sock)
    except NotRedirected:
        return None
    local = sock.getsockname()
    return None if same_address(dst, (local[0], local[1])) else dst


def _canonical(host: str) -> str:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
