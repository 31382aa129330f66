"""wire.recommendation: the signed layout, rotation, every rejection in order, fuzzing."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.wire_samples import (
    EPS,
    FIELD_VALUES,
    KEY,
    NOW,
    OTHER_KEY,
    as_bytes,
    recommendation,
    resign,
    verify,
)
from wire.errors import Reason, WireError
from wire.recommendation import (
    RECOMMENDATION_FIELDS,
    encode_recommendation,
    sign_recommendation,
    verify_recommendation,
)


def test_recommendation_round_trip_and_signature_layout() -> None:
    rec = recommendation()
    fields = sign_recommendation(rec, KEY)
    assert tuple(fields) == RECOMMENDATION_FIELDS
    assert len(fields["sig"]) == 43
    assert fields == resign(encode_recommendation(rec))  # the documented canonical encoding
    assert verify(fields) == rec
    assert verify(as_bytes(fields)) == rec
    assert rec.weight_map() == dict(zip(EPS, (0.75, 0.0, 0.25), strict=True))


def test_rotated_keys_verify_and_the_first_key_signs() -> None:
    rec = recommendation()
    old = sign_recommendation(rec, OTHER_KEY)
    assert verify_recommendation(old, [KEY, OTHER_KEY], NOW, "orders.shop",
                                 "checkout-7f9c-1") == rec
    assert sign_recommendation(rec, [KEY, OTHER_KEY]) == sign_recommendation(rec, KEY)
    with pytest.raises(ValueError, match="at least"):
        sign_recommendation(rec, b"short")
    with pytest.raises(ValueError, match="mesh key: none given"):
        sign_recommendation(rec, [])


def _signed(**changes: object) -> dict[str, str]:
    return sign_recommendation(recommendation(**changes), KEY)


def _tampered(field: str, value: str) -> dict[str, str]:
    fields = _signed()
    fields[field] = value
    return fields


def _signed_invalid(field: str, value: str) -> dict[str, str]:
    fields = encode_recommendation(recommendation())
    fields[field] = value
    return resign(fields)


REC_REJECTIONS: list[tuple[str, Callable[[], object], dict[str, object], Reason]] = [
    ("no sig field", lambda: {k: v for k, v in _signed().items() if k != "sig"}, {},
     Reason.UNSIGNED),
    ("empty sig", lambda: _tampered("sig", ""), {}, Reason.UNSIGNED),
    ("other mesh key", lambda: sign_recommendation(recommendation(), OTHER_KEY), {},
     Reason.BAD_SIGNATURE),
    ("weights tampered", lambda: _tampered("weights", "[0.0,0.0,1.0]"), {},
     Reason.BAD_SIGNATURE),
    ("fence tampered", lambda: _tampered("fence", "8"), {}, Reason.BAD_SIGNATURE),
    ("sig truncated", lambda: _tampered("sig", _signed()["sig"][:-1]), {},
     Reason.BAD_SIGNATURE),
    ("sig not base64url", lambda: _tampered("sig", "+" * 43), {}, Reason.BAD_SIGNATURE),
    ("future version", lambda: _tampered("v", "2"), {}, Reason.VERSION),
    ("missing field", lambda: {k: v for k, v in _signed().items() if k != "ce_gap"}, {},
     Reason.MALFORMED),
    ("unknown field", lambda: {**_signed(), "note": "hi"}, {}, Reason.MALFORMED),
    ("signed NaN weight", lambda: _signed_invalid("weights", "[NaN,0.5,0.5]"), {},
     Reason.MALFORMED),
    ("signed weights not summing to 1", lambda: _signed_invalid("weights", "[0.5,0.0,0.25]"),
     {}, Reason.MALFORMED),
    ("signed negative weight", lambda: _signed_invalid("weights", "[1.5,-0.5,0.0]"), {},
     Reason.MALFORMED),
    ("signed weight count mismatch", lambda: _signed_invalid("weights", "[0.5,0.5]"), {},
     Reason.MALFORMED),
    ("signed expiry before issue", lambda: _signed_invalid("expires_at", repr(NOW - 1)), {},
     Reason.MALFORMED),
    ("signed negative gap", lambda: _signed_invalid("ce_gap", "-0.5"), {}, Reason.MALFORMED),
    ("signed zero fence", lambda: _signed_invalid("fence", "0"), {}, Reason.MALFORMED),
    ("signed bad status", lambda: _signed_invalid("status", "OPTIMAL!"), {}, Reason.MALFORMED),
    ("oversized", lambda: {**_signed(), "endpoints": "x" * (300 * 1024)}, {},
     Reason.OVERSIZED),
    ("another upstream", lambda: _signed(upstream="payments"), {}, Reason.WRONG_UPSTREAM),
    ("another sidecar", lambda: _signed(sidecar="checkout-7f9c-2"), {}, Reason.WRONG_SIDECAR),
    ("other endpoints", _signed, {"expected_endpoints": EPS[:2]}, Reason.ENDPOINT_MISMATCH),
    ("older epoch", _signed, {"min_epoch": 43}, Reason.STALE),
    ("deposed leader", _signed, {"min_fence": 8}, Reason.FENCED),
    ("issued in the future", lambda: _signed(issued_at=NOW + 60, expires_at=NOW + 63), {},
     Reason.NOT_YET_VALID),
    ("expired", _signed, {"now": NOW + 3.0}, Reason.EXPIRED),
    ("long expired", _signed, {"now": NOW + 3600.0}, Reason.EXPIRED),
]


@pytest.mark.parametrize(
    ("make", "kwargs", "reason"),
    [(m, k, r) for _, m, k, r in REC_REJECTIONS],
    ids=[name for name, _, _, _ in REC_REJECTIONS],
)
def test_recommendation_rejections(
    make: Callable[[], object], kwargs: dict[str, object], reason: Reason
) -> None:
    with pytest.raises(WireError) as err:
        verify(make(), **kwargs)  # type: ignore[arg-type]
    assert err.value.reason is reason


def test_boundaries_that_still_verify() -> None:
    fields = _signed()
    assert verify(fields, now=NOW + 2.999).epoch == 42
    assert verify(fields, min_epoch=42, min_fence=7, expected_endpoints=reversed(EPS)).fence == 7
    assert verify(_signed(issued_at=NOW + 4, expires_at=NOW + 7), now=NOW).epoch == 42


@settings(max_examples=120, deadline=None)
@given(st.sampled_from(RECOMMENDATION_FIELDS[:-1]), FIELD_VALUES)
def test_mutated_signed_recommendations_verify_valid_or_raise(field: str, value: str) -> None:
    fields = encode_recommendation(recommendation())
    fields[field] = value
    try:
        rec = verify(resign(fields), now=NOW)
    except WireError as exc:
        assert exc.reason in set(Reason)
    else:
        assert verify(sign_recommendation(rec, KEY), now=NOW) == rec
