"""wire.identity: the X-GT-Identity wire format (version 2), signing and verification."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.reputation import ANONYMOUS
from wire.errors import Reason
from wire.identity import (
    BoundRequest,
    IdentityRejection,
    VerifiedIdentity,
    new_nonce,
    sign_identity,
    verify_identity,
)

KEY = b"k" * 16 + b"0123456789abcdef"
OTHER_KEY = b"o" * 16 + b"fedcba9876543210"
NOW = 1_764_183_600.0
REQUEST = BoundRequest("GET", "users", "/users/7?x=1")
NONCE = new_nonce(bytes(range(12)))


def _sign(caller: str = "svc-a", now: float = NOW, key: bytes = KEY,
          request: BoundRequest = REQUEST, nonce: str = NONCE) -> str:
    return sign_identity(caller, key, now, request, nonce)


def _verify(header: str | None, now: float = NOW, max_skew: float = 30.0,
            request: BoundRequest = REQUEST, key: bytes | list[bytes] = KEY
            ) -> VerifiedIdentity | IdentityRejection:
    return verify_identity(header, key, now, max_skew, request)


def _rejected(header: str | None, now: float = NOW, max_skew: float = 30.0,
              request: BoundRequest = REQUEST) -> IdentityRejection:
    result = _verify(header, now, max_skew, request)
    assert isinstance(result, IdentityRejection)
    return result


def _fields(header: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in header.split(";")[1:])


def test_round_trip_gives_the_caller_signing_time_and_nonce() -> None:
    result = _verify(_sign("payments-7f9c"), NOW + 1.0)
    assert result == VerifiedIdentity(caller="payments-7f9c", issued_at=NOW, nonce=NONCE)
    assert result.trusted


def test_signature_is_hmac_sha256_over_version_id_ts_nonce_and_the_request() -> None:
    header = _sign(now=12.5)
    assert header.startswith(f"v=2;id=svc-a;ts=12.500;n={NONCE};sig=")
    message = f"X-GT-Identity|v=2|svc-a|12.500|{NONCE}|GET|users|/users/7?x=1".encode()
    expected = hmac.new(KEY, message, hashlib.sha256).digest()
    sig = _fields(header)["sig"]
    assert base64.urlsafe_b64decode(sig + "=") == expected
    assert "=" not in sig and len(sig) == 43


@pytest.mark.parametrize("other", [
    BoundRequest("DELETE", "users", "/users/7?x=1"),
    BoundRequest("GET", "orders", "/users/7?x=1"),
    BoundRequest("GET", "users", "/admin/delete"),
    BoundRequest("GET", "users", "/users/7?x=2"),
], ids=["method", "authority", "path", "query"])
def test_an_identity_moved_to_another_request_is_a_bad_signature(other: BoundRequest) -> None:
    assert _rejected(_sign(), request=other).reason is Reason.BAD_SIGNATURE


def test_the_authority_is_compared_case_insensitively() -> None:
    assert _verify(_sign(), request=BoundRequest("get", " USERS ", "/users/7?x=1")).trusted


@pytest.mark.parametrize(
    "tamper",
    [
        lambda h: h.replace("id=svc-a", "id=svc-b"),
        lambda h: h.replace("ts=100.000", "ts=101.000"),
        lambda h: h.replace(f"n={NONCE}", "n=" + new_nonce(b"x" * 12)),
        lambda h: h[:-2] + ("AA" if not h.endswith("AA") else "BB"),
    ],
    ids=["id", "ts", "nonce", "sig"],
)
def test_tampered_fields_are_rejected_as_bad_signature(tamper) -> None:
    result = _rejected(tamper(_sign(now=100.0)), now=100.0)
    assert result.reason is Reason.BAD_SIGNATURE
    assert result.caller == ANONYMOUS and not result.trusted


def test_a_header_signed_with_another_key_is_a_forgery() -> None:
    assert _rejected(_sign(key=OTHER_KEY)).reason is Reason.BAD_SIGNATURE


def test_key_rotation_accepts_either_key() -> None:
    for header in (_sign(key=OTHER_KEY), _sign()):
        assert _verify(header, key=[KEY, OTHER_KEY]).caller == "svc-a"


def test_expired_and_future_identities_are_rejected_at_the_skew_boundary() -> None:
    header = _sign()
    assert _verify(header, NOW + 30.0).trusted
    assert _rejected(header, NOW + 30.5).reason is Reason.EXPIRED
    assert _verify(header, NOW - 30.0).trusted
    assert _rejected(header, NOW - 30.5).reason is Reason.FUTURE


def test_version_1_is_refused_as_unsupported() -> None:
    result = _rejected("v=1;id=svc-a;ts=1.000;sig=" + "A" * 43)
    assert result.reason is Reason.UNSUPPORTED_VERSION
    assert "v=1" in result.detail


def test_missing_header_is_anonymous() -> None:
    for header in (None, ""):
        result = _rejected(header)
        assert result.reason is Reason.MISSING and result.caller == ANONYMOUS


SIG = "A" * 43
N = "n=" + NONCE


@pytest.mark.parametrize(
    "header",
    [
        "garbage",
        f"v2;id=svc-a;ts=1.0;{N};sig={SIG}",
        "v=2",
        f"v=2;id=svc-a;ts=1.0;{N}",
        f"v=2;ts=1.0;id=svc-a;{N};sig={SIG}",
        f"v=2;id=svc a;ts=1.0;{N};sig={SIG}",
        "v=2;id=" + "a" * 65 + f";ts=1.0;{N};sig={SIG}",
        f"v=2;id=anonymous;ts=1.0;{N};sig={SIG}",
        f"v=2;id=svc-a;ts=nan;{N};sig={SIG}",
        f"v=2;id=svc-a;ts=-5;{N};sig={SIG}",
        f"v=2;id=svc-a;ts=1e9;{N};sig={SIG}",
        f"v=2;id=svc-a;ts=1.0;n=short;sig={SIG}",
        f"v=2;id=svc-a;ts=1.0;n=has+plus+sign+0000;sig={SIG}",
        f"v=2;id=svc-a;ts=1.0;{N};sig=" + "A" * 42,
        f"v=2;id=svc-a;ts=1.0;{N};sig=" + "+" * 43,
        f"v=2;id=svc-a;ts=1.0;{N};sig={SIG};extra=1",
        "v=2;id=svc-a;" + "x" * 300,
    ],
)
def test_malformed_headers_are_rejected_with_a_reason(header: str) -> None:
    result = _rejected(header)
    assert result.reason is Reason.MALFORMED
    assert result.detail


@pytest.mark.parametrize("caller", ["", "has space", "semi;colon", "a" * 65, ANONYMOUS])
def test_signing_refuses_bad_caller_ids(caller: str) -> None:
    with pytest.raises(ValueError):
        _sign(caller)


@pytest.mark.parametrize("now", [-1.0, float("nan"), float("inf"), 1e12])
def test_signing_refuses_times_the_format_cannot_carry(now: float) -> None:
    with pytest.raises(ValueError, match="unix seconds"):
        _sign(now=now)


def test_signing_refuses_a_short_key_and_a_bad_nonce() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        _sign(key=b"short")
    with pytest.raises(ValueError, match="nonce"):
        _sign(nonce="x")
    with pytest.raises(ValueError, match="12 random bytes"):
        new_nonce(b"abc")


@given(st.text(max_size=300))
def test_arbitrary_headers_never_raise_and_never_verify(header: str) -> None:
    result = _verify(header)
    assert isinstance(result, IdentityRejection)
    assert result.caller == ANONYMOUS


@given(
    caller=st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True).filter(
        lambda c: c != ANONYMOUS
    ),
    now=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    nonce=st.binary(min_size=12, max_size=12),
    target=st.text(min_size=1, max_size=200).map(lambda t: "/" + t),
)
def test_every_valid_caller_and_request_round_trips(caller: str, now: float, nonce: bytes,
                                                    target: str) -> None:
    request = BoundRequest("POST", "svc:8080", target)
    result = _verify(_sign(caller, now, nonce=new_nonce(nonce), request=request), now,
                     request=request)
    assert isinstance(result, VerifiedIdentity)
    assert result.caller == caller
