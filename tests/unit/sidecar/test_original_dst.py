"""SO_ORIGINAL_DST decoding, and a real socket that was not redirected."""

from __future__ import annotations

import socket
import struct

import pytest

from sidecar.original_dst import (
    NotRedirected,
    decode_sockaddr_in,
    decode_sockaddr_in6,
    original_dst,
    redirected_to,
    same_address,
)


def sockaddr_in(ip: str, port: int) -> bytes:
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + \
        socket.inet_aton(ip) + bytes(8)


def sockaddr_in6(ip: str, port: int) -> bytes:
    return (struct.pack("=H", socket.AF_INET6) + struct.pack("!H", port) + bytes(4)
            + socket.inet_pton(socket.AF_INET6, ip) + bytes(4))


def test_ipv4_original_destination_is_decoded() -> None:
    assert decode_sockaddr_in(sockaddr_in("10.96.0.10", 8080)) == ("10.96.0.10", 8080)


def test_ipv6_original_destination_is_decoded_and_mapped_ipv4_unwrapped() -> None:
    assert decode_sockaddr_in6(sockaddr_in6("fd00::a", 443)) == ("fd00::a", 443)
    assert decode_sockaddr_in6(sockaddr_in6("::ffff:10.1.2.3", 80)) == ("10.1.2.3", 80)


@pytest.mark.parametrize(
    ("decode", "raw", "message"),
    [
        (decode_sockaddr_in, b"\x02\x00", "needs 8 bytes"),
        (decode_sockaddr_in, sockaddr_in6("::1", 1)[:16], "family"),
        (decode_sockaddr_in6, sockaddr_in("10.0.0.1", 1) + bytes(12), "family"),
        (decode_sockaddr_in6, bytes(10), "needs 24 bytes"),
    ],
)
def test_garbage_is_rejected(decode: object, raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode(raw)  # type: ignore[operator]


def test_addresses_compare_as_ips() -> None:
    assert same_address(("::ffff:127.0.0.1", 80), ("127.0.0.1", 80))
    assert not same_address(("127.0.0.1", 80), ("127.0.0.1", 81))
    assert not same_address(("127.0.0.1", 80), ("127.0.0.2", 80))


def test_a_direct_loopback_connection_is_not_redirected() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname()[:2], timeout=2)
        accepted, _ = server.accept()
        with client, accepted:
            assert redirected_to(accepted) is None
            try:
                dst = original_dst(accepted)
            except NotRedirected:
                return  # no conntrack entry at all: also "not redirected"
            # conntrack tracks it without NAT: the original destination is the listener.
            assert same_address(dst, accepted.getsockname()[:2])


def test_a_unix_socket_has_no_original_destination() -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(NotRedirected):
        original_dst(a)
