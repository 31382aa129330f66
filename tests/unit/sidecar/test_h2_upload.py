"""gRPC message boundaries as the inbound listener's HTTP/2 upload rule follows them."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from sidecar.h2_upload import GrpcFraming


def frame(payload: bytes) -> bytes:
    return struct.pack(">BI", 0, len(payload)) + payload


def test_a_whole_message_is_a_boundary_and_a_partial_one_is_not() -> None:
    framing = GrpcFraming()
    assert framing.at_boundary and framing.messages == 0
    framing.feed(frame(b"hello")[:3], now=1.0)  # part of the prefix
    assert not framing.at_boundary and framing.started == 1.0
    framing.feed(frame(b"hello")[3:7], now=2.0)
    assert not framing.at_boundary and framing.started == 1.0  # since its first byte
    framing.feed(frame(b"hello")[7:], now=3.0)
    assert framing.at_boundary and framing.messages == 1 and framing.started is None


def test_empty_messages_and_several_per_chunk() -> None:
    framing = GrpcFraming()
    framing.feed(frame(b"") + frame(b"ab") + frame(b"c")[:4], now=5.0)
    assert framing.messages == 2 and not framing.at_boundary and framing.started == 5.0


@given(st.lists(st.binary(max_size=40), max_size=8), st.data())
def test_any_split_counts_the_same_messages(payloads: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(frame(p) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    framing = GrpcFraming()
    start = 0
    for cut in [*cuts, len(stream)]:
        framing.feed(stream[start:cut], now=0.0)
        start = cut
    assert framing.messages == len(payloads) and framing.at_boundary
