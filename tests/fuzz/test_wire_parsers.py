"""Every parser of ``wire/`` against hostile text: a value or a ``WireError``, nothing else.

For each format the property is the contract the proxies rely on: whatever arrives, the
parser returns a well-formed value (numbers finite and in range) or raises
:class:`wire.errors.WireError` with a reason the metrics can count; it never raises anything
else (a ``ValueError`` from ``int('²')`` or a ``RecursionError`` would be a 500 or a dead
reader). Entries (summaries, recommendations) start from valid ones with one field replaced,
so most examples get past the first check; recommendations are re-signed after the change,
so the value decoders behind the MAC are reached too.
"""

from __future__ import annotations

import math

from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz.budget import fuzz
from tests.fuzz.strategies import field_lists, header_values, numbers
from tests.wire_samples import KEY, NOW, recommendation, summary
from wire.bid import parse_bid
from wire.demand import Demand, sign_demand, verify_demand
from wire.errors import Reason, WireError
from wire.grpc_status import decode_message, parse_timeout, status_of
from wire.headers import (
    parse_congestion,
    parse_congestion_signal,
    parse_fields,
    parse_retry,
)
from wire.identity import BoundRequest, new_nonce, sign_identity, verify_identity
from wire.lease import decode_lease
from wire.numerals import ascii_decimal, ascii_uint
from wire.probe import parse_request as parse_probe_request
from wire.recommendation import (
    RECOMMENDATION_FIELDS,
    canonical_recommendation_bytes,
    sign_recommendation,
    verify_recommendation,
)
from wire.signing import accepted_keys, mac
from wire.standing import parse_standing
from wire.summary import (
    SUMMARY_BODY_FIELDS,
    SUMMARY_FIELDS,
    RegretSummary,
    _verify_fast,
    _verify_reference,
    canonical_summary_bytes,
    decode_summary,
    encode_summary,
    verify_summary,
)

REASONS = set(Reason)


def rejected(exc: WireError) -> None:
    """A rejection must say why in the metrics' terms."""
    assert exc.reason in REASONS, exc
    assert str(exc)


@fuzz
@given(header_values())
def test_bid(value: str) -> None:
    try:
        bid = parse_bid(value)
    except WireError as exc:
        rejected(exc)
    else:
        assert math.isfinite(bid) and bid >= 0


@fuzz
@given(st.one_of(field_lists(), header_values()))
def test_header_fields(value: str) -> None:
    try:
        fields = parse_fields("X-GT-Test", value)
    except WireError as exc:
        rejected(exc)
    else:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items())


@fuzz
@given(st.one_of(field_lists(), header_values()))
def test_probe_congestion_and_retry(value: str) -> None:
    for parse in (parse_probe_request, parse_congestion_signal):
        try:
            parse(value)
        except WireError as exc:
            rejected(exc)
    try:
        level = parse_congestion(value)
    except WireError as exc:
        rejected(exc)
    else:
        assert math.isfinite(level)
    try:
        retry = parse_retry(value)
    except WireError as exc:
        rejected(exc)
    else:
        assert retry >= 0


@fuzz
@given(st.one_of(field_lists(), header_values()))
def test_standing(value: str) -> None:
    try:
        standing = parse_standing(value)
    except WireError as exc:
        rejected(exc)
    else:
        assert math.isfinite(standing.score) and standing.level >= 0
        assert standing.retry_after is None or (
            math.isfinite(standing.retry_after) and standing.retry_after >= 0)


BOUND = BoundRequest("GET", "svc", "/orders?id=7")
NONCE = new_nonce(bytes(range(12)))


def _signed_identity() -> str:
    return sign_identity("checkout-1", KEY, NOW, BOUND, NONCE)


@fuzz
@given(st.one_of(field_lists(), header_values(),
                 st.builds(lambda caller, tail: _signed_identity() + tail
                           if caller else tail, st.booleans(), header_values())))
@example(_signed_identity() + "\r")  # found by `make fuzz`: str.strip() took the CR off
@example(_signed_identity() + "\x0b")
def test_identity(value: str) -> None:
    verdict = verify_identity(value, KEY, NOW, 30.0, BOUND)
    if verdict.trusted:
        # only a value this key signed can be trusted: a valid one with nothing appended
        # but optional whitespace (SP, HTAB), which is not part of a field value
        assert value.strip(" \t") == _signed_identity()
    else:
        assert verdict.caller == "anonymous"


def _signed_demand() -> str:
    signed = sign_demand(83.333, 3, KEY, NONCE)
    assert signed is not None
    return signed


@fuzz
@given(st.one_of(field_lists(), header_values(),
                 st.builds(lambda signed, tail: _signed_demand() + tail if signed else tail,
                           st.booleans(), header_values())))
@example(_signed_demand() + "\r")
def test_demand(value: str) -> None:
    checked = verify_demand(value, KEY, NONCE)
    if isinstance(checked, Demand):  # only what this key signed for this nonce, as signed
        assert value.strip(" \t") == _signed_demand()
        assert checked == Demand(83.333, 3)
    else:
        assert checked.reason in REASONS and checked.detail


@fuzz
@given(st.one_of(st.binary(max_size=40), st.text(max_size=40), numbers()))
def test_lease(value: bytes | str) -> None:
    try:
        lease = decode_lease(value)
    except WireError as exc:
        rejected(exc)
    else:
        assert lease.fence >= 0


@fuzz
@given(st.binary(max_size=40))
def test_grpc_timeout_status_and_message(value: bytes) -> None:
    timeout = parse_timeout(value)
    assert timeout is None or (math.isfinite(timeout) and timeout >= 0)
    status = status_of([(b"grpc-status", value)])
    assert status is None or 0 <= status <= 999
    assert isinstance(decode_message(value), str)


@fuzz
@given(st.one_of(numbers(), st.text(max_size=30)))
def test_ascii_numerals(value: str) -> None:
    uint = ascii_uint(value)
    assert uint is None or (uint >= 0 and value.isascii())
    decimal = ascii_decimal(value)
    assert decimal is None or (math.isfinite(decimal) and value.isascii())


def mutated(fields: dict[str, str], names: tuple[str, ...]) -> st.SearchStrategy[dict]:
    """``fields`` with one value replaced, one field dropped or one added; keys as str or
    bytes, values as str, bytes or junk bytes."""
    def change(how: str, name: str, value: str, raw: bytes, as_bytes: bool) -> dict:
        out: dict = dict(fields)
        if how == "replace":
            out[name] = value
        elif how == "drop":
            out.pop(name, None)
        elif how == "add":
            out[value[:20] or "extra"] = value
        elif how == "raw":
            out[name] = raw
        if as_bytes:
            out = {k.encode() if isinstance(k, str) else k:
                   v.encode("utf-8", "surrogatepass") if isinstance(v, str) else v
                   for k, v in out.items()}
        return out

    return st.builds(
        change, st.sampled_from(["replace", "replace", "drop", "add", "raw"]),
        st.sampled_from(names),
        st.one_of(numbers(), header_values(), st.sampled_from(
            ["[]", "[1,2]", "[[1]]", "[null]", "{}", "[1e999]", "[" * 200, "[NaN]", '["a"]',
             "[-1]", "[1, 2, 3]", "[[0,0,0],[0,0,0]]"])),
        st.binary(max_size=20), st.booleans(),
    )


@fuzz
@given(st.one_of(mutated(encode_summary(summary(version=1)), SUMMARY_FIELDS),
                 mutated(encode_summary(summary()), ("v", "type", "body", "sig"))))
def test_summary_entries(entry: dict) -> None:
    try:
        decoded = decode_summary(entry)
    except WireError as exc:
        rejected(exc)
    else:
        k = len(decoded.endpoints)
        assert len(decoded.requests) == len(decoded.weights) == k
        assert math.isfinite(decoded.demand) and decoded.demand >= 0


def resigned(entry: dict) -> dict:
    """Sign ``entry`` anew over whatever it now holds (when its fields are text)."""
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in entry.items()):
        return entry
    unsigned = {k: v for k, v in entry.items() if k != "sig"}
    try:
        signed = mac(KEY, canonical_recommendation_bytes(unsigned))
    except Exception:
        return entry
    return {**unsigned, "sig": signed}


@fuzz
@given(mutated(sign_recommendation(recommendation(), KEY), RECOMMENDATION_FIELDS),
       st.booleans())
def test_recommendation_entries(entry: dict, resign: bool) -> None:
    if resign:
        entry = resigned(entry)
    rec = recommendation()
    try:
        decoded = verify_recommendation(entry, KEY, NOW, rec.upstream, rec.sidecar)
    except WireError as exc:
        rejected(exc)
    else:
        assert math.isclose(sum(decoded.weights), 1.0, rel_tol=1e-6)
        assert all(math.isfinite(w) and w >= 0 for w in decoded.weights)


PROBE_NONCE = "n0nce-for-the-fuzzer-0123"


@fuzz
@given(st.lists(st.tuples(st.sampled_from(
    ["inflight", "mean", "p50", "p90", "n", "cong", "limit", "drain", "nonce", "x"]),
    st.one_of(numbers(), header_values())), max_size=4), st.booleans(),
    st.sampled_from(["v=1", "v=2", "", "v=1;"]))
def test_probe_answers(changes: list[tuple[str, str]], resign: bool, version: str) -> None:
    """A real signed answer with fields replaced (and re-signed, so the value checks behind
    the MAC are reached): a verified report with values in range, or a WireError."""
    from mesh.probes import ProbeReport
    from wire import probe

    answer = probe.format_answer(KEY, PROBE_NONCE, ProbeReport(3, 0.01, 0.009, 0.02, 40, 0.2,
                                                               16, False))
    body = answer.rpartition(";sig=")[0]
    fields = dict(part.split("=", 1) for part in body.split(";")[1:])
    for name, value in changes:
        fields[name] = value
    body = ";".join([version, *(f"{k}={v}" for k, v in fields.items())])
    try:
        signed = mac(KEY, probe._DOMAIN + body.encode("ascii")) if resign else "x" * 43
    except UnicodeEncodeError:
        signed = "x" * 43
    try:
        report = probe.parse_answer(f"{body};sig={signed}", KEY, PROBE_NONCE)
    except WireError as exc:
        rejected(exc)
    else:
        assert report.in_flight >= 0 and report.samples >= 0 and report.limit >= 0
        assert all(math.isfinite(x) and x >= 0 for x in (report.mean, report.p50, report.p90))
        assert 0.0 <= report.congestion <= 1.0


def resigned_summary(entry: dict) -> dict:
    """A mutated summary entry signed anew over whatever it now holds, as bytes (what redis-py
    returns), when its fields are text."""
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in entry.items()):
        return entry
    unsigned = {k: v for k, v in entry.items() if k != "sig"}
    try:
        unsigned["sig"] = mac(KEY, canonical_summary_bytes(unsigned))
    except Exception:
        return entry
    return {k.encode(): v.encode() for k, v in unsigned.items()}


@fuzz
@given(mutated(encode_summary(summary(version=1)), SUMMARY_FIELDS))
def test_the_fast_summary_path_accepts_only_what_the_reference_accepts(entry: dict) -> None:
    """``verify_summary``'s fast path: None (the reference path decides), or exactly what the
    reference path returns for the same entry."""
    entry = resigned_summary(entry)
    keys = accepted_keys(KEY)
    fast = _verify_fast(entry, keys)
    if fast is None:
        return
    assert fast == _verify_reference(entry, keys)


def body_edits() -> st.SearchStrategy[str]:
    """A version-2 body with one stretch of its text replaced: a value by another value, a
    key by another key, or any characters by junk."""
    text = encode_summary(summary())["body"]

    def edit(start: int, length: int, new: str) -> str:
        start %= len(text)
        return text[:start] + new + text[start + length:]

    return st.builds(
        edit, st.integers(0, len(text)), st.integers(0, 12),
        st.one_of(numbers(), st.sampled_from(
            ['"epoch":', '"sidecar":"x",', ",", "[", "]", "null", "-0", "1e400", "[]", '"',
             "\\u0065", " ", '"regret":[],', "{}", "0.0,", "true"]),
            st.text(max_size=8)))


@fuzz
@given(body_edits())
def test_version_2_bodies_verify_valid_or_raise(body: str) -> None:
    """A body altered anywhere and signed anew: verified into a summary that the checked
    constructor accepts unchanged and that round-trips, or refused with a WireError."""
    fields = {"v": "2", "type": "summary", "body": body}
    fields["sig"] = mac(KEY, canonical_summary_bytes(fields))
    try:
        got = verify_summary({k.encode(): v.encode() for k, v in fields.items()}, KEY, NOW,
                             max_age=10.0)
    except WireError as exc:
        rejected(exc)
    else:
        again = RegretSummary(**{name: getattr(got, name) for name in (
            *SUMMARY_BODY_FIELDS, "version")})
        assert repr(again) == repr(got)
        assert decode_summary(encode_summary(got)) == got
