"""wire.signals: an answer's game headers, signed over the caller's challenge and request."""

from __future__ import annotations

import base64
import hashlib
import hmac

from hypothesis import given
from hypothesis import strategies as st

from wire.errors import Reason
from wire.identity import new_nonce
from wire.signals import (
    AnsweredRequest,
    SignalsVerdict,
    SignedSignals,
    normal_ip,
    sign_signals,
    verify_signals,
)

KEY = b"signals-unit-test-key-0123456789"
CHALLENGE = new_nonce(b"0123456789ab")
ANSWERED = AnsweredRequest(CHALLENGE, "GET", "/users/7")
SIGNALS = SignedSignals("v=1;level=0.500", "v=1;score=1.000;level=0;phase=good", None)


def signed_as(header: str | None, message: str) -> bool:
    """Whether ``header``'s MAC is HMAC-SHA256 of ``message`` under :data:`KEY`."""
    assert header is not None
    expected = hmac.new(KEY, message.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64decode(header.rsplit("=", 1)[1] + "=") == expected


def test_the_mac_covers_challenge_caller_request_and_every_value() -> None:
    header = sign_signals(KEY, ANSWERED, "orders", SIGNALS)
    assert header is not None and header.startswith("v=1;caller=orders;sig=")
    assert signed_as(header, f"X-GT-Signals|v=1|{CHALLENGE}|orders|GET|/users/7|v=1;level=0.500|"
                              "v=1;score=1.000;level=0;phase=good|-")
    verdict = verify_signals(header, KEY, ANSWERED, SIGNALS)
    assert verdict.authentic and verdict.caller == "orders"


def test_version_2_signs_where_the_sidecar_was_reached_and_tells_it() -> None:
    """A stranger's finding: a third party passed a caller's challenge on to a meshed pod and
    relayed its signed refusal back. The signer's address is in the MAC input and in the
    header; changed, it does not verify, and the verdict says it for the caller to compare
    with where it sent the request."""
    answered = AnsweredRequest(CHALLENGE, "GET", "/users/7", "10.1.2.3")
    header = sign_signals(KEY, answered, "orders", SIGNALS)
    assert header is not None and header.startswith("v=2;caller=orders;at=10.1.2.3;sig=")
    assert signed_as(header, f"X-GT-Signals|v=2|{CHALLENGE}|orders|GET|/users/7|v=1;level=0.500|"
                              "v=1;score=1.000;level=0;phase=good|-|at=10.1.2.3")
    verdict = verify_signals(header, KEY, ANSWERED, SIGNALS)  # the caller's copy: no at
    assert verdict.authentic and (verdict.caller, verdict.at) == ("orders", "10.1.2.3")
    moved = header.replace("at=10.1.2.3", "at=10.1.2.4")
    assert verify_signals(moved, KEY, ANSWERED, SIGNALS).reason is Reason.BAD_SIGNATURE
    for bad in ("at=10.1.2", "at=", "at=::ffff:10.1.2.3", "where=10.1.2.3"):
        assert verify_signals(header.replace("at=10.1.2.3", bad), KEY, ANSWERED,
                              SIGNALS).reason is Reason.MALFORMED
    # an address that is none is left out (unbound), never a signature that cannot verify
    odd = sign_signals(KEY, AnsweredRequest(CHALLENGE, "GET", "/users/7", "pod-a"), "orders",
                       SIGNALS)
    assert odd is not None and odd.startswith("v=1;")
    assert verify_signals(odd, KEY, ANSWERED, SIGNALS).authentic
    # version 1 (an older sidecar): verifies, at no address
    old = sign_signals(KEY, ANSWERED, "orders", SIGNALS)
    assert old is not None and old.startswith("v=1;")
    assert verify_signals(old, KEY, ANSWERED, SIGNALS) == SignalsVerdict(None, "orders", "")
    assert verify_signals("v=3;caller=orders;sig=x", KEY, ANSWERED,
                          SIGNALS).reason is Reason.UNSUPPORTED_VERSION


def test_addresses_are_compared_in_one_spelling() -> None:
    assert normal_ip("10.0.0.5") == normal_ip("::ffff:10.0.0.5") == "10.0.0.5"
    assert normal_ip("FE80::1%eth0") == "fe80::1"
    assert normal_ip("2001:db8:0:0::1") == "2001:db8::1"
    for bad in ("", "pod-a", "10.0.0", None, 7, "1" * 80):
        assert normal_ip(bad) == ""


def test_anything_changed_is_a_bad_signature() -> None:
    header = sign_signals(KEY, ANSWERED, "orders", SIGNALS)
    changes = [
        (AnsweredRequest(new_nonce(b"another-one!"), "GET", "/users/7"), SIGNALS),
        (AnsweredRequest(CHALLENGE, "POST", "/users/7"), SIGNALS),
        (AnsweredRequest(CHALLENGE, "GET", "/users/8"), SIGNALS),
        (ANSWERED, SignedSignals(SIGNALS.congestion, "v=1;score=0;level=5;phase=punished;"
                                 "retry=300", None)),
        (ANSWERED, SignedSignals(SIGNALS.congestion, SIGNALS.reputation, "0")),
        (ANSWERED, SignedSignals(None, SIGNALS.reputation, None)),
    ]
    for answered, signals in changes:
        assert verify_signals(header, KEY, answered, signals).reason is Reason.BAD_SIGNATURE
    other = sign_signals(b"another-mesh-key-0123456789", ANSWERED, "orders", SIGNALS)
    assert verify_signals(other, KEY, ANSWERED, SIGNALS).reason is Reason.BAD_SIGNATURE


def test_a_refusal_is_signed_only_when_present_and_cannot_be_added_or_removed() -> None:
    """``X-GT-Refused`` joins the MAC input as ``|refused=<reason>`` only on a refusal, so an
    answer without one signs exactly as before; adding, removing or changing it breaks the
    signature (an app's own 503 cannot pass for a refusal by its sidecar)."""
    refused = SignedSignals(SIGNALS.congestion, SIGNALS.reputation, None, "queue-timeout")
    header = sign_signals(KEY, ANSWERED, "orders", refused)
    assert signed_as(header, f"X-GT-Signals|v=1|{CHALLENGE}|orders|GET|/users/7|v=1;level=0.500|"
                              "v=1;score=1.000;level=0;phase=good|-|refused=queue-timeout")
    assert verify_signals(header, KEY, ANSWERED, refused).authentic
    plain = sign_signals(KEY, ANSWERED, "orders", SIGNALS)
    for signed, signals in (
        (header, SIGNALS),  # the refusal stripped
        (plain, refused),  # a refusal added to an answer signed without one
        (header, SignedSignals(SIGNALS.congestion, SIGNALS.reputation, None, "queue-full")),
    ):
        assert verify_signals(signed, KEY, ANSWERED, signals).reason is Reason.BAD_SIGNATURE


def test_missing_and_malformed_values_are_named() -> None:
    assert verify_signals(None, KEY, ANSWERED, SIGNALS).reason is Reason.UNSIGNED
    assert verify_signals("", KEY, ANSWERED, SIGNALS).reason is Reason.UNSIGNED
    for header in ("v=1", "v=1;caller=a;sig=short", "v=1;sig=" + "A" * 43 + ";caller=a",
                   "v=1;caller=a b;sig=" + "A" * 43, "x" * 200, "garbage"):
        assert verify_signals(header, KEY, ANSWERED, SIGNALS).reason is Reason.MALFORMED
    assert (verify_signals("v=9;caller=a;sig=" + "A" * 43, KEY, ANSWERED, SIGNALS).reason
            is Reason.UNSUPPORTED_VERSION)


def test_no_usable_challenge_nothing_to_sign() -> None:
    assert sign_signals(KEY, AnsweredRequest("short", "GET", "/"), "orders", SIGNALS) is None


@given(st.text(max_size=200))
def test_arbitrary_headers_never_raise_and_never_verify(header: str) -> None:
    assert not verify_signals(header, KEY, ANSWERED, SIGNALS).authentic
