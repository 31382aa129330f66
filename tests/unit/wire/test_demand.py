"""wire.demand: a caller's rate to a service, signed with its identity's nonce."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wire.demand import Demand, DemandRejection, sign_demand, verify_demand
from wire.errors import Reason
from wire.identity import new_nonce

KEY = b"demand-unit-test-key-0123456789ab"
NONCE = new_nonce(b"0123456789ab")
OTHER_NONCE = new_nonce(b"ba9876543210")


def test_the_mac_covers_rate_endpoints_and_the_identity_nonce() -> None:
    header = sign_demand(83.33333, 3, KEY, NONCE)
    assert header is not None and header.startswith("v=1;rate=83.333;endpoints=3;sig=")
    message = f"X-GT-Demand|v=1|83.333|3|{NONCE}".encode()
    expected = hmac.new(KEY, message, hashlib.sha256).digest()
    assert base64.urlsafe_b64decode(header.rsplit("=", 1)[1] + "=") == expected
    demand = verify_demand(header, KEY, NONCE)
    assert demand == Demand(83.333, 3)
    assert isinstance(demand, Demand) and demand.per_endpoint == pytest.approx(27.777666)


@pytest.mark.parametrize(("rate", "text"), [(0.0, "0"), (10.0, "10"), (0.0004, "0"),
                                            (2.5, "2.5"), (1e9, "1000000")])
def test_rates_are_written_plainly_and_capped(rate: float, text: str) -> None:
    header = sign_demand(rate, 2, KEY, NONCE)
    assert header is not None and f";rate={text};" in header
    assert isinstance(verify_demand(header, KEY, NONCE), Demand)


def test_nothing_is_signed_without_a_sound_rate_endpoint_count_or_nonce() -> None:
    assert sign_demand(1.0, 0, KEY, NONCE) is None
    assert sign_demand(float("inf"), 3, KEY, NONCE) is None
    assert sign_demand(float("nan"), 3, KEY, NONCE) is None
    assert sign_demand(-1.0, 3, KEY, NONCE) is None
    assert sign_demand(1.0, 3, KEY, "short") is None


def test_a_demand_moved_to_another_request_or_altered_is_not_believed() -> None:
    header = sign_demand(40.0, 4, KEY, NONCE)
    assert header is not None
    moved = verify_demand(header, KEY, OTHER_NONCE)
    assert isinstance(moved, DemandRejection) and moved.reason is Reason.BAD_SIGNATURE
    lowered = verify_demand(header.replace("rate=40", "rate=4"), KEY, NONCE)
    assert isinstance(lowered, DemandRejection) and lowered.reason is Reason.BAD_SIGNATURE
    spread = verify_demand(header.replace("endpoints=4", "endpoints=40"), KEY, NONCE)
    assert isinstance(spread, DemandRejection) and spread.reason is Reason.BAD_SIGNATURE
    other_key = verify_demand(header, b"another-key-of-the-right-length!", NONCE)
    assert isinstance(other_key, DemandRejection) and other_key.reason is Reason.BAD_SIGNATURE
    assert isinstance(verify_demand(header, [b"old-key-of-the-right-length-0000", KEY], NONCE),
                      Demand)  # during a key rotation either key is accepted


SIG = "A" * 43


@pytest.mark.parametrize(("header", "reason"), [
    ("", Reason.MALFORMED),
    ("rate=1;endpoints=1;sig=" + SIG, Reason.MALFORMED),
    ("v=2;rate=1;endpoints=1;sig=" + SIG, Reason.UNSUPPORTED_VERSION),
    ("v=1;endpoints=1;rate=1;sig=" + SIG, Reason.MALFORMED),
    ("v=1;rate=1;endpoints=1", Reason.MALFORMED),
    ("v=1;rate=1;endpoints=1;sig=" + SIG + ";x=1", Reason.MALFORMED),
    ("v=1;rate=1e3;endpoints=1;sig=" + SIG, Reason.MALFORMED),
    ("v=1;rate=-1;endpoints=1;sig=" + SIG, Reason.MALFORMED),
    ("v=1;rate=nan;endpoints=1;sig=" + SIG, Reason.MALFORMED),
    ("v=1;rate=1.2345;endpoints=1;sig=" + SIG, Reason.MALFORMED),
    ("v=1;rate=１;endpoints=1;sig=" + SIG, Reason.MALFORMED),
    ("v=1;rate=1;endpoints=²;sig=" + SIG, Reason.MALFORMED),
    ("v=1;rate=1;endpoints=1;sig=short", Reason.MALFORMED),
    ("v=1;rate=1;endpoints=0;sig=" + SIG, Reason.OUT_OF_RANGE),
    ("v=1;rate=1;endpoints=100001;sig=" + SIG, Reason.OUT_OF_RANGE),
    ("v=1;rate=9999999;endpoints=1;sig=" + SIG, Reason.OUT_OF_RANGE),
    ("v=1;rate=1;endpoints=1;sig=" + SIG, Reason.BAD_SIGNATURE),
    ("v=1;rate=1;endpoints=1;sig=" + SIG + "x" * 100, Reason.TOO_LONG),
])
def test_malformed_demands_are_rejected_with_a_reason(header: str, reason: Reason) -> None:
    checked = verify_demand(header, KEY, NONCE)
    assert isinstance(checked, DemandRejection) and checked.reason is reason
    assert checked.detail


@given(st.text(max_size=200))
def test_any_text_is_rejected_or_believed_never_raises(header: str) -> None:
    checked = verify_demand(header, KEY, NONCE)
    assert isinstance(checked, DemandRejection | Demand)


@given(st.floats(min_value=0, max_value=1e6), st.integers(min_value=1, max_value=100_000))
def test_every_signed_demand_verifies_to_what_was_signed(rate: float, endpoints: int) -> None:
    header = sign_demand(rate, endpoints, KEY, NONCE)
    assert header is not None
    demand = verify_demand(header, KEY, NONCE)
    assert isinstance(demand, Demand) and demand.endpoints == endpoints
    assert demand.rate == pytest.approx(rate, abs=0.0006)
