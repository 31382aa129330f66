"""The probe exchange's wire format: a signed answer verifies only with the mesh key and the
nonce that was sent; everything else is refused with a reason, never an exception of another
type."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.probes import ProbeReport
from wire.errors import Reason, WireError
from wire.probe import format_answer, format_request, parse_answer, parse_request

KEY = b"probe-test-key-0123456789abcdef"
OTHER = b"another-mesh-key-9876543210zyxw"
NONCE = "abcdefghijklmnopqrstuv"
REPORT = ProbeReport(in_flight=3, mean=0.0125, p50=0.01, p90=0.02, samples=17,
                     congestion=0.25, limit=20, draining=False)


def test_a_signed_answer_round_trips() -> None:
    text = format_answer(KEY, NONCE, REPORT)
    assert text.startswith("v=1;nonce=abcdefghijklmnopqrstuv;inflight=3;mean=0.012500;"
                           "p50=0.010000;p90=0.020000;n=17;cong=0.2500;limit=20;drain=0;sig=")
    assert parse_answer(text, KEY, NONCE) == REPORT
    assert parse_answer(text, [OTHER, KEY], NONCE) == REPORT  # rotation: any key verifies


def test_a_request_header_round_trips_and_bad_ones_are_refused() -> None:
    assert parse_request(format_request(NONCE)) == NONCE
    for bad, reason in ((None, Reason.MISSING), ("v=2;nonce=" + NONCE, Reason.VERSION),
                        ("v=1;nonce=short", Reason.MALFORMED), ("v=1", Reason.MALFORMED),
                        ("v=1;nonce=" + "a" * 60, Reason.TOO_LONG)):
        with pytest.raises(WireError) as caught:
            parse_request(bad)
        assert caught.value.reason is reason
    with pytest.raises(ValueError):
        format_request("not a nonce!")


def _refused(text: str, keys: bytes = KEY, nonce: str = NONCE) -> Reason:
    with pytest.raises(WireError) as caught:
        parse_answer(text, keys, nonce)
    return caught.value.reason


def test_forged_unsigned_replayed_and_tampered_answers_are_refused() -> None:
    text = format_answer(KEY, NONCE, REPORT)
    body = text.rpartition(";sig=")[0]
    assert _refused(body) is Reason.UNSIGNED
    assert _refused(format_answer(OTHER, NONCE, REPORT)) is Reason.BAD_SIGNATURE  # forged
    assert _refused(text.replace("inflight=3", "inflight=0")) is Reason.BAD_SIGNATURE
    assert _refused(text, nonce="zyxwvutsrqponmlkjihgfe") is Reason.STALE  # replayed
    assert _refused(text[:-1] + "!") is Reason.MALFORMED


def _signed(body: str) -> str:
    from wire.signing import mac
    return f"{body};sig={mac(KEY, b'X-GT-Probe-Answer|' + body.encode())}"


@pytest.mark.parametrize(("body", "reason"), [
    ("v=1;nonce=abcdefghijklmnopqrstuv;inflight=3;mean=0.1;p50=0.1;p90=0.1;n=1;cong=2;limit=1;"
     "drain=0", Reason.OUT_OF_RANGE),
    ("v=1;nonce=abcdefghijklmnopqrstuv;inflight=٣;mean=0.1;p50=0.1;p90=0.1;n=1;cong=0;limit=1;"
     "drain=0", Reason.MALFORMED),
    ("v=1;nonce=abcdefghijklmnopqrstuv;inflight=3;mean=nan;p50=0.1;p90=0.1;n=1;cong=0;limit=1;"
     "drain=0", Reason.MALFORMED),
    ("v=1;nonce=abcdefghijklmnopqrstuv;inflight=3;mean=-1;p50=0.1;p90=0.1;n=1;cong=0;limit=1;"
     "drain=0", Reason.MALFORMED),
    ("v=1;nonce=abcdefghijklmnopqrstuv;inflight=3;mean=0.1;p50=0.1;p90=0.1;n=1;cong=0;limit=1;"
     "drain=yes", Reason.MALFORMED),
    ("v=1;nonce=abcdefghijklmnopqrstuv;inflight=9999999;mean=0.1;p50=0.1;p90=0.1;n=1;cong=0;"
     "limit=1;drain=0", Reason.OUT_OF_RANGE),
    ("v=1;inflight=3;nonce=abcdefghijklmnopqrstuv;mean=0.1;p50=0.1;p90=0.1;n=1;cong=0;limit=1;"
     "drain=0", Reason.MALFORMED),
    ("v=2;nonce=abcdefghijklmnopqrstuv", Reason.VERSION),
])
def test_signed_but_out_of_shape_values_are_refused(body: str, reason: Reason) -> None:
    assert _refused(_signed(body)) is reason


def test_values_are_clamped_into_their_bounds_when_formatted() -> None:
    wild = ProbeReport(in_flight=10**9, mean=float("inf"), p50=-1.0, p90=1e9, samples=-5,
                       congestion=float("nan"), limit=-1, draining=True)
    report = parse_answer(format_answer(KEY, NONCE, wild), KEY, NONCE)
    assert report == ProbeReport(in_flight=10**6, mean=0.0, p50=0.0, p90=3600.0, samples=0,
                                 congestion=1.0, limit=0, draining=True)


@given(st.text(max_size=600))
def test_any_text_is_refused_with_a_wire_error(text: str) -> None:
    with pytest.raises(WireError):
        parse_answer(text, KEY, NONCE)
