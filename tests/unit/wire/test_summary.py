"""wire.summary: round trips, every rejection, and fuzzed entries that decode or raise."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.wire_samples import (
    FIELD_VALUES,
    NOW,
    as_bytes,
    summary,
)
from wire.errors import Reason, WireError
from wire.summary import (
    SUMMARY_BODY_FIELDS,
    SUMMARY_FIELDS,
    RegretSummary,
    decode_summary,
    encode_summary,
)


def test_summary_round_trips_through_str_and_bytes_fields() -> None:
    s = summary()
    fields = encode_summary(s)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items())
    assert fields == {"v": "2", "type": "summary", "body": fields["body"]}
    body = json.loads(fields["body"])
    assert list(body) == list(SUMMARY_BODY_FIELDS)
    assert fields["body"] == json.dumps(body, separators=(",", ":"))  # compact, as it reads
    assert decode_summary(fields) == s
    assert decode_summary(as_bytes(fields)) == s


def test_a_version_1_summary_round_trips_field_per_value() -> None:
    s = summary(version=1)
    fields = encode_summary(s)
    assert fields["v"] == "1" and fields["type"] == "summary"
    assert set(fields) == set(SUMMARY_FIELDS)
    assert decode_summary(fields) == s
    assert decode_summary(as_bytes(fields)) == s
    assert repr(decode_summary(encode_summary(summary()))) == repr(s).replace(
        "version=1", "version=2")  # the same values in either encoding


def as_version_2(fields: dict[str, str]) -> dict[str, str]:
    """A version-1 field map (perhaps altered) carried as version 2: the values, as they
    stand, in one body (names quoted as JSON strings, the other texts as they are); ``v``
    and ``type`` and any field that is not a value stay fields of the entry."""
    out = {name: text for name, text in fields.items() if name not in SUMMARY_BODY_FIELDS}
    if out.get("v") == "1":
        out["v"] = "2"
    values = [f'"{name}":' + (json.dumps(fields[name]) if name in ("sidecar", "upstream")
                              else fields[name])
              for name in SUMMARY_BODY_FIELDS if name in fields]
    out["body"] = "{" + ",".join(values) + "}"
    return out


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
    ("future version", _set("v", "3"), Reason.VERSION),
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
    ("too many endpoints", _set("endpoints", json.dumps([f"e{i}:1" for i in range(65)],
                                                        separators=(",", ":"))),
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


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(
    ("mutate", "reason"),
    [(m, r) for _, m, r in SUMMARY_REJECTIONS],
    ids=[name for name, _, _ in SUMMARY_REJECTIONS],
)
def test_summary_rejections(mutate: Callable[[dict[str, str]], None], reason: Reason,
                            version: int) -> None:
    """Each bad value is refused, for the same reason, in either encoding (in version 2 the
    same text stands in the body)."""
    fields = encode_summary(summary(version=1))
    mutate(fields)
    if version == 2:
        fields = as_version_2(fields)
    with pytest.raises(WireError) as err:
        decode_summary(fields)
    assert err.value.reason is reason
    assert str(err.value).startswith(f"{reason.value}: ")


@pytest.mark.parametrize(("body", "message"), [
    ('{"sidecar":"a","sidecar":"b"}', "each of its 14 fields once"),
    (None, "compact JSON"),
    ("[1,2]", "each of its 14 fields once"),
    ("", "each of its 14 fields once"),
])
def test_a_version_2_body_is_compact_json_with_each_field_once(body: str | None,
                                                              message: str) -> None:
    fields = encode_summary(summary())
    text = fields["body"]
    if body is None:  # a key repeated behind whitespace would escape the count of keys
        body = text.replace('"demand"', ' "demand"')
    fields["body"] = body
    with pytest.raises(WireError, match=message):
        decode_summary(fields)
    repeated = text.replace(',"demand":', ',"epoch":7,"demand":')
    with pytest.raises(WireError, match="once"):
        decode_summary({**fields, "body": repeated})
    escaped = text.replace('"epoch":', '"\\u0065poch":')  # the same key spelt otherwise
    assert decode_summary({**fields, "body": escaped}) == summary()
    with pytest.raises(WireError, match="once"):
        decode_summary({**fields, "body": escaped.replace(',"demand":', ',"epoch":7,"demand":')})


def test_summary_rejects_non_utf8_duplicates_and_non_mappings() -> None:
    raw = as_bytes(encode_summary(summary(version=1)))
    raw[b"sidecar"] = b"\xff\xfe"
    with pytest.raises(WireError, match="not UTF-8"):
        decode_summary(raw)
    dup: dict[bytes | str, bytes | str] = dict(as_bytes(encode_summary(summary(version=1))))
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
    for version in (0, 3, True, "2"):
        with pytest.raises(WireError) as err:
            summary(version=version)
        assert err.value.reason is Reason.VERSION


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(SUMMARY_FIELDS),
    FIELD_VALUES,
    st.sampled_from(SUMMARY_FIELDS),
    FIELD_VALUES,
)
def test_mutated_summaries_decode_valid_or_raise_protocol_error(
    f1: str, v1: str, f2: str, v2: str
) -> None:
    """In either encoding, whatever decodes is a summary that :class:`RegretSummary`'s own
    checks accept unchanged, and that round-trips; anything else raises a WireError."""
    fields = encode_summary(summary(version=1))
    fields[f1] = v1
    fields[f2] = v2
    for entry in (fields, as_version_2(fields)):
        try:
            s = decode_summary(entry)
        except WireError as exc:
            assert exc.reason in set(Reason)
        else:
            assert decode_summary(encode_summary(s)) == s
            rebuilt = RegretSummary(**{name: getattr(s, name) for name in (
                *SUMMARY_BODY_FIELDS, "version")})
            assert repr(rebuilt) == repr(s)  # the checked constructor changes nothing


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
@given(summaries(), st.sampled_from([1, 2]))
def test_every_valid_summary_round_trips(s: RegretSummary, version: int) -> None:
    from dataclasses import replace

    s = replace(s, version=version)
    back = decode_summary(as_bytes(encode_summary(s)))
    assert back == s and repr(back) == repr(s)


# --- the signature and the clock skew (issue 14, finding 6) ----------------------------------

_KEY = b"unit-test-mesh-key-0123456789abcdef"
_ROTATED = b"next-mesh-key-0123456789abcdefghij"


def test_a_signed_summary_verifies_under_its_key_and_any_key_of_a_rotation() -> None:
    from wire.summary import sign_summary, verify_summary

    for s, names in ((summary(), {"v", "type", "body"}), (summary(version=1), SUMMARY_FIELDS)):
        fields = sign_summary(s, _KEY)
        assert set(fields) == {*names, "sig"} and len(fields["sig"]) == 43
        assert verify_summary(as_bytes(fields), _KEY, s.sent_at, max_age=5.0) == s
        assert verify_summary(fields, [_ROTATED, _KEY], s.sent_at, max_age=5.0) == s
        assert decode_summary(fields) == s  # decoding alone ignores the signature


@pytest.mark.parametrize(
    ("version", "change", "reason"),
    [
        (1, {"sig": None}, "unsigned"),
        (1, {"demand": "9999.0"}, "bad-signature"),
        (1, {"sidecar": "sc-evil"}, "bad-signature"),
        (1, {"sig": "A" * 43}, "bad-signature"),
        (1, {"sig": "A" * 44}, "bad-signature"),
        (1, {"v": "2"}, "malformed"),
        (2, {"sig": None}, "unsigned"),
        (2, {"body": encode_summary(summary(demand=9999.0))["body"]}, "bad-signature"),
        (2, {"sig": "A" * 43}, "bad-signature"),
        (2, {"sig": "A" * 44}, "bad-signature"),
        (2, {"v": "1"}, "malformed"),
    ],
)
def test_an_unsigned_or_altered_summary_is_refused(version: int, change: dict[str, str | None],
                                                   reason: str) -> None:
    from wire.summary import sign_summary, verify_summary

    s = summary(version=version)
    fields: dict[str, str] = dict(sign_summary(s, _KEY))
    for name, value in change.items():
        if value is None:
            del fields[name]
        else:
            fields[name] = value
    with pytest.raises(WireError) as caught:
        verify_summary(fields, _KEY, s.sent_at, max_age=5.0)
    assert caught.value.reason.value == reason


def test_a_recommendations_mac_never_verifies_a_summary() -> None:
    from wire.signing import mac
    from wire.summary import SUMMARY_SIGNATURE_CONTEXT, canonical_summary_bytes, verify_summary

    fields = encode_summary(summary(version=1))
    body = canonical_summary_bytes(fields)[len(SUMMARY_SIGNATURE_CONTEXT):]
    fields["sig"] = mac(_KEY, b"equilibrium/recommendation/v1\n" + body)
    with pytest.raises(WireError, match="does not verify"):
        verify_summary(fields, _KEY, summary().sent_at, max_age=5.0)
    fields = encode_summary(summary())
    for context in (SUMMARY_SIGNATURE_CONTEXT, b"equilibrium/recommendation/v1\n", b""):
        fields["sig"] = mac(_KEY, context + fields["body"].encode())  # not v2's own context
        with pytest.raises(WireError, match="does not verify"):
            verify_summary(fields, _KEY, summary().sent_at, max_age=5.0)


def test_the_clock_skew_is_bounded_both_ways() -> None:
    from wire.summary import sign_summary, verify_summary

    s = summary()
    fields = sign_summary(s, _KEY)
    assert verify_summary(sign_summary(summary(version=1), _KEY), _KEY, s.sent_at - 5.0,
                          max_age=10.0, max_skew=5.0) == summary(version=1)
    at = s.sent_at
    assert verify_summary(fields, _KEY, at - 5.0, max_age=10.0, max_skew=5.0) == s
    assert verify_summary(fields, _KEY, at + 10.0, max_age=10.0, max_skew=5.0) == s
    with pytest.raises(WireError) as ahead:
        verify_summary(fields, _KEY, at - 5.01, max_age=10.0, max_skew=5.0)
    assert ahead.value.reason.value == "not-yet-valid"
    with pytest.raises(WireError) as old:
        verify_summary(fields, _KEY, at + 10.01, max_age=10.0, max_skew=5.0)
    assert old.value.reason.value == "expired"


def test_the_fast_path_verifies_a_well_formed_summary_as_the_reference_does() -> None:
    from wire.signing import accepted_keys
    from wire.summary import _verify_fast, _verify_reference, sign_summary

    key = b"fast-path-key-0123456789abcdef"
    for changes in ({}, {"latency_mean": (None, 0.01, 0.2), "latency_p50": (None, 0.01, 0.1),
                         "latency_p99": (None, 0.02, 0.3), "requests": (0, 5, 5),
                         "failures": (0, 0, 1)}):
        base = _sample_for_fast_path(**changes)
        entry = {k.encode(): v.encode() for k, v in sign_summary(base, key).items()}
        fast = _verify_fast(entry, accepted_keys(key))
        assert fast is not None and fast == _verify_reference(entry, accepted_keys(key)) == base
        assert _verify_fast({**entry, b"demand": b"5.0"}, accepted_keys(key)) is None  # MAC


def _sample_for_fast_path(**changes: object) -> RegretSummary:
    from dataclasses import replace

    base = RegretSummary(
        version=1, sidecar="sc-1", upstream="orders", epoch=3, sent_at=1_764_000_000.5,
        endpoints=("a:1", "b:2", "c:3"), requests=(4, 5, 6), failures=(0, 1, 0),
        latency_mean=(0.01, 0.02, 0.03), latency_p50=(0.01, 0.02, 0.03),
        latency_p99=(0.02, 0.03, 0.04), in_flight=(0, 1, 2), demand=12.5,
        weights=(0.2, 0.3, 0.5), regret=((0.0, 0.1, -0.1), (0.0, 0.0, 0.0), (0.2, 0.0, 0.0)))
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(("field", "text"), [
    ("requests", " [4,5,6] "), ("requests", "[4, 5, 6]"), ("requests", "[4,5,6.0]"),
    ("requests", "[4,5,true]"), ("requests", "[04,5,6]"), ("requests", "[4,5,-0]"),
    ("requests", "[4,5,1e1]"), ("requests", "[4,5,1000000000001]"), ("requests", "[4,5]"),
    ("latency_mean", "[0.01,0.02,3]"), ("latency_mean", "[0.01,0.02,1e400]"),
    ("latency_mean", "[0.01,0.02,-0.0]"), ("latency_mean", "[0.01,0.02,NaN]"),
    ("latency_mean", "[0.01,0.02,Infinity]"), ("latency_mean", "[0.01,null,0.03]"),
    ("latency_mean", "[0.01,0.02,0.03000000000000000166533453693773481063544750213623046875]"),
    ("latency_mean", "[0.01,0.02,\"0.03\"]"), ("latency_mean", "[0.01,0.02,0.03,]"),
    ("latency_p50", "[0.01,0.02,0.05]"), ("weights", "[0.2,0.3,0.5000000001]"),
    ("weights", "[-0.0,0.5,0.5]"), ("weights", "[-1e-10,0.5,0.5]"), ("weights", "[0,0,1]"),
    ("weights", "[0.2,0.3,0.6]"), ("regret", "[[0,1,-1],[0,0,0],[0.2,0,0]]"),
    ("regret", "[[0.0,0.1],[0.0,0.0,0.0],[0.2,0.0,0.0]]"), ("regret", "[[],[],[]]"),
    ("regret", "[[0.0,0.1,-0.1],[0.0,0.0,0.0],[0.2,0.0,3601]]"), ("in_flight", "[0,1,-2]"),
    ("failures", "[0,6,0]"),
])
def test_the_fast_path_reads_a_number_as_the_reference_does(field: str, text: str) -> None:
    """Texts where a decoder written in C (msgspec) and Python's json might part ways:
    whitespace, ints for floats and floats for ints, -0, out-of-range and non-finite numbers,
    a float whose digits go past a double. The fast path returns what the reference path
    returns, or leaves the entry to it (None); it never accepts what the reference refuses."""
    from wire.signing import accepted_keys, mac
    from wire.summary import _verify_fast, _verify_reference, _verify_v2, canonical_summary_bytes

    key = b"fast-path-key-0123456789abcdef"
    fields = encode_summary(_sample_for_fast_path())
    fields[field] = text
    fields["sig"] = mac(key, canonical_summary_bytes(fields))
    entry = {k.encode(): v.encode() for k, v in fields.items()}
    keys = accepted_keys(key)
    try:
        reference: RegretSummary | None = _verify_reference(entry, keys)
    except WireError:
        reference = None
    fast = _verify_fast(entry, keys)
    assert fast is None or fast == reference
    if fast is not None:  # equal field for field, -0.0 and types included
        assert repr(fast) == repr(reference)
    # version 2, the same text in the body: it never accepts what version 1's reference
    # refuses, and reads what both accept as the same values (whitespace is refused there)
    body = as_version_2({k: v for k, v in fields.items() if k != "sig"})
    body["sig"] = mac(key, canonical_summary_bytes(body))
    try:
        second: RegretSummary | None = _verify_v2(body, keys)
    except WireError:
        second = None
    if second is not None:
        assert reference is not None
        assert repr(second) == repr(reference).replace("version=1", "version=2")
    elif " " not in text and reference is not None:
        raise AssertionError(f"version 2 refused what version 1 reads: {text}")


def test_a_summary_signed_as_the_protocol_page_says_verifies() -> None:
    """docs/protocol.md ("Summary signature"), followed by hand: HMAC-SHA256 of the context line
    and the body as it travels, unpadded base64url. The body is written by hand too."""
    import base64
    import hashlib
    import hmac

    from wire.summary import verify_summary

    body = ('{"sidecar":"checkout-7f9c-1","upstream":"orders","epoch":1764183600,'
            '"sent_at":1764183600.25,"endpoints":["10.0.0.7:8080","10.0.0.8:8080"],'
            '"requests":[120,3],"failures":[2,3],"latency_mean":[0.0123,0.51],'
            '"latency_p50":[0.011,0.5],"latency_p99":[0.031,0.62],"in_flight":[4,1],'
            '"demand":41.5,"weights":[0.9,0.1],"regret":[[0.0,-0.49],[0.49,0.0]]}')
    digest = hmac.new(_KEY, b"equilibrium/summary/v2\n" + body.encode(), hashlib.sha256).digest()
    sig = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    got = verify_summary({"v": "2", "type": "summary", "body": body, "sig": sig}, _KEY,
                         1764183601.0, max_age=5.0)
    assert got.endpoints == ("10.0.0.7:8080", "10.0.0.8:8080")
    assert got.regret == ((0.0, -0.49), (0.49, 0.0)) and got.demand == 41.5
    assert got.version == 2
