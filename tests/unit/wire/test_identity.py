"""wire.identity: the X-GT-Identity wire format, signing and verification."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.reputation import ANONYMOUS
from wire.errors import Reason
from wire.identity import IdentityRejection, VerifiedIdentity, sign_identity, verify_identity

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
NOW = 1_764_183_600.0


def _rejected(header: str | None, now: float = NOW, max_skew: float = 30.0) -> IdentityRejection:
    result = verify_identity(header, KEY, now, max_skew=max_skew)
    assert isinstance(result, IdentityRejection)
    return result


def _fields(header: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in header.split(";")[1:])


def test_round_trip_gives_the_caller_and_signing_time() -> None:
    header = sign_identity("payments-7f9c", KEY, NOW)
    result = verify_identity(header, KEY, NOW + 1.0)
    assert result == VerifiedIdentity(caller="payments-7f9c", issued_at=NOW)
    assert result.trusted


def test_signature_is_hmac_sha256_over_version_id_and_ts_text() -> None:
    header = sign_identity("svc-a", KEY, 12.5)
    assert header.startswith("v=1;id=svc-a;ts=12.500;sig=")
    message = b"X-GT-Identity|v=1|svc-a|12.500"
    expected = hmac.new(KEY, message, hashlib.sha256).digest()
    sig = _fields(header)["sig"]
    assert base64.urlsafe_b64decode(sig + "=") == expected
    assert "=" not in sig and len(sig) == 43


@pytest.mark.parametrize(
    "tamper",
    [
        lambda h: h.replace("id=svc-a", "id=svc-b"),
        lambda h: h.replace("ts=100.000", "ts=101.000"),
        lambda h: h[:-2] + ("AA" if not h.endswith("AA") else "BB"),
    ],
    ids=["id", "ts", "sig"],
)
def test_tampered_fields_are_rejected_as_bad_signature(tamper) -> None:
    header = tamper(sign_identity("svc-a", KEY, 100.0))
    result = verify_identity(header, KEY, 100.0)
    assert isinstance(result, IdentityRejection)
    assert result.reason is Reason.BAD_SIGNATURE
    assert result.caller == ANONYMOUS and not result.trusted


def test_a_header_signed_with_another_key_is_a_forgery() -> None:
    forged = sign_identity("svc-a", OTHER_KEY, NOW)
    assert _rejected(forged).reason is Reason.BAD_SIGNATURE


def test_key_rotation_accepts_either_key() -> None:
    old = sign_identity("svc-a", OTHER_KEY, NOW)
    new = sign_identity("svc-a", KEY, NOW)
    for header in (old, new):
        assert verify_identity(header, [KEY, OTHER_KEY], NOW).caller == "svc-a"


def test_expired_and_future_identities_are_rejected_at_the_skew_boundary() -> None:
    header = sign_identity("svc-a", KEY, NOW)
    assert verify_identity(header, KEY, NOW + 30.0, max_skew=30.0).trusted
    expired = _rejected(header, NOW + 30.5, max_skew=30.0)
    assert expired.reason is Reason.EXPIRED
    assert verify_identity(header, KEY, NOW - 30.0, max_skew=30.0).trusted
    future = _rejected(header, NOW - 30.5, max_skew=30.0)
    assert future.reason is Reason.FUTURE


def test_unknown_version_is_rejected_as_unsupported() -> None:
    header = sign_identity("svc-a", KEY, NOW).replace("v=1;", "v=2;", 1)
    result = _rejected(header)
    assert result.reason is Reason.UNSUPPORTED_VERSION
    assert "v=2" in result.detail


def test_missing_header_is_anonymous() -> None:
    for header in (None, ""):
        result = _rejected(header)
        assert result.reason is Reason.MISSING and result.caller == ANONYMOUS


@pytest.mark.parametrize(
    "header",
    [
        "garbage",
        "v1;id=svc-a;ts=1.0;sig=" + "A" * 43,
        "v=1",
        "v=1;id=svc-a;ts=1.0",
        "v=1;ts=1.0;id=svc-a;sig=" + "A" * 43,
        "v=1;id=svc a;ts=1.0;sig=" + "A" * 43,
        "v=1;id=" + "a" * 65 + ";ts=1.0;sig=" + "A" * 43,
        "v=1;id=anonymous;ts=1.0;sig=" + "A" * 43,
        "v=1;id=svc-a;ts=nan;sig=" + "A" * 43,
        "v=1;id=svc-a;ts=-5;sig=" + "A" * 43,
        "v=1;id=svc-a;ts=1e9;sig=" + "A" * 43,
        "v=1;id=svc-a;ts=1.0;sig=" + "A" * 42,
        "v=1;id=svc-a;ts=1.0;sig=" + "+" * 43,
        "v=1;id=svc-a;ts=1.0;sig=" + "A" * 43 + ";extra=1",
        "v=1;id=svc-a;" + "x" * 300,
    ],
)
def test_malformed_headers_are_rejected_with_a_reason(header: str) -> None:
    result = verify_identity(header, KEY, NOW)
    assert isinstance(result, IdentityRejection)
    assert result.reason is Reason.MALFORMED
    assert result.detail


@pytest.mark.parametrize("caller", ["", "has space", "semi;colon", "a" * 65, ANONYMOUS])
def test_signing_refuses_bad_caller_ids(caller: str) -> None:
    with pytest.raises(ValueError):
        sign_identity(caller, KEY, NOW)


@pytest.mark.parametrize("now", [-1.0, float("nan"), float("inf"), 1e12])
def test_signing_refuses_times_the_format_cannot_carry(now: float) -> None:
    with pytest.raises(ValueError, match="unix seconds"):
        sign_identity("svc-a", KEY, now)


def test_signing_refuses_a_short_key() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        sign_identity("svc-a", b"short", NOW)


@given(st.text(max_size=300))
def test_arbitrary_headers_never_raise_and_never_verify(header: str) -> None:
    result = verify_identity(header, KEY, NOW)
    assert isinstance(result, IdentityRejection)
    assert result.caller == ANONYMOUS


@given(
    caller=st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True).filter(
        lambda c: c != ANONYMOUS
    ),
    now=st.floats(min_value=0, max_value=4e9, allow_nan=False),
)
def test_every_valid_caller_round_trips(caller: str, now: float) -> None:
    result = verify_identity(sign_identity(caller, KEY, now), KEY, now)
    assert isinstance(result, VerifiedIdentity)
    assert result.caller == caller
