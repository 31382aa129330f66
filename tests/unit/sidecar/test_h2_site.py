"""sidecar.h2_site: telling the HTTP/2 preface from HTTP/1.1 by the first bytes."""

from __future__ import annotations

import pytest

from sidecar.h2_site import PREFACE, sniff_preface


def test_the_whole_preface_is_http2() -> None:
    assert sniff_preface(PREFACE) is True
    assert sniff_preface(PREFACE + b"\x00\x00\x12\x04") is True


@pytest.mark.parametrize("cut", [0, 1, 3, 10, 23])
def test_a_prefix_of_the_preface_waits_for_more(cut: int) -> None:
    assert sniff_preface(PREFACE[:cut]) is None


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"POST /x HTTP/1.1\r\n", b"PUT ",
                                  b"PRI * HTTP/1.1\r\n\r\n", b"\x16\x03\x01", b"PATCH /"])
def test_anything_else_is_not(data: bytes) -> None:
    assert sniff_preface(data) is False
