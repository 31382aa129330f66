"""wire.grpc_status: gRPC content types, statuses, grpc-timeout and grpc-message."""

from __future__ import annotations

import pytest

from wire import grpc_status as grpc


@pytest.mark.parametrize(("value", "expected"), [
    (b"application/grpc", True), (b"application/grpc+proto", True),
    (b"Application/GRPC; charset=utf-8", True), (b"application/grpc;x=1", True),
    (b"application/json", False), (b"application/grpc-web", False), (None, False), (b"", False),
])
def test_is_grpc(value: bytes | None, expected: bool) -> None:
    assert grpc.is_grpc(value) is expected


def test_only_endpoint_statuses_count_against_it() -> None:
    assert {s for s in range(17) if grpc.counts_against_endpoint(s)} == {2, 4, 8, 13, 14}


@pytest.mark.parametrize(("value", "seconds"), [
    (b"100m", 0.1), (b"5S", 5.0), (b"1H", 3600.0), (b"2M", 120.0), (b"250u", 250e-6),
    (b"7n", 7e-9), (b"99999999m", 99999.999),
])
def test_parse_timeout(value: bytes, seconds: float) -> None:
    assert grpc.parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [b"", b"m", b"10", b"10x", b"-1S", b"1.5S", b"123456789m",
                                   b" S"])
def test_malformed_timeout_is_none(value: bytes) -> None:
    assert grpc.parse_timeout(value) is None


@pytest.mark.parametrize("seconds", [0.0, 0.0004, 0.1, 1.2345, 99999.0, 1e6, 1e9])
def test_format_timeout_round_trips_up_to_rounding(seconds: float) -> None:
    text = grpc.format_timeout(seconds)
    parsed = grpc.parse_timeout(text)
    assert parsed is not None and len(text) <= 9
    assert seconds <= parsed <= max(seconds * 1.001 + 0.001, seconds + 3600)


def test_status_of_reads_the_first_grpc_status() -> None:
    assert grpc.status_of([(b":status", b"200"), (b"grpc-status", b"14")]) == 14
    assert grpc.status_of([(b"grpc-status", b"x")]) is None
    assert grpc.status_of([(b"content-type", b"application/grpc")]) is None


def test_message_is_percent_encoded_and_decoded() -> None:
    text = "bad % input: naïve\nline"
    encoded = grpc.encode_message(text)
    assert all(0x20 <= b <= 0x7E for b in encoded)
    assert b"%25" in encoded and b"%0A" in encoded
    assert grpc.decode_message(encoded) == text
    assert grpc.decode_message(b"100%zz") == "100%zz"  # a bad escape is kept


def test_trailers_only_answer() -> None:
    headers = dict(grpc.trailers_only(14, "no endpoint", [(b"via", b"2 sc")]))
    assert headers == {b":status": b"200", b"content-type": b"application/grpc",
                       b"grpc-status": b"14", b"grpc-message": b"no endpoint", b"via": b"2 sc"}
