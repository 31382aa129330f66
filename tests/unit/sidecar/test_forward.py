"""sidecar.forward: the header rules (hop-by-hop, forwarded headers, game headers, loops) and
the bodiless answers.

The process tests (test_sidecar_http, test_sidecar_retries) check the same rules end to end;
these pin the edge cases that are awkward to produce on the wire.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.forward import (
    has_passed,
    must_be_empty,
    request_headers_to_upstream,
    response_headers_to_app,
    split_game_headers,
    trailers_to_relay,
)
from sidecar.http1.trailers import LAST_CHUNK, TrailerError, last_chunk


def frozen(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


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


def test_x_forwarded_proto_keeps_the_scheme_the_first_proxy_set() -> None:
    # it was appended to ("https, http"), which frameworks read differently (a helper's
    # finding): kept as the first hop set it, as Envoy does for a trusted source
    for sent, expected in (("https", "https"), ("https, http", "https"), (None, "http")):
        headers = frozen(*([("X-Forwarded-Proto", sent)] if sent else []))
        out, _ = request_headers_to_upstream(headers, client_ip="127.0.0.1", proto="http",
                                             via="1.1 me")
        assert out.getall("X-Forwarded-Proto") == [expected]


def test_response_game_headers_are_consumed_with_their_values() -> None:
    out, game = response_headers_to_app(
        frozen(("X-GT-Congestion", "v=1;level=0.5"), ("ETag", '"x"')), via="1.1 me"
    )
    assert game == {"x-gt-congestion": "v=1;level=0.5"}
    assert "X-GT-Congestion" not in out and out["ETag"] == '"x"'


def test_loop_detection_matches_whole_via_entries_only() -> None:
    assert has_passed(frozen(("Via", "1.0 edge, 1.1 me")), "1.1 me")
    assert not has_passed(frozen(("Via", "1.1 me-too")), "1.1 me")


def test_bodiless_answers() -> None:
    assert must_be_empty("HEAD", 200) and must_be_empty("GET", 204)
    assert must_be_empty("GET", 304) and not must_be_empty("GET", 200)


def test_answer_fields_from_the_wire_follow_the_same_rules() -> None:
    """``response_headers_from_wire`` (the raw fields of sidecar.http1's client) gives what
    ``response_headers_to_app`` gives for the same fields decoded."""
    from sidecar.forward import response_headers_from_wire
    from sidecar.http1.client_connection import _decode

    cases = [
        [(b"Server", b"nginx"), (b"Connection", b"keep-alive"), (b"Via", b"1.0 a"),
         (b"X-GT-Congestion", b"v=1;level=0.5"), (b"x_gt_price", b"3"), (b"ETag", b'"\xff"')],
        [(b"Connection", b"close, X-A"), (b"X-A", b"1"), (b"Keep-Alive", b"timeout=5"),
         (b"Via", b"1.0 a"), (b"via", b"1.0 b"), (b"X-GT-Signals", b"s")],
        [(b"Connection", b"close"), (b"Close", b"1"), (b"Trailer", b"x"), (b"X-B", b"2")],
        [(b"Connection", b"keep-alive"), (b"Connection", b"X-GT-Price"), (b"X-GT-Price", b"1")],
        [],
    ]
    for fields in cases:
        out, game = response_headers_from_wire(fields, "1.1 me")
        want_out, want_game = response_headers_to_app(_decode(fields), "1.1 me")
        assert list(out.items()) == list(want_out.items())
        assert game == want_game


def test_trailers_keep_their_order_and_drop_what_may_not_ride_there() -> None:
    kept, game = trailers_to_relay(frozen(
        ("grpc-status", "0"), ("X-Sum", "1"), ("Content-Length", "5"), ("Host", "evil"),
        ("Transfer-Encoding", "chunked"), ("Set-Cookie", "a=b"), ("x_gt_bid", "9"),
        ("X-GT-Price", "3"), ("X-Sum", "2"), ("Connection", "close"),
        ("X-Forwarded-For", "10.0.0.1"), ("Via", "1.1 spoof"),
    ))
    assert kept == [("grpc-status", "0"), ("X-Sum", "1"), ("X-Sum", "2")]
    assert game == ["x_gt_bid", "X-GT-Price"]
    assert trailers_to_relay(None) == ([], [])


def test_the_last_chunk_carries_trailers_as_they_came() -> None:
    assert last_chunk(None) == last_chunk([]) == LAST_CHUNK == b"0\r\n\r\n"
    assert last_chunk([("X-A", "1"), ("X-B", "caf\u00e9")]) == (
        b"0\r\nX-A: 1\r\nX-B: caf\xc3\xa9\r\n\r\n")
    assert last_chunk([("X-A", "\udce9")]) == b"0\r\nX-A: \xe9\r\n\r\n"  # bytes kept as came


@pytest.mark.parametrize("value", ["1\r\nX-Smuggled: 1", "1\n", "1\r"])
def test_the_last_chunk_refuses_a_line_break(value: str) -> None:
    with pytest.raises(TrailerError):
        last_chunk([("X-A", value)])


_NAMES = st.sampled_from([b"Server", b"ETag", b"Connection", b"connection", b"Keep-Alive",
                          b"Via", b"VIA", b"X-GT-Price", b"x_gt_congestion", b"X-A", b"x-a",
                          b"Transfer-Encoding", b"Trailer", b"Content-Length", b"Set-Cookie"])
_VALUES = st.sampled_from([b"keep-alive", b" Keep-Alive ", b"close", b"close, X-A", b"X-A",
                           b"1.0 a", b"v=1;level=0.5", b"\xff\xfe", b"", b"a, b"])


@given(st.lists(st.tuples(_NAMES, _VALUES), max_size=12))
def test_the_answers_fields_from_the_wire_follow_the_general_rule(
        fields: list[tuple[bytes, bytes]]) -> None:
    from sidecar.forward import response_headers_from_wire
    from sidecar.http1.client_connection import _decode

    out, game = response_headers_from_wire(fields, "1.1 me")
    want_out, want_game = response_headers_to_app(_decode(fields), "1.1 me")
    assert list(out.items()) == list(want_out.items())
    assert game == want_game
