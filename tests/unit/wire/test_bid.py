"""wire.bid: the X-GT-Bid / X-GT-Price text format, its reasons, and reading back what we write."""

from __future__ import annotations

import pytest

from wire.bid import MAX_BID, format_bid, format_price, parse_bid
from wire.errors import Reason, WireError


@pytest.mark.parametrize(
    ("text", "value"),
    [("3", 3.0), (" 2.5 ", 2.5), ("0", 0.0), ("-0", 0.0), ("1e2", 100.0), ("+4", 4.0)],
)
def test_parse_bid_accepts_plain_decimals(text: str, value: float) -> None:
    assert parse_bid(text) == value


def test_absent_or_empty_bid_is_zero() -> None:
    assert parse_bid(None) == 0.0
    assert parse_bid("   ") == 0.0


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("abc", "malformed"),
        ("1,5", "malformed"),
        ("0x10", "malformed"),
        ("1_000", "malformed"),
        ("nan", "nan"),
        ("-NaN", "nan"),
        ("inf", "infinite"),
        ("-Infinity", "infinite"),
        ("1e400", "infinite"),
        ("-1", "negative"),
        ("-0.5", "negative"),
        ("1000001", "too-large"),
        ("1" * 40, "too-long"),
    ],
)
def test_malformed_bids_raise_with_a_reason_and_message(text: str, reason: str) -> None:
    with pytest.raises(WireError) as caught:
        parse_bid(text)
    assert caught.value.reason == reason
    assert "X-GT-Bid" in str(caught.value)


def test_bids_above_a_lower_cap_are_too_large() -> None:
    assert parse_bid(str(MAX_BID)) == MAX_BID
    with pytest.raises(WireError) as caught:
        parse_bid("11", max_bid=10.0)
    assert caught.value.reason is Reason.TOO_LARGE and caught.value.subject == "X-GT-Bid"


@pytest.mark.parametrize("bid", [0.0, 1.0, 2.5, 0.000001, 123456.789, 1e6])
def test_format_bid_reads_back(bid: float) -> None:
    assert parse_bid(format_bid(bid)) == pytest.approx(bid, abs=1e-6)


@pytest.mark.parametrize(("price", "text"), [(0.0, "0"), (3.0, "3"), (2.5, "2.5"),
                                             (123456.7, "123457")])
def test_format_price_is_what_parse_bid_reads(price: float, text: str) -> None:
    assert format_price(price) == text
    assert parse_bid(format_price(price)) == pytest.approx(price, rel=1e-5)
