"""The proxy's pure rules, without processes: upstream names, hop-by-hop, retries, bodies.

The process tests (test_sidecar_http, test_sidecar_retries) check the same rules end to end;
these pin the edge cases that are awkward to produce on the wire.
"""

from __future__ import annotations

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.forward import (
    has_passed,
    must_be_empty,
    request_headers_to_upstream,
    response_headers_to_app,
    split_game_headers,
)
from sidecar.outbound import may_retry, upstream_name
from sidecar.transport import classify, from_aiohttp


def frozen(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


@pytest.mark.parametrize(
    ("authority", "name"),
    [
        ("users", "users"),
        ("Users:8080", "users"),
        ("users.", "users"),
        ("[::1]:15001", "::1"),
        ("127.0.0.1:80", "127.0.0.1"),
    ],
)
def test_upstream_name_ignores_port_and_case(authority: str, name: str) -> None:
    assert upstream_name(authority) == name


def test_every_connection_line_and_named_header_is_hop_by_hop() -> None:
    headers = frozen(
        ("Connection", "close, X-A"),
        ("connection", "X-B"),
        ("X-A", "1"),
        ("X-B", "2"),
        ("TE", "trailers"),
        ("Trailer", "X-Sum"),
        ("Transfer-Encoding", "chunked"),
        ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
        ("Accept", "text/html"),
        ("X-GT-Bid", "v=1;amount=5"),
    )
    out, game = split_game_headers(headers)
    assert list(out.items()) == [("Accept", "text/html")]
    assert game == [("x-gt-bid", "v=1;amount=5")]


def test_forwarded_headers_merge_existing_lines() -> None:
    headers = frozen(
        ("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-For", "10.0.0.2"), ("Via", "1.0 a")
    )
    out, stripped = request_headers_to_upstream(
        headers, client_ip="127.0.0.1", proto="http", via="1.1 me"
    )
    assert out.getall("X-Forwarded-For") == ["10.0.0.1, 10.0.0.2, 127.0.0.1"]
    assert out["Via"] == "1.0 a, 1.1 me" and out["X-Forwarded-Proto"] == "http"
    assert stripped == []


def test_response_game_headers_are_consumed_with_their_values() -> None:
    out, game = response_headers_to_app(
        frozen(("X-GT-Congestion", "v=1;level=0.5"), ("ETag", '"x"')), via="1.1 me"
    )
    assert game == {"x-gt-congestion": "v=1;level=0.5"}
    assert "X-GT-Congestion" not in out and out["ETag"] == '"x"'


def test_loop_detection_matches_whole_via_entries_only() -> None:
    assert has_passed(frozen(("Via", "1.0 edge, 1.1 me")), "1.1 me")
    assert not has_passed(frozen(("Via", "1.1 me-too")), "1.1 me")


@pytest.mark.parametrize(
    ("method", "has_body", "expected"),
    [
        ("GET", False, True),
        ("HEAD", False, True),
        ("OPTIONS", False, True),
        ("PUT", False, True),
        ("DELETE", False, True),
        ("PUT", True, False),
        ("GET", True, False),  # a streamed body cannot be replayed
        ("POST", False, False),
        ("PATCH", False, False),
    ],
)
def test_retry_rule(method: str, has_body: bool, expected: bool) -> None:
    assert may_retry(method, has_body) is expected


def test_bodiless_answers() -> None:
    assert must_be_empty("HEAD", 200) and must_be_empty("GET", 204)
    assert must_be_empty("GET", 304) and not must_be_empty("GET", 200)


def test_only_failures_before_sending_are_marked_safe_to_retry() -> None:
    assert classify(ConnectionResetError()).nothing_received is False  # unknown OSError
    assert classify(from_aiohttp(aiohttp.ServerDisconnectedError())).nothing_received is True
    timeout = classify(TimeoutError())
    assert (timeout.reason, timeout.status, timeout.nothing_received) == (
        "upstream-timeout", 504, False,
    )
