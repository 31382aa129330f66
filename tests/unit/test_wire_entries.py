"""wire stream entries (summary, recommendation, lease, keys): round trips, every rejection
reason, decoders that raise only WireError."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wire.errors import Reason, WireError
from wire.keys import fence_key, leader_key, recommendation_stream, summary_stream
from wire.lease import Lease, decode_lease, encode_lease
from wire.recommendation import (
    RECOMMENDATION_FIELDS,
    Recommendation,
    encode_recommendation,
    sign_recommendation,
    verify_recommendation,
)
from wire.summary import SUMMARY_FIELDS, RegretSummary, decode_summary, encode_summary

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


# --------------------------------------------------------------------------------- key names


def test_keys_share_one_cluster_hash_slot_per_upstream() -> None:
    assert summary_stream("orders.shop") == "eq:{orders.shop}:summaries"
    assert recommendation_stream("orders.shop", "sc-1") == "eq:{orders.shop}:recs:sc-1"
    assert leader_key("orders.shop") == "eq:{orders.shop}:leader"
    assert fence_key("orders.shop") == "eq:{orders.shop}:fence"


@pytest.mark.parametrize("name", ["", "a}b", "a{b", "a b", "a:b", "-lead", "x" * 129, "é"])
def test_bad_names_never_become_keys(name: str) -> None:
    with pytest.raises(WireError) as err:
        summary_stream(name)
    assert err.value.reason is Reason.MALFORMED
    with pytest.raises(WireError):
        recommendation_stream("orders", name)


# --------------------------------------------------------------------------------- summaries


def test_summary_round_trips_through_str_and_bytes_fields() -> None:
    s = summary()
    fields = encode_summary(s)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items())
    assert fields["v"] == "1" and fields["type"] == "summary"
    assert set(fields) == set(SUMMARY_FIELDS)
    assert decode_summary(fields) == s
    assert decode_summary(as_bytes(fields)) == s


def test_summary_accepts_numpy_values_and_stores_python_ones() -> None:
    s = summary(
        epoch=np.int64(41),
        requests=tuple(np.array([120, 3, 0])),
        weights=tuple(np.array([0.6, 0.1, 0.3])),
        regret=tuple(tuple(row) for row in np.zeros((3, 3))),
    )
    assert type(s.epoch) is int and type(s.requests[0]) is int
    assert type(s.weights[0]) is float
    assert decode_summary(encode_summary(s)) == s


def test_rounding_noise_in_weights_reads_as_zero() -> None:
    s = summary(weights=(0.7, -1e-12, 0.3))
    assert s.weights == (0.7, 0.0, 0.3)
    assert decode_summary(encode_summary(s)) == s
    with pytest.raises(WireError, match="weights"):
        summary(weights=(0.7, -1e-6, 0.3))


def test_floats_survive_exactly() -> None:
    s = summary(demand=0.1 + 0.2, sent_at=NOW + 1 / 3)
    back = decode_summary(encode_summary(s))
    assert back.demand == 0.1 + 0.2 and back.sent_at == NOW + 1 / 3


def _set(field: str, value: str) -> Callable[[dict[str, str]], None]:
    def apply(fields: dict[str, str]) -> None:
        fields[field] = value

    return apply


def _drop(field: str) -> Callable[[dict[str, str]], None]:
    def apply(fields: dict[str, str]) -> None:
        del fields[field]

    return apply


SUMMARY_REJECTIONS: list[tuple[str, Callable[[dict[str, str]], None], Reason]] = [
    ("missing field", _drop("regret"), Reason.MALFORMED),
    ("missing version", _drop("v"), Reason.MALFORMED),
    ("unknown field", _set("extra", "1"), Reason.MALFORMED),
    ("future version", _set("v", "2"), Reason.VERSION),
    ("wrong type", _set("type", "recommendation"), Reason.MALFORMED),
    ("negative epoch", _set("epoch", "-1"), Reason.MALFORMED),
    ("fractional epoch", _set("epoch", "1.5"), Reason.MALFORMED),
    ("nan time", _set("sent_at", "nan"), Reason.MALFORMED),
    ("inf time", _set("sent_at", "inf"), Reason.MALFORMED),
    ("overflowing time", _set("sent_at", "1e400"), Reason.MALFORMED),
    ("zero time", _set("sent_at", "0"), Reason.MALFORMED),
    ("negative demand", _set("demand", "-3"), Reason.MALFORMED),
    ("huge demand", _set("demand", "1e15"), Reason.MALFORMED),
    ("duplicate endpoints", _set("endpoints", '["a:1","a:1","b:1"]'), Reason.MALFORMED),
    ("bad endpoint id", _set("endpoints", '["a:1","b 1","c:1"]'), Reason.MALFORMED),
    ("endpoints not a list", _set("endpoints", '{"a":1}'), Reason.MALFORMED),
    ("no endpoints", _set("endpoints", "[]"), Reason.MALFORMED),
    ("too many endpoints", _set("endpoints", json.dumps([f"e{i}:1" for i in range(65)])),
     Reason.OVERSIZED),
    ("short vector", _set("requests", "[1,2]"), Reason.MALFORMED),
    ("float count", _set("requests", "[1.0,3,0]"), Reason.MALFORMED),
    ("bool count", _set("in_flight", "[true,1,0]"), Reason.MALFORMED),
    ("more failures than requests", _set("failures", "[121,3,0]"), Reason.MALFORMED),
    ("missing latency with requests", _set("latency_mean", "[null,0.5,null]"), Reason.MALFORMED),
    ("NaN latency", _set("latency_p50", "[NaN,0.5,null]"), Reason.MALFORMED),
    ("Infinity latency", _set("latency_p99", "[Infinity,0.6,null]"), Reason.MALFORMED),
    ("negative latency", _set("latency_mean", "[-0.1,0.5,null]"), Reason.MALFORMED),
    ("latency in ms by mistake", _set("latency_p99", "[31000.0,0.62,null]"), Reason.MALFORMED),
    ("p50 above p99", _set("latency_p50", "[0.05,0.5,null]"), Reason.MALFORMED),
    ("weights do not sum to 1", _set("weights", "[0.5,0.1,0.3]"), Reason.MALFORMED),
    ("negative weight", _set("weights", "[1.2,-0.2,0.0]"), Reason.MALFORMED),
    ("weights too short", _set("weights", "[0.5,0.5]"), Reason.MALFORMED),
    ("ragged regret", _set("regret", "[[0,0,0],[0,0],[0,0,0]]"), Reason.MALFORMED),
    ("regret rows missing", _set("regret", "[[0,0,0],[0,0,0]]"), Reason.MALFORMED),
    ("regret not nested", _set("regret", "[0,0,0]"), Reason.MALFORMED),
    ("huge regret", _set("regret", "[[0,0,0],[0,1e9,0],[0,0,0]]"), Reason.MALFORMED),
    ("string in regret", _set("regret", '[[0,0,0],[0,"x",0],[0,0,0]]'), Reason.MALFORMED),
    ("invalid json", _set("weights", "[0.6,0.1,"), Reason.MALFORMED),
    ("deep json", _set("weights", "[" * 5000 + "]" * 5000), Reason.MALFORMED),
    ("bad sidecar id", _set("sidecar", "a;b"), Reason.MALFORMED),
    ("oversized field", _set("regret", "[" + "0," * 120_000 + "0]"), Reason.OVERSIZED),
]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [(m, r) for _, m, r in SUMMARY_REJECTIONS],
    ids=[name for name, _, _ in SUMMARY_REJECTIONS],
)
def test_summary_rejections(mutate: Callable[[dict[str, str]], None], reason: Reason) -> None:
    fields = encode_summary(summary())
    mutate(fields)
    with pytest.raises(WireError) as err:
        decode_summary(fields)
    assert err.value.reason is reason
    assert str(err.value).startswith(f"{reason.value}: ")


def test_summary_rejects_non_utf8_duplicates_and_non_mappings() -> None:
    raw = as_bytes(encode_summary(summary()))
    raw[b"sidecar"] = b"\xff\xfe"
    with pytest.raises(WireError, match="not UTF-8"):
        decode_summary(raw)
    dup: dict[bytes | str, bytes | str] = dict(as_bytes(encode_summary(summary())))
    dup["epoch"] = "41"
    with pytest.raises(WireError, match="twice"):
        decode_summary(dup)
    with pytest.raises(WireError, match="mapping"):
        decode_summary([("v", "1")])  # type: ignore[arg-type]
    with pytest.raises(WireError, match="bytes or str"):
        decode_summary({"v": 1})  # type: ignore[dict-item]


def test_constructing_an_invalid_summary_fails_the_same_way() -> None:
    with pytest.raises(WireError) as err:
        summary(weights=(float("nan"), 0.5, 0.5))
    assert err.value.reason is Reason.MALFORMED
    with pytest.raises(WireError) as err:
        summary(version=2)
    assert err.value.reason is Reason.VERSION


# --------------------------------------------------------------------------- recommendations


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
    with pytest.raises(ValueError, match="no mesh key"):
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


def test_reasons_are_the_documented_metric_labels() -> None:
    stream_entries = {
        "malformed", "oversized", "version", "unsigned", "bad-signature", "wrong-upstream",
        "wrong-sidecar", "endpoint-mismatch", "stale", "fenced", "not-yet-valid", "expired",
    }
    headers = {"too-long", "out-of-range", "missing", "unsupported-version", "future"}
    bids = {"nan", "infinite", "negative", "too-large"}
    mesh_key = {"no-key", "weak-key", "unreadable"}
    assert {r.value for r in Reason} == stream_entries | headers | bids | mesh_key


# ------------------------------------------------------------------------------------ lease


def test_lease_value_round_trip_and_rejections() -> None:
    lease = Lease(holder="signaler-0", fence=12)
    assert encode_lease(lease) == "signaler-0 12"
    assert decode_lease(b"signaler-0 12") == lease
    for bad in ["signaler-0", "signaler-0 0", "signaler-0 -1", "a b c", " 3", b"\xff 1"]:
        with pytest.raises(WireError):
            decode_lease(bad)


# ---------------------------------------------------------------------------------- fuzzing

_text_or_bytes = st.one_of(st.text(max_size=40), st.binary(max_size=40))
_any_value = st.one_of(_text_or_bytes, st.integers(), st.none(), st.floats())


@settings(max_examples=120, deadline=None)
@given(st.dictionaries(_text_or_bytes, _any_value, max_size=20))
def test_decoders_only_raise_protocol_error_on_arbitrary_maps(entry: dict) -> None:
    with pytest.raises(WireError):
        decode_summary(entry)
    with pytest.raises(WireError):
        verify(entry)


_json_fragment = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda children: st.lists(children, max_size=5),
    max_leaves=20,
)
_field_value = st.one_of(
    st.text(max_size=60),
    _json_fragment.map(lambda v: json.dumps(v)),
    st.sampled_from(["nan", "-inf", "1e400", "-0.0", "", "[]", "[[]]", "null", "00", "1e-400"]),
)


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(SUMMARY_FIELDS),
    _field_value,
    st.sampled_from(SUMMARY_FIELDS),
    _field_value,
)
def test_mutated_summaries_decode_valid_or_raise_protocol_error(
    f1: str, v1: str, f2: str, v2: str
) -> None:
    fields = encode_summary(summary())
    fields[f1] = v1
    fields[f2] = v2
    try:
        s = decode_summary(fields)
    except WireError as exc:
        assert exc.reason in set(Reason)
    else:
        assert decode_summary(encode_summary(s)) == s  # whatever decodes is valid and stable


@settings(max_examples=120, deadline=None)
@given(st.sampled_from(RECOMMENDATION_FIELDS[:-1]), _field_value)
def test_mutated_signed_recommendations_verify_valid_or_raise(field: str, value: str) -> None:
    fields = encode_recommendation(recommendation())
    fields[field] = value
    try:
        rec = verify(resign(fields), now=NOW)
    except WireError as exc:
        assert exc.reason in set(Reason)
    else:
        assert verify(sign_recommendation(rec, KEY), now=NOW) == rec


@st.composite
def summaries(draw: st.DrawFn) -> RegretSummary:
    k = draw(st.integers(1, 8))
    endpoints = tuple(f"10.0.0.{i}:80" for i in range(k))
    requests = tuple(draw(st.lists(st.integers(0, 10**6), min_size=k, max_size=k)))
    failures = tuple(draw(st.integers(0, n)) for n in requests)
    seconds = st.floats(0.0, 60.0)
    p50 = [draw(seconds) if n else None for n in requests]
    p99 = [None if x is None else x + draw(seconds) for x in p50]
    mean = [draw(seconds) if n else None for n in requests]
    raw = np.array(draw(st.lists(st.floats(0.0, 1.0), min_size=k, max_size=k))) + 1e-3
    regret = draw(st.lists(st.lists(st.floats(-5.0, 5.0), min_size=k, max_size=k),
                           min_size=k, max_size=k))
    return RegretSummary(
        sidecar="sc-" + draw(st.text("abc123", min_size=1, max_size=8)),
        upstream="svc",
        epoch=draw(st.integers(0, 2**40)),
        sent_at=draw(st.floats(1.0, 4e9)),
        endpoints=endpoints,
        requests=requests,
        failures=failures,
        latency_mean=tuple(mean),
        latency_p50=tuple(p50),
        latency_p99=tuple(p99),
        in_flight=tuple(draw(st.lists(st.integers(0, 1000), min_size=k, max_size=k))),
        demand=draw(st.floats(0.0, 1e6)),
        weights=tuple(float(w) for w in raw / raw.sum()),
        regret=tuple(tuple(row) for row in regret),
    )


@settings(max_examples=60, deadline=None)
@given(summaries())
def test_every_valid_summary_round_trips(s: RegretSummary) -> None:
    assert decode_summary(as_bytes(encode_summary(s))) == s
