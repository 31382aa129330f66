"""How transparent interception maps an original destination to a route, and which first bytes
it takes for HTTP/1.1 (no sockets here)."""

from __future__ import annotations

import pytest

from mesh.profiles import get_profile
from sidecar.transparent import TransparentRouter, sniff_http
from sidecar.upstreams import UpstreamTable


def make_table() -> UpstreamTable:
    table = UpstreamTable("equilibrium", get_profile("balanced"))
    table.apply({"10.96.0.50": ["http://10.0.0.5:80"]}, 0.0)  # static, named by its IP
    table.apply({"users.default.80": ["http://10.0.0.1:8080"],
                 "users.default.5432": ["http://10.0.0.1:5432"]}, 0.0, source="discovery")
    table.set_aliases({"users": "users.default.80", "10.96.0.10": "users.default.80"})
    return table


def discovered(host: str, port: int) -> tuple[str, str] | None:
    return {("10.96.0.10", 80): ("users.default.80", "http"),
            ("10.96.0.10", 5432): ("users.default.5432", "opaque"),
            ("10.96.0.11", 80): ("gone.default.80", "http")}.get((host, port))


def test_discovered_service_ports_route_with_their_protocol() -> None:
    router = TransparentRouter(make_table(), discovered)
    assert router.route(("10.96.0.10", 80)) == ("users.default.80", "http")
    assert router.route(("10.96.0.10", 5432)) == ("users.default.5432", "opaque")
    assert router.upstream_for(("10.96.0.10", 80)) == "users.default.80"


def test_a_port_the_service_does_not_expose_passes_through() -> None:
    router = TransparentRouter(make_table(), discovered)
    assert router.route(("10.96.0.10", 12345)) is None  # the alias of the IP is not a route
    assert router.route(("10.96.0.11", 80)) is None  # known to discovery, but no group (yet)
    assert router.route(("10.0.0.1", 8080)) is None  # a pod IP: pass through


def test_static_upstream_named_by_an_ip_routes_any_port_without_discovery() -> None:
    router = TransparentRouter(make_table())
    assert router.route(("10.96.0.50", 80)) == ("10.96.0.50", "unknown")
    assert router.route(("10.96.0.50", 9000)) == ("10.96.0.50", "unknown")
    assert router.route(("10.96.0.10", 80)) is None


@pytest.mark.parametrize(
    ("data", "verdict"),
    [
        (b"GET / HTTP/1.1\r\n", True),
        (b"OPTIONS ", True),
        (b"DELETE /x", True),
        (b"G", None),
        (b"OPTIO", None),
        (b"GETX", False),
        (b"PRI * HTTP/2.0", False),  # HTTP/2 prior knowledge: not for the HTTP/1.1 proxy
        (b"\x16\x03\x01\x02\x00", False),  # TLS ClientHello
        (b"get / HTTP/1.1", False),
    ],
)
def test_sniffing_recognises_http1_request_lines(data: bytes, verdict: bool | None) -> None:
    assert sniff_http(data) is verdict
