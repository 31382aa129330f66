"""The regret summary: what a sidecar appends to ``eq:{u}:summaries`` every epoch.

Owns :class:`RegretSummary` (constructing one validates it), its stream-entry codec
(:func:`encode_summary` / :func:`decode_summary`), the canonical bytes its HMAC covers, and
its signing and verification (:func:`sign_summary` / :func:`verify_summary`: the mesh key,
then a clock skew bounded both ways), documented in docs/protocol.md ("Regret summary",
"Summary signature").

Two encodings (field ``v``): version 2, what sidecars write, carries the values as one compact
JSON object (``body``) signed as it travels, decoded and range-checked in one call of a typed
msgspec decoder; version 1, still read (and written on request) for sidecars not yet
upgraded, carries each value in a field of its own. A signaler reads and verifies one summary
per sidecar per epoch, the largest part of its CPU with 1,000 sidecars publishing; in one body
that costs about a quarter less (docs/benchmarks.md, "summaries in one body").

Pure: no Redis client, no clock (``now`` is passed in); the decoder and the verifier raise
only :class:`~wire.errors.WireError`, whatever the input.

Why signed: anyone who can append to a summary stream (any Redis client of the mesh) could
otherwise invent sidecars and steer every token of the plan; a summary stamped far in the
future would also never go stale, even across a signaler restart. A verified summary was made
by a holder of the mesh key and ``sent_at`` lies within ``[now - max_age, now + max_skew]``.

The regret matrix is Hart & Mas-Colell's conditional regret D(j, k) (Econometrica 2000, "A
simple adaptive procedure leading to correlated equilibrium") of the sidecar, in seconds; its
positive part is the sidecar's violation of the correlated-equilibrium constraints at its
empirical play, which is why the signaler can read the CE gap from the summaries.
"""

from __future__ import annotations

import functools
import hmac
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated

import msgspec
from msgspec import Meta

from wire.entries import (
    FLOAT_RE,
    INT_RE,
    MAX_COUNT,
    MAX_ENTRY_BYTES,
    MAX_EPOCH,
    MAX_FIELD_BYTES,
    MAX_RATE,
    MAX_SECONDS,
    MAX_TIMESTAMP,
    NAME_RE,
    WEIGHT_ROUNDING,
    WEIGHT_SUM_TOLERANCE,
    check_endpoints,
    check_float,
    check_floats,
    check_int,
    check_ints,
    check_name,
    check_timestamp,
    check_vector,
    check_weights,
    compact_json,
    fail,
    json_exact,
    json_list,
    number_text,
    parse_float,
    parse_int,
    short,
    text_fields,
    unexpected,
)
from wire.errors import Reason, WireError
from wire.signing import SIGNATURE_RE, accepted_keys, mac, mac_bytes, verify_mac

__all__ = [
    "DEFAULT_SUMMARY_SKEW",
    "SIGNED_SUMMARY_FIELDS",
    "SUMMARY_BODY_FIELDS",
    "SUMMARY_FIELDS",
    "SUMMARY_VERSION",
    "SUMMARY_VERSIONS",
    "RegretSummary",
    "canonical_summary_bytes",
    "decode_summary",
    "encode_summary",
    "sign_summary",
    "verify_summary",
]

SUMMARY_VERSION = 2
"""The encoding sidecars write: the values in one signed JSON object (field ``body``)."""
SUMMARY_VERSIONS = (1, 2)
"""The encodings a signaler reads (1: a field per value, before the one-body encoding)."""
SUMMARY_BODY_FIELDS = (
    "sidecar", "upstream", "epoch", "sent_at", "endpoints", "requests", "failures",
    "latency_mean", "latency_p50", "latency_p99", "in_flight", "demand", "weights", "regret",
)
"""The values of a summary, in the order of a version-2 body (and of version 1's fields)."""
SUMMARY_FIELDS = ("v", "type", *SUMMARY_BODY_FIELDS)
"""Every field of a version-1 summary entry that the signature covers, in canonical order."""
SIGNED_SUMMARY_FIELDS = (*SUMMARY_FIELDS, "sig")
"""All fields of a version-1 summary entry (``sig`` last)."""
SUMMARY_V2_FIELDS = ("v", "type", "body")
SIGNED_SUMMARY_V2_FIELDS = (*SUMMARY_V2_FIELDS, "sig")
"""All fields of a version-2 summary entry as sidecars append it (``sig`` last)."""
SUMMARY_SIGNATURE_CONTEXT = b"equilibrium/summary/v1\n"
"""First line of the signed bytes: no other signed value (a recommendation, an identity)
verifies as a summary, nor a summary as one of them."""
SUMMARY_V2_SIGNATURE_CONTEXT = b"equilibrium/summary/v2\n"
"""First line of a version-2 summary's signed bytes (then the body, as it travels)."""
DEFAULT_SUMMARY_SKEW = 5.0
"""How far (seconds) a summary's ``sent_at`` may lie ahead of the reader's clock."""


@dataclass(frozen=True, slots=True)
class RegretSummary:
    """One sidecar's report on one upstream for one epoch (constructing it validates it).

    Per-endpoint sequences are aligned with ``endpoints``. Latencies are seconds from sending a
    request to its response head (or failure) over the epoch, ``None`` where the endpoint got no
    request this epoch. ``demand`` is the sidecar's request rate to the upstream (requests/s).
    ``weights`` is the routing distribution it is using (sums to 1). ``regret[j][k]`` is the
    conditional regret D(j, k) in seconds (Hart & Mas-Colell 2000): how much faster, on
    average over the requests sent to j, k would have answered.
    """

    sidecar: str
    upstream: str
    epoch: int
    sent_at: float
    endpoints: tuple[str, ...]
    requests: tuple[int, ...]
    failures: tuple[int, ...]
    latency_mean: tuple[float | None, ...]
    latency_p50: tuple[float | None, ...]
    latency_p99: tuple[float | None, ...]
    in_flight: tuple[int, ...]
    demand: float
    weights: tuple[float, ...]
    regret: tuple[tuple[float, ...], ...]
    version: int = SUMMARY_VERSION
    """The encoding it was read in or is to be written in (:data:`SUMMARY_VERSIONS`)."""

    def __post_init__(self) -> None:
        if type(self.version) is not int or self.version not in SUMMARY_VERSIONS:
            raise fail(f"summary version {short(self.version, 20)}, expected 1 or 2",
                       Reason.VERSION)
        check_name(self.sidecar, "sidecar")
        check_name(self.upstream, "upstream")
        set_ = object.__setattr__
        set_(self, "epoch", check_int(self.epoch, "epoch", 0, MAX_EPOCH))
        set_(self, "sent_at", check_timestamp(self.sent_at, "sent_at"))
        endpoints = check_endpoints(self.endpoints)
        k = len(endpoints)
        set_(self, "endpoints", endpoints)
        # the vector checks build an error message only for a value they refuse: a signaler
        # verifies a summary per sidecar per epoch (1,000 a second with 1,000 sidecars)
        requests = check_ints(self.requests, "requests", k)
        failures = check_ints(self.failures, "failures", k)
        for i, (n, f) in enumerate(zip(requests, failures, strict=True)):
            if f > n:
                raise fail(f"failures[{i}]={f} exceeds requests[{i}]={n}")
        set_(self, "requests", requests)
        set_(self, "failures", failures)
        stats: dict[str, tuple[float | None, ...]] = {}
        for name in ("latency_mean", "latency_p50", "latency_p99"):
            vector = check_vector(getattr(self, name), name, k)
            if all(type(x) is float and 0.0 <= x <= MAX_SECONDS for x in vector):
                stats[name] = vector  # the common case: every endpoint measured
            else:
                column: list[float | None] = []
                for i, x in enumerate(vector):
                    if x is None:
                        if requests[i] > 0:
                            raise fail(f"{name}[{i}] is missing although requests[{i}] > 0")
                        column.append(None)
                    else:
                        column.append(check_float(x, f"{name}[{i}]", 0.0, MAX_SECONDS))
                stats[name] = tuple(column)
            set_(self, name, stats[name])
        for i, (p50, p99) in enumerate(
            zip(stats["latency_p50"], stats["latency_p99"], strict=True)
        ):
            if p50 is not None and p99 is not None and p50 > p99 * (1 + 1e-9) + 1e-12:
                raise fail(f"latency_p50[{i}]={p50!r} exceeds latency_p99[{i}]={p99!r}")
        set_(self, "in_flight", check_ints(self.in_flight, "in_flight", k))
        set_(self, "demand", check_float(self.demand, "demand", 0.0, MAX_RATE))
        set_(self, "weights", check_weights(self.weights, k))
        rows = check_vector(self.regret, "regret", k)
        set_(self, "regret", tuple(
            check_floats(row, f"regret[{j}]", k, -MAX_SECONDS, MAX_SECONDS)
            for j, row in enumerate(rows)))


def encode_summary(summary: RegretSummary) -> dict[str, str]:
    """The XADD fields of ``summary`` in its encoding (``summary.version``): version 2, the
    values as one compact JSON object in ``body``; version 1, a field per value (vectors as
    compact JSON arrays)."""
    if summary.version == 2:
        return {"v": "2", "type": "summary", "body": summary_body(summary)}
    return {
        "v": "1",
        "type": "summary",
        "sidecar": summary.sidecar,
        "upstream": summary.upstream,
        "epoch": str(summary.epoch),
        "sent_at": number_text(summary.sent_at),
        "endpoints": compact_json(list(summary.endpoints)),
        "requests": compact_json(list(summary.requests)),
        "failures": compact_json(list(summary.failures)),
        "latency_mean": compact_json(list(summary.latency_mean)),
        "latency_p50": compact_json(list(summary.latency_p50)),
        "latency_p99": compact_json(list(summary.latency_p99)),
        "in_flight": compact_json(list(summary.in_flight)),
        "demand": number_text(summary.demand),
        "weights": compact_json(list(summary.weights)),
        "regret": compact_json([list(row) for row in summary.regret]),
    }


def summary_body(summary: RegretSummary) -> str:
    """The version-2 ``body`` of ``summary``: a compact JSON object of the values, in the
    order of :data:`SUMMARY_BODY_FIELDS` (floats as the shortest text that reads back)."""
    return compact_json({name: getattr(summary, name) for name in SUMMARY_BODY_FIELDS})


def canonical_summary_bytes(fields_: Mapping[str, str]) -> bytes:
    """What a summary's signature covers. Version 2 (``v`` is ``2``): the context line, then
    the body as it travels. Version 1: the context line, then ``name=<len>:<value>\\n`` for
    each field of :data:`SUMMARY_FIELDS` in that order, with the exact strings that travel
    (length-prefixed in UTF-8 bytes: no two entries share an encoding, no float is
    re-formatted)."""
    if fields_.get("v") == "2":
        return SUMMARY_V2_SIGNATURE_CONTEXT + fields_["body"].encode("utf-8")
    parts = [SUMMARY_SIGNATURE_CONTEXT]
    for name in SUMMARY_FIELDS:
        value = fields_[name].encode("utf-8")
        parts.append(b"%s=%d:%s\n" % (name.encode("ascii"), len(value), value))
    return b"".join(parts)


def sign_summary(summary: RegretSummary, key: bytes | Sequence[bytes]) -> dict[str, str]:
    """The XADD fields of ``summary`` with ``sig``, the HMAC-SHA256 under the mesh key (with
    several keys, a rotation, the first signs). Raises :class:`WireError` for a short key."""
    signing_key = accepted_keys(key)[0]
    out = encode_summary(summary)
    out["sig"] = mac(signing_key, canonical_summary_bytes(out))
    return out


def decode_summary(entry: Mapping[bytes | str, bytes | str]) -> RegretSummary:
    """Parse and validate a summary entry as read from the stream, signed or not, WITHOUT
    checking its signature or age (use :func:`verify_summary` for anything acted upon);
    raises :class:`WireError`."""
    try:
        if _is_version_2(entry):
            return _body_summary(_v2_parts(entry)[0])
        return _decode(text_fields(entry, SIGNED_SUMMARY_FIELDS, "summary", SUMMARY_VERSIONS))
    except WireError:
        raise
    except Exception as exc:  # a decoder never lets anything else escape
        raise unexpected(exc) from exc


def verify_summary(
    entry: Mapping[bytes | str, bytes | str],
    key: bytes | Sequence[bytes],
    now: float,
    *,
    max_age: float,
    max_skew: float = DEFAULT_SUMMARY_SKEW,
) -> RegretSummary:
    """Check a summary entry and return it, or raise :class:`WireError`.

    Order of the checks (the first failure is the reason): sizes (``oversized``), field set
    and version (``malformed``/``version``), presence of ``sig`` (``unsigned``), the MAC in
    constant time against each accepted key (``bad-signature``), the values (``malformed``),
    then ``not-yet-valid`` (``sent_at`` more than ``max_skew`` s after ``now``) and
    ``expired`` (``sent_at`` more than ``max_age`` s before ``now``). Values are interpreted
    only after the MAC verified.

    A version-2 entry goes through :func:`_verify_v2` (one path: the body's types and ranges
    are checked by one msgspec call, whose message names the first offending value). A
    well-formed version-1 entry as a sidecar writes it (a ``dict`` of the 17 fields in
    ``bytes``, as redis-py returns it) goes through :func:`_verify_fast`: the same checks on
    the raw bytes, about a fifth of the cost. Anything it does not accept goes through the
    reference path (:func:`_verify_reference`), which names the reason; a property test holds
    the two equal.
    """
    keys = accepted_keys(key)
    if _is_version_2(entry):
        summary = _verify_v2(entry, keys)
    else:
        summary = _verify_fast(entry, keys) or _verify_reference(entry, keys)
    if summary.sent_at > now + max_skew:
        raise fail(f"sent {summary.sent_at - now:.3f}s in the future (skew {max_skew:g}s)",
                   Reason.NOT_YET_VALID)
    if now - summary.sent_at > max_age:
        raise fail(f"sent {now - summary.sent_at:.3f}s ago (at most {max_age:g}s)",
                   Reason.EXPIRED)
    return summary


def _verify_reference(entry: object, keys: Sequence[bytes]) -> RegretSummary:
    """The MAC and the values of ``entry`` checked field by field (every rejection with its
    reason), without the age checks."""
    try:
        raw = text_fields(entry, SIGNED_SUMMARY_FIELDS, "summary", SUMMARY_VERSIONS)
        if raw.get("sig", "") == "":
            raise fail("summary carries no signature", Reason.UNSIGNED)
        if not SIGNATURE_RE.fullmatch(raw["sig"]):
            raise fail("signature is not 43 base64url characters", Reason.BAD_SIGNATURE)
        if not verify_mac(keys, canonical_summary_bytes(raw), raw["sig"]):
            raise fail("signature does not verify under the mesh key", Reason.BAD_SIGNATURE)
        return _decode(raw)
    except WireError:
        raise
    except Exception as exc:  # a verifier never lets anything else escape
        raise unexpected(exc) from exc


# ---------------------------------------------------------------------------- the fast path

_BYTE_NAMES = tuple(name.encode("ascii") for name in SIGNED_SUMMARY_FIELDS)
_FIELDS_OF = operator.itemgetter(*_BYTE_NAMES)
_NAMES_LENGTH = sum(len(name) for name in _BYTE_NAMES)
_CANONICAL = SUMMARY_SIGNATURE_CONTEXT + b"".join(
    name.encode("ascii") + b"=%d:%s\n" for name in SUMMARY_FIELDS)
"""canonical_summary_bytes as one format: the length and the value of each field in turn."""
_BYTES = {bytes}
_NEW = object.__new__
_SET = object.__setattr__


@functools.lru_cache(maxsize=4096)
def _endpoint_list(text_: str) -> tuple[str, ...] | None:
    """The endpoint ids of a summary's ``endpoints`` text, or None to take the reference path
    (a sidecar sends the same list epoch after epoch: it is checked once)."""
    try:
        value = json_exact(text_)
        if type(value) is not list:
            return None
        return check_endpoints(value)
    except Exception:
        return None


# The numeric fields decoded and range-checked in C by msgspec (JSON as the reference path's
# decoder reads it: whitespace around values allowed, no NaN or infinity, no bool for a number,
# ints read as floats where a float is expected); the lengths and the relations between fields
# are checked in Python below. msgspec refuses some texts the reference accepts (a float too
# large for a double, which the reference then refuses by its range): None, the reference path.
_Count = Annotated[int, Meta(ge=0, le=MAX_COUNT)]
_Seconds = Annotated[float, Meta(ge=0.0, le=MAX_SECONDS)]
_Share = Annotated[float, Meta(ge=-WEIGHT_ROUNDING, le=1.0 + WEIGHT_SUM_TOLERANCE)]
_Regret = Annotated[float, Meta(ge=-MAX_SECONDS, le=MAX_SECONDS)]
_COUNTS = msgspec.json.Decoder(tuple[_Count, ...])
_LATENCIES = msgspec.json.Decoder(tuple[_Seconds | None, ...])
_WEIGHTS = msgspec.json.Decoder(tuple[_Share, ...])
_REGRET = msgspec.json.Decoder(tuple[tuple[_Regret, ...], ...])


def _holds_relations(
    k: int, requests: tuple[int, ...], failures: tuple[int, ...], in_flight: tuple[int, ...],
    mean: tuple[float | None, ...], p50: tuple[float | None, ...],
    p99: tuple[float | None, ...], weights: tuple[float, ...],
    regret: tuple[tuple[float, ...], ...],
) -> bool:
    """Whether values already of their types and ranges (a msgspec decoder's) also hold what
    :class:`RegretSummary` checks between them: every vector ``k`` long, the regret ``k`` by
    ``k``, failures within requests, a latency missing only where no request was sent, p50
    within p99, and ``weights`` (rounding noise already read as 0) summing to 1."""
    if not (len(requests) == k and len(failures) == k and len(in_flight) == k
            and len(mean) == k and len(p50) == k and len(p99) == k and len(weights) == k
            and len(regret) == k and set(map(len, regret)) == {k}):
        return False
    if not all(map(operator.le, failures, requests)):  # each f <= n (lengths checked)
        return False
    if (None in mean or None in p50 or None in p99) and not all(  # unmeasured endpoints
            n == 0 or (a is not None and b is not None and c is not None)
            for n, a, b, c in zip(requests, mean, p50, p99)):  # noqa: B905 (lengths checked)
        return False
    for low, high in zip(p50, p99):  # noqa: B905 (lengths checked)
        if low is not None and high is not None and low > high * (1 + 1e-9) + 1e-12:
            return False
    return abs(math.fsum(weights) - 1.0) <= WEIGHT_SUM_TOLERANCE


def _made(
    sidecar: str, upstream: str, epoch: int, sent_at: float, endpoints: tuple[str, ...],
    requests: tuple[int, ...], failures: tuple[int, ...], mean: tuple[float | None, ...],
    p50: tuple[float | None, ...], p99: tuple[float | None, ...], in_flight: tuple[int, ...],
    demand: float, weights: tuple[float, ...], regret: tuple[tuple[float, ...], ...],
    version: int,
) -> RegretSummary:
    """A summary of values already checked, made without running the checks again."""
    summary: RegretSummary = _NEW(RegretSummary)
    _SET(summary, "sidecar", sidecar)
    _SET(summary, "upstream", upstream)
    _SET(summary, "epoch", epoch)
    _SET(summary, "sent_at", sent_at)
    _SET(summary, "endpoints", endpoints)
    _SET(summary, "requests", requests)
    _SET(summary, "failures", failures)
    _SET(summary, "latency_mean", mean)
    _SET(summary, "latency_p50", p50)
    _SET(summary, "latency_p99", p99)
    _SET(summary, "in_flight", in_flight)
    _SET(summary, "demand", demand)
    _SET(summary, "weights", weights)
    _SET(summary, "regret", regret)
    _SET(summary, "version", version)
    return summary


def _verify_fast(entry: object, keys: Sequence[bytes]) -> RegretSummary | None:
    """``entry`` verified and decoded as :func:`_verify_reference` would, or None when it
    takes anything but the common shape (the reference path then decides, and says why).

    Accepts only what the reference path accepts, with equal values: the 17 fields as
    ``bytes`` in a ``dict``, within the size limits, UTF-8, the MAC over the raw bytes, then
    every value check of :class:`RegretSummary` without building a message (each numeric
    vector's types and ranges in one msgspec call, the lengths and the relations between
    fields in Python); the summary is made without running those checks a second time.
    """
    if type(entry) is not dict or len(entry) != len(_BYTE_NAMES):
        return None
    try:
        raw = _FIELDS_OF(entry)
    except KeyError:
        return None
    if set(map(type, raw)) != _BYTES:
        return None
    lengths = list(map(len, raw))
    if max(lengths) > MAX_FIELD_BYTES or _NAMES_LENGTH + sum(lengths) > MAX_ENTRY_BYTES \
            or raw[0] != b"1" or raw[1] != b"summary":
        return None
    try:
        # one decode for all: 17 values exactly when no value holds the separator
        texts = b"\x00".join(raw).decode().split("\x00")
        if len(texts) != len(raw):
            return None
        # the numeric vectors are decoded from the raw bytes (indices 7-12, 14, 15)
        (_, _, sidecar, upstream, epoch_text, sent_text, endpoints_text, *_,
         demand_text, _, _, sig) = texts
        if not SIGNATURE_RE.fullmatch(sig):
            return None
        args: list[object] = [None] * (2 * len(SUMMARY_FIELDS))
        args[0::2] = lengths[:-1]
        args[1::2] = raw[:-1]
        message = _CANONICAL % tuple(args)
        expected = sig.encode("ascii")
        matched = False
        for candidate in keys:  # every key, no early exit (as verify_mac)
            matched |= hmac.compare_digest(mac_bytes(candidate, message)[:43], expected)
        if not matched:
            return None
        if not (NAME_RE.fullmatch(sidecar) and NAME_RE.fullmatch(upstream)
                and INT_RE.fullmatch(epoch_text) and FLOAT_RE.fullmatch(sent_text)
                and FLOAT_RE.fullmatch(demand_text)):
            return None
        epoch, sent_at, demand = int(epoch_text), float(sent_text), float(demand_text)
        if epoch > MAX_EPOCH or not 0.0 < sent_at <= MAX_TIMESTAMP \
                or not 0.0 <= demand <= MAX_RATE:
            return None
        endpoints = _endpoint_list(endpoints_text)
        if endpoints is None:
            return None
        requests: tuple[int, ...] = _COUNTS.decode(raw[7])
        failures: tuple[int, ...] = _COUNTS.decode(raw[8])
        in_flight: tuple[int, ...] = _COUNTS.decode(raw[12])
        mean: tuple[float | None, ...] = _LATENCIES.decode(raw[9])
        p50: tuple[float | None, ...] = _LATENCIES.decode(raw[10])
        p99: tuple[float | None, ...] = _LATENCIES.decode(raw[11])
        weights = tuple([max(0.0, w) for w in _WEIGHTS.decode(raw[14])])
        regret: tuple[tuple[float, ...], ...] = _REGRET.decode(raw[15])
        if not _holds_relations(len(endpoints), requests, failures, in_flight, mean, p50, p99,
                                weights, regret):
            return None
    except Exception:  # anything odd: the reference path decides
        return None
    return _made(sidecar, upstream, epoch, sent_at, endpoints, requests, failures, mean, p50,
                 p99, in_flight, demand, weights, regret, 1)


# ------------------------------------------------------------------------ version 2: one body

_V2_KEYS = frozenset(name.encode("ascii") for name in SIGNED_SUMMARY_V2_FIELDS)
_WHITESPACE_BYTES = b" \t\n\r"
"""JSON's whitespace (RFC 8259, section 2), which a compact body holds none of."""
_KEY_ENDS = len(SUMMARY_BODY_FIELDS)


class _Body(msgspec.Struct, forbid_unknown_fields=True):
    """A version-2 body's types and ranges (the relations between fields are checked after)."""

    sidecar: str
    upstream: str
    epoch: Annotated[int, Meta(ge=0, le=MAX_EPOCH)]
    sent_at: Annotated[float, Meta(gt=0.0, le=MAX_TIMESTAMP)]
    endpoints: tuple[str, ...]
    requests: tuple[_Count, ...]
    failures: tuple[_Count, ...]
    latency_mean: tuple[_Seconds | None, ...]
    latency_p50: tuple[_Seconds | None, ...]
    latency_p99: tuple[_Seconds | None, ...]
    in_flight: tuple[_Count, ...]
    demand: Annotated[float, Meta(ge=0.0, le=MAX_RATE)]
    weights: tuple[_Share, ...]
    regret: tuple[tuple[_Regret, ...], ...]


_BODY = msgspec.json.Decoder(_Body)


def _is_version_2(entry: object) -> bool:
    """Whether ``entry`` says it is a version-2 summary (``v`` is ``2``)."""
    if not isinstance(entry, Mapping):
        return False
    try:
        version: object = entry.get(b"v", entry.get("v"))
    except Exception:  # a mapping with keys of its own kind
        return False
    return version == b"2" or version == "2"


def _v2_parts(entry: object) -> tuple[bytes, str]:
    """The ``body`` (bytes) and ``sig`` ("" if absent) of a version-2 entry, after the checks
    of sizes and of the field set (as :func:`~wire.entries.text_fields`, which names what is
    wrong with anything but a ``dict`` of the four fields in ``bytes``)."""
    if type(entry) is dict and entry.keys() == _V2_KEYS:
        version, kind, body, sig = (entry[b"v"], entry[b"type"], entry[b"body"], entry[b"sig"])
        if type(body) is bytes and type(sig) is bytes and kind == b"summary" \
                and version == b"2" and len(body) <= MAX_FIELD_BYTES \
                and len(body) + len(sig) + 21 <= MAX_ENTRY_BYTES and sig.isascii():
            return body, sig.decode("ascii")
    raw = text_fields(entry, SIGNED_SUMMARY_V2_FIELDS, "summary", SUMMARY_VERSIONS)
    return raw["body"].encode("utf-8"), raw.get("sig", "")


def _verify_v2(entry: object, keys: Sequence[bytes]) -> RegretSummary:
    """A version-2 entry's MAC (over the context line and the body as it travels, against
    every key) then its values, without the age checks; :class:`WireError` otherwise."""
    try:
        body, sig = _v2_parts(entry)
        if sig == "":
            raise fail("summary carries no signature", Reason.UNSIGNED)
        if not SIGNATURE_RE.fullmatch(sig):
            raise fail("signature is not 43 base64url characters", Reason.BAD_SIGNATURE)
        message = SUMMARY_V2_SIGNATURE_CONTEXT + body
        expected = sig.encode("ascii")
        matched = False
        for candidate in keys:  # every key, no early exit (as verify_mac)
            matched |= hmac.compare_digest(mac_bytes(candidate, message)[:43], expected)
        if not matched:
            raise fail("signature does not verify under the mesh key", Reason.BAD_SIGNATURE)
        return _body_summary(body)
    except WireError:
        raise
    except Exception as exc:  # a verifier never lets anything else escape
        raise unexpected(exc) from exc


@functools.lru_cache(maxsize=4096)
def _checked_endpoints(endpoints: tuple[str, ...]) -> tuple[str, ...]:
    """:func:`~wire.entries.check_endpoints`, once per list (a sidecar sends the same list
    epoch after epoch; a refused list raises and is not kept)."""
    return check_endpoints(endpoints)


def _body_summary(body: bytes) -> RegretSummary:
    """The summary a version-2 body holds, or :class:`WireError` naming what is wrong.

    The body is compact JSON (no whitespace: no name, endpoint id or number holds any), so
    every key ends in ``":`` and no text does: a body with each of the fields once has
    exactly as many (a JSON object may repeat a key, and a decoder keeps one of them
    silently). Types and ranges are checked by the decoder, the names and the relations
    between fields here; a summary that breaks a relation is built by
    :class:`RegretSummary`, whose check names it."""
    if len(body.translate(None, _WHITESPACE_BYTES)) != len(body):  # 4x a regex's speed
        raise fail("summary body must be compact JSON (no whitespace)")
    if body.count(b'":') != _KEY_ENDS:
        raise fail(f"summary body must hold each of its {_KEY_ENDS} fields once")
    try:
        value = _BODY.decode(body)
    except msgspec.ValidationError as exc:
        raise fail(f"summary body: {str(exc)[:200]}") from None
    except msgspec.DecodeError as exc:
        raise fail(f"summary body is not JSON: {str(exc)[:200]}") from None
    check_name(value.sidecar, "sidecar")
    check_name(value.upstream, "upstream")
    endpoints = _checked_endpoints(value.endpoints)
    shares = value.weights
    # rounding noise below 0 reads as 0, and so does -0.0 (as check_weights)
    weights = shares if shares and min(shares) > 0.0 else tuple([max(0.0, w) for w in shares])
    if not _holds_relations(len(endpoints), value.requests, value.failures, value.in_flight,
                            value.latency_mean, value.latency_p50, value.latency_p99, weights,
                            value.regret):
        RegretSummary(**{name: getattr(value, name) for name in SUMMARY_BODY_FIELDS})
        raise fail("summary body breaks a relation between its fields")  # pragma: no cover
    return _made(value.sidecar, value.upstream, value.epoch, value.sent_at, endpoints,
                 value.requests, value.failures, value.latency_mean, value.latency_p50,
                 value.latency_p99, value.in_flight, value.demand, weights, value.regret, 2)


def _decode(raw: Mapping[str, str]) -> RegretSummary:
    return RegretSummary(
        sidecar=raw["sidecar"],
        upstream=raw["upstream"],
        epoch=parse_int(raw["epoch"], "epoch"),
        sent_at=parse_float(raw["sent_at"], "sent_at"),
        endpoints=tuple(json_list(raw["endpoints"], "endpoints")),
        requests=tuple(json_list(raw["requests"], "requests")),
        failures=tuple(json_list(raw["failures"], "failures")),
        latency_mean=tuple(json_list(raw["latency_mean"], "latency_mean")),
        latency_p50=tuple(json_list(raw["latency_p50"], "latency_p50")),
        latency_p99=tuple(json_list(raw["latency_p99"], "latency_p99")),
        in_flight=tuple(json_list(raw["in_flight"], "in_flight")),
        demand=parse_float(raw["demand"], "demand"),
        weights=tuple(json_list(raw["weights"], "weights")),
        regret=tuple(tuple(row) for row in json_list(raw["regret"], "regret", depth=2)),
        version=1,
    )
