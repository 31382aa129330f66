"""wire.numerals and the parsers that use it: ASCII digits only, bounded length (issue 14)."""

from __future__ import annotations

import pytest

from injector.config import AnnotationError, parse_port_list
from mesh.address import AddressError, parse_host_port
from sidecar.discovery.model import split_authority
from wire.errors import WireError
from wire.headers import CONGESTION, parse_number, parse_retry
from wire.numerals import ascii_decimal, ascii_uint
from wire.standing import parse_standing

HOSTILE_DIGITS = ["\u00b2", "\u0663", "1\u00b2", "\uff11", "1_0", " 1", "+1", "9" * 5_000, ""]


@pytest.mark.parametrize("text", HOSTILE_DIGITS)
def test_ascii_uint_refuses_what_isdigit_or_int_would_take(text: str) -> None:
    assert ascii_uint(text) is None


def test_ascii_uint_reads_plain_digits_within_the_bound() -> None:
    assert ascii_uint("0065535", max_digits=7) == 65535
    assert ascii_uint("123456", max_digits=5) is None


@pytest.mark.parametrize("text", ["\u0663", "nan", "inf", "-Infinity", "1_0", "1e999",
                                  "1" * 40, "0x10", ""])
def test_ascii_decimal_refuses_non_plain_numbers(text: str) -> None:
    assert ascii_decimal(text) is None


@pytest.mark.parametrize(("text", "value"), [("1.5", 1.5), ("-2", -2.0), (".5", 0.5),
                                             ("2e3", 2000.0), ("3.", 3.0)])
def test_ascii_decimal_reads_plain_numbers(text: str, value: float) -> None:
    assert ascii_decimal(text) == value


@pytest.mark.parametrize("value", [
    "v=1;score=1;level=\u00b2;phase=good",
    "v=1;score=1;level=\u0663;phase=good",
    "v=1;score=\u0661;level=0;phase=good",
    "v=1;score=1;level=0;phase=punished;retry=" + "9" * 5_000,
])
def test_standing_with_hostile_numbers_is_a_wire_error(value: str) -> None:
    with pytest.raises(WireError):
        parse_standing(value)


@pytest.mark.parametrize("value", ["\u00b2", "\u0663", "9" * 5_000])
def test_retry_and_numbers_with_hostile_digits_are_wire_errors(value: str) -> None:
    with pytest.raises(WireError):
        parse_retry(value)
    with pytest.raises(WireError):
        parse_number(CONGESTION, value)


@pytest.mark.parametrize("value", ["\u00b2", "8\u0663", "9" * 5_000, "80,\u00b2"])
def test_port_annotations_with_hostile_digits_are_annotation_errors(value: str) -> None:
    with pytest.raises(AnnotationError) as caught:
        parse_port_list("annotation x", value)
    assert len(str(caught.value)) < 300


@pytest.mark.parametrize("text", ["127.0.0.1:\u0663\u0663", "[::1]:\u00b2", "h:" + "9" * 5_000])
def test_host_port_with_hostile_digits_is_an_address_error(text: str) -> None:
    with pytest.raises(AddressError):
        parse_host_port(text)


def test_authority_with_hostile_port_is_refused() -> None:
    assert split_authority("svc:\u00b2") == ("", 0)
    assert split_authority("svc:\u0663") == ("", 0)
    assert split_authority("svc:8080") == ("svc", 8080)
