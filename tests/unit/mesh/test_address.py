"""mesh.address: the one HOST:PORT parser, against hand-made cases."""

from __future__ import annotations

import pytest

from mesh.address import AddressError, HostPort, parse_host_port


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:15001", HostPort("127.0.0.1", 15001)),
        ("0.0.0.0:0", HostPort("0.0.0.0", 0)),  # port 0: any free port
        ("localhost:8443", HostPort("localhost", 8443)),
        ("pod-a.ns.svc:65535", HostPort("pod-a.ns.svc", 65535)),
        ("[::1]:15001", HostPort("::1", 15001)),
        ("[::]:80", HostPort("::", 80)),
        ("[fd00::10]:9090", HostPort("fd00::10", 9090)),
        ("  10.0.0.1:80  ", HostPort("10.0.0.1", 80)),  # surrounding blanks are dropped
    ],
)
def test_valid_forms(text: str, expected: HostPort) -> None:
    assert parse_host_port(text) == expected


def test_an_empty_host_takes_the_default_only_when_there_is_one() -> None:
    assert parse_host_port(":15001", default_host="127.0.0.1") == HostPort("127.0.0.1", 15001)
    with pytest.raises(AddressError, match="no host"):
        parse_host_port(":15001")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nope", "expected HOST:PORT"),
        ("127.0.0.1", "expected HOST:PORT"),
        ("127.0.0.1:", "expected HOST:PORT"),
        ("127.0.0.1:http", "expected HOST:PORT"),
        ("127.0.0.1:-1", "expected HOST:PORT"),
        ("127.0.0.1:65536", "out of range"),
        ("::1:80", "brackets"),  # bare IPv6: where does the address end?
        ("[::1]", "expected HOST:PORT"),
        ("[::1:80", "expected HOST:PORT"),
        ("[10.0.0.1]:80", "not an IPv6"),
        ("[pod-a]:80", "not an IPv6"),
        ("my host:80", "expected HOST:PORT"),
        ("http://host:80", "expected HOST:PORT"),
        ("", "expected HOST:PORT"),
    ],
)
def test_malformed_addresses_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(AddressError, match=message):
        parse_host_port(text, default_host="127.0.0.1")


def test_a_bare_ipv6_address_is_shown_bracketed() -> None:
    with pytest.raises(AddressError, match=r"as in \[fd00::1\]:80"):
        parse_host_port("fd00::1:80")


def test_an_address_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_host_port("x")


def test_printed_form_brackets_ipv6_only() -> None:
    assert str(HostPort("::1", 1)) == "[::1]:1"
    assert str(HostPort("10.0.0.1", 80)) == "10.0.0.1:80"
    assert str(parse_host_port("[fd00::1]:15006")) == "[fd00::1]:15006"  # round trip
