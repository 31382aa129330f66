"""X-GT-* header formats: round trips and every rejection."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from wire.errors import WireError
from wire.headers import (
    GAME_HEADERS,
    OTHER_GAME_HEADER,
    format_congestion,
    header_label,
    parse_congestion,
    parse_congestion_signal,
    parse_retry,
    strip_gt_headers,
)


def test_congestion_round_trip_and_clamp() -> None:
    assert parse_congestion(format_congestion(0.42, 10, 4)) == pytest.approx(0.42)
    s = parse_congestion_signal(format_congestion(7.0))
    assert s.level == 1.0 and s.limit is None
    assert parse_congestion("v=1;level=0.5;future=x") == 0.5  # unknown keys are ignored


@pytest.mark.parametrize("value,reason", [
    ("0.5", "malformed"), ("level=0.5", "version"), ("v=2;level=0.5", "version"),
    ("v=1", "malformed"), ("v=1;level=nan", "malformed"), ("v=1;level=2", "out-of-range"),
    ("v=1;level=abc", "malformed"), ("v=1;" + "x=1;" * 200, "too-long"),
])
def test_bad_congestion_values_are_rejected_with_a_reason(value: str, reason: str) -> None:
    with pytest.raises(WireError) as err:
        parse_congestion(value)
    assert err.value.reason == reason


def test_retry_header() -> None:
    assert parse_retry("2") == 2
    for bad in ("0", "-1", "x", "1000"):
        with pytest.raises(WireError):
            parse_retry(bad)


def test_strip_removes_every_gt_header_in_any_case() -> None:
    h = CIMultiDict([("X-GT-Bid", "1"), ("x-gt-bid", "2"), ("X-Gt-Identity", "x"),
                     ("traceparent", "00-abc"), ("Host", "a")])
    removed = strip_gt_headers(h)
    assert {r.lower() for r in removed} == {"x-gt-bid", "x-gt-identity"}
    assert list(h.keys()) == ["traceparent", "Host"]
    plain = {"X-GT-Regret": "v=1", "Accept": "*/*"}
    strip_gt_headers(plain)
    assert plain == {"Accept": "*/*"}


@given(st.text(max_size=300))
def test_parsers_never_raise_anything_but_header_error(value: str) -> None:
    for parse in (parse_congestion, parse_retry):
        with contextlib.suppress(WireError):
            parse(value)


@pytest.mark.parametrize("name", ["X-GT-Identity", "x-gt-bid", "X_GT_Identity", "X-GT_Price",
                                  "x_gt-regret", "X_Gt_Reputation", "x-gt-", "X_GT_"])
def test_every_spelling_a_cgi_app_reads_as_x_gt_is_a_game_header(name: str) -> None:
    from wire.headers import is_gt_header, strip_gt_headers
    assert is_gt_header(name)
    headers = {name: "1", "X-Other": "2"}
    assert strip_gt_headers(headers) == [name] and headers == {"X-Other": "2"}


@pytest.mark.parametrize("name", ["X-GTIdentity", "XGT-Bid", "X-G-T-Bid", "X-Gt", "Gt-X-Bid"])
def test_other_names_are_not_game_headers(name: str) -> None:
    from wire.headers import is_gt_header
    assert not is_gt_header(name)


def test_a_header_label_is_a_game_headers_own_spelling_or_one_for_all_others() -> None:
    for name in GAME_HEADERS.values():
        assert header_label(name) == name
        assert header_label(name.lower()) == name
        assert header_label(name.upper().replace("-", "_")) == name  # a CGI-style spelling
    for made_up in ("X-GT-Made-Up", "x-gt-", "X-GT-Bid-2", "x-gt-bid "):
        assert header_label(made_up) == OTHER_GAME_HEADER == "X-GT-*"
