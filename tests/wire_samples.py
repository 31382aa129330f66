"""Hand-made wire values the tests of wire/ share: a valid summary and recommendation, the
test mesh key, and a signer that follows docs/protocol.md byte for byte (not wire's code)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import replace

from hypothesis import strategies as st

from wire.recommendation import (
    RECOMMENDATION_FIELDS,
    Recommendation,
    verify_recommendation,
)
from wire.summary import RegretSummary

KEY = b"mesh-key-for-tests-0123456789abcdef"
OTHER_KEY = b"another-mesh-key-0123456789abcdefgh"
NOW = 1_764_183_600.0
EPS = ("10.0.0.1:8080", "10.0.0.2:8080", "[fd00::3]:8080")


def summary(**changes: object) -> RegretSummary:
    base = RegretSummary(
        sidecar="checkout-7f9c-1",
        upstream="orders.shop",
        epoch=41,
        sent_at=NOW,
        endpoints=EPS,
        requests=(120, 3, 0),
        failures=(2, 3, 0),
        latency_mean=(0.0123, 0.51, None),
        latency_p50=(0.011, 0.5, None),
        latency_p99=(0.031, 0.62, None),
        in_flight=(4, 1, 0),
        demand=41.5,
        weights=(0.6, 0.1, 0.3),
        regret=((0.0, -0.002, 0.001), (0.49, 0.0, 0.48), (0.0, 0.0, 0.0)),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def recommendation(**changes: object) -> Recommendation:
    base = Recommendation(
        upstream="orders.shop",
        sidecar="checkout-7f9c-1",
        epoch=42,
        issued_at=NOW,
        expires_at=NOW + 3.0,
        endpoints=EPS,
        weights=(0.75, 0.0, 0.25),
        status="optimal",
        objective=1.25,
        ce_gap=0.0,
        signer="signaler-0",
        fence=7,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def as_bytes(fields: dict[str, str]) -> dict[bytes, bytes]:
    """What redis-py returns without decode_responses."""
    return {k.encode(): v.encode() for k, v in fields.items()}


def resign(fields: dict[str, str], key: bytes = KEY) -> dict[str, str]:
    """Sign arbitrary (possibly invalid) fields exactly as docs/protocol.md specifies."""
    out = {k: v for k, v in fields.items() if k != "sig"}
    message = [b"equilibrium/recommendation/v1\n"]
    for name in RECOMMENDATION_FIELDS[:-1]:
        value = out[name].encode()
        message.append(name.encode() + b"=" + str(len(value)).encode() + b":" + value + b"\n")
    digest = hmac.new(key, b"".join(message), hashlib.sha256).digest()
    out["sig"] = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    return out


def verify(fields: object, now: float = NOW + 1.0, **kwargs: object) -> Recommendation:
    return verify_recommendation(
        fields, KEY, now, "orders.shop", "checkout-7f9c-1", **kwargs  # type: ignore[arg-type]
    )


_json_fragment = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda children: st.lists(children, max_size=5),
    max_leaves=20,
)
FIELD_VALUES = st.one_of(
    st.text(max_size=60),
    _json_fragment.map(lambda v: json.dumps(v)),
    st.sampled_from(["nan", "-inf", "1e400", "-0.0", "", "[]", "[[]]", "null", "00", "1e-400"]),
)
"""Field values a fuzzer writes into an entry: text, JSON fragments and numeric edge cases."""
