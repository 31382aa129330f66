"""``HOST:PORT``: the one parser of listen addresses for every command line.

Owns the text form of an address to listen on or connect to: ``HOST:PORT``, ``[V6]:PORT``
(an IPv6 address always in brackets, since its own colons make a bare one ambiguous) and, when
the caller allows it, ``:PORT`` (the ``default_host``). The sidecar, the signaler and the
injector all parse their ``--outbound``/``--admin``/``--listen`` flags here. Pure: no socket,
no name resolution; a hostname is only checked for shape, never looked up.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from mesh.errors import ConfigError

_BRACKETED = re.compile(r"\[([^\[\]]+)\]:([0-9]{1,18})")  # ASCII only: '٣' is a \d
_PLAIN = re.compile(r"([^\s:\[\]/]*):([0-9]{1,18})")


class AddressError(ConfigError):
    """Not a ``HOST:PORT``; the message quotes the text and says what is wrong."""


@dataclass(frozen=True, slots=True)
class HostPort:
    """A host (name, IPv4 or IPv6 address without brackets) and a port (0: any free one)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def parse_host_port(text: str, *, default_host: str | None = None) -> HostPort:
    """``HOST:PORT``, ``[V6]:PORT``, or ``:PORT`` when ``default_host`` is given.

    Raises :class:`AddressError` for anything else: no port, a port outside 0..65535, an
    IPv6 address without brackets, brackets around something that is not IPv6, or an empty
    host when there is no default.
    """
    raw = str(text).strip()
    bracketed = _BRACKETED.fullmatch(raw)
    if bracketed is not None:
        host, port_text = bracketed.group(1), bracketed.group(2)
        if not _is_ipv6(host):
            raise AddressError(f"{text!r}: [{host}] is not an IPv6 address")
    else:
        plain = _PLAIN.fullmatch(raw)
        if plain is None:
            host, _, port_text = raw.rpartition(":")
            if _is_ipv6(host):
                raise AddressError(f"{text!r}: put an IPv6 address in brackets, "
                                   f"as in [{host}]:{port_text}")
            raise AddressError(f"expected HOST:PORT, got {text!r}")
        host, port_text = plain.group(1), plain.group(2)
        if not host:
            if default_host is None:
                raise AddressError(f"{text!r}: no host (expected HOST:PORT)")
            host = default_host
    port = int(port_text)
    if port > 65535:
        raise AddressError(f"{text!r}: port {port} out of range 0..65535")
    return HostPort(host, port)
