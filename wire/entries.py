"""The encoding rules shared by the Redis stream entries (summaries and recommendations).

Owns the stream protocol's version (:data:`PROTOCOL_VERSION`), its size limits, the name and
endpoint-id grammars and the checks and parsers the entry codecs (:mod:`wire.summary`,
:mod:`wire.recommendation`, :mod:`wire.lease`) are built from: numbers in ranges, vectors
aligned with an endpoint list, weights that sum to 1, and the decoding of a redis-py field map
(``bytes`` or ``str``) into checked ``str -> str``. Documented in docs/protocol.md ("Encoding
rules"). Pure: no Redis client, no clock, no I/O; every failure is a
:class:`~wire.errors.WireError`.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any

from wire.errors import Reason, WireError

PROTOCOL_VERSION = 1
"""Version of the stream entries (field ``v``) but the summary's, which is at 2 and still reads
1 (:data:`wire.summary.SUMMARY_VERSION`). Any change to an entry's fields or meaning bumps
its version."""

MAX_ENDPOINTS = 64
MAX_ENTRY_BYTES = 256 * 1024
"""Largest encoded entry (all field names and values, UTF-8). k=64 needs about 100 KiB."""
MAX_FIELD_BYTES = 192 * 1024
MAX_COUNT = 10**12
MAX_SECONDS = 3600.0
"""Largest latency (and absolute regret) in seconds; a longer one is a unit bug."""
MAX_RATE = 1e9
MAX_TIMESTAMP = 1e11
"""Unix seconds (year 5138): timestamps are finite, positive and below this."""
MAX_EPOCH = 2**63 - 1
MAX_OBJECTIVE = 1e12
WEIGHT_SUM_TOLERANCE = 1e-6
WEIGHT_ROUNDING = 1e-9
"""Weights down to -1e-9 (a linear solve's rounding) are accepted and stored as 0.0."""
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""Upstream names and sidecar/signer ids: DNS-label-ish, no ``{}:;|`` or whitespace."""
ENDPOINT_RE = re.compile(r"[A-Za-z0-9\[\]][A-Za-z0-9._:\[\]/-]{0,199}")
"""Endpoint ids: ``host:port``, ``[v6]:port`` or a pod name; no whitespace, quotes or commas."""
TOKEN_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")
INT_RE = re.compile(r"0|[1-9][0-9]{0,18}")
FLOAT_RE = re.compile(r"-?(?:0|[1-9][0-9]{0,17})(?:\.[0-9]{1,20})?(?:[eE][-+]?[0-9]{1,3})?")


def fail(detail: str, reason: Reason = Reason.MALFORMED) -> WireError:
    """The error of a stream entry (its message starts with the reason)."""
    return WireError(reason, detail)


def short(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages about untrusted input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------ value checks


def check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise fail(f"{what} must match {NAME_RE.pattern}, got {short(value)}")
    return value


def check_int(value: object, what: str, low: int = 0, high: int = MAX_COUNT) -> int:
    """An integer (numpy integers too, never bool) within [low, high], as a Python int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise fail(f"{what} must be an integer in [{low}, {high}], got {short(value)}")
    number = int(value)
    if not low <= number <= high:
        raise fail(f"{what} must be an integer in [{low}, {high}], got {short(value)}")
    return number


def check_float(value: object, what: str, low: float, high: float) -> float:
    """A finite real (numpy reals too, never bool) within [low, high], as a Python float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise fail(f"{what} must be a number, got {short(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise fail(f"{what} must be finite, got {number!r}")
    if not low <= number <= high:
        raise fail(f"{what} must be in [{low:g}, {high:g}], got {number!r}")
    return number


def check_timestamp(value: object, what: str) -> float:
    number = check_float(value, what, 0.0, MAX_TIMESTAMP)
    if number <= 0.0:
        raise fail(f"{what} must be positive unix seconds, got {number!r}")
    return number


def check_endpoints(value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise fail(f"endpoints must be a list, got {short(value)}")
    if not value:
        raise fail("endpoints must not be empty")
    if len(value) > MAX_ENDPOINTS:
        raise fail(f"{len(value)} endpoints, at most {MAX_ENDPOINTS}", Reason.OVERSIZED)
    for endpoint in value:
        if not isinstance(endpoint, str) or not ENDPOINT_RE.fullmatch(endpoint):
            raise fail(f"endpoint ids must match {ENDPOINT_RE.pattern}, got {short(endpoint)}")
    if len(set(value)) != len(value):
        raise fail("endpoint ids must be unique")
    return tuple(value)


def check_vector(value: object, what: str, k: int) -> tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        raise fail(f"{what} must be a list, got {short(value)}")
    if len(value) != k:
        raise fail(f"{what} has {len(value)} values for {k} endpoints")
    return tuple(value)


def check_ints(value: object, what: str, k: int, low: int = 0,
               high: int = MAX_COUNT) -> tuple[int, ...]:
    """``k`` integers, each as :func:`check_int` would take it (``what[i]`` in messages).

    The fast path (plain ints in range, what JSON gives) builds no message; anything else goes
    through :func:`check_int` one by one, so the errors are the same."""
    vector = check_vector(value, what, k)
    if all(type(n) is int and low <= n <= high for n in vector):
        return vector
    return tuple(check_int(n, f"{what}[{i}]", low, high) for i, n in enumerate(vector))


def check_floats(value: object, what: str, k: int, low: float,
                 high: float) -> tuple[float, ...]:
    """``k`` finite reals in [low, high], each as :func:`check_float` would take it.

    The fast path (plain floats or ints in range: NaN and infinities fail the range test)
    builds no message; anything else goes through :func:`check_float` one by one."""
    vector = check_vector(value, what, k)
    if all((type(x) is float or type(x) is int) and low <= x <= high for x in vector):
        return tuple(float(x) for x in vector)
    return tuple(check_float(x, f"{what}[{i}]", low, high) for i, x in enumerate(vector))


def check_weights(value: object, k: int) -> tuple[float, ...]:
    """Finite, in [0, 1], summing to 1 within tolerance; rounding noise below 0 reads as 0."""
    weights = tuple(max(0.0, w) for w in check_floats(
        value, "weights", k, -WEIGHT_ROUNDING, 1.0 + WEIGHT_SUM_TOLERANCE))
    total = math.fsum(weights)
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise fail(f"weights must sum to 1 (within {WEIGHT_SUM_TOLERANCE:g}), sum is {total!r}")
    return weights


def check_version(version: object, kind: str) -> None:
    if version != PROTOCOL_VERSION:
        raise fail(f"{kind} version {version!r}, expected {PROTOCOL_VERSION}", Reason.VERSION)


# ---------------------------------------------------------------------------------- encoding


def compact_json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=True)


def number_text(value: float) -> str:
    """The shortest text that reads back as the same double."""
    return repr(float(value))


# ---------------------------------------------------------------------------------- decoding


def text_fields(entry: object, expected: Sequence[str], kind: str,
                versions: Sequence[int] = (PROTOCOL_VERSION,)) -> dict[str, str]:
    """Decode a redis-py field map to ``str -> str``, checking sizes, the version (one of
    ``versions``) and the field set.

    Every field of ``expected`` must be present, except that a signed entry (a recommendation,
    a summary) may lack ``sig`` (the verifier reports that as ``unsigned``).
    """
    if not isinstance(entry, Mapping):
        raise fail(f"{kind} entry must be a mapping, got {type(entry).__name__}")
    out: dict[str, str] = {}
    total = 0
    for raw_key, raw_value in entry.items():
        key = _field_text(raw_key, None)
        value = _field_text(raw_value, key)
        size = len(key) + len(value)  # UTF-8 bytes >= characters; checked exactly below
        if len(value) > MAX_FIELD_BYTES or (
                (len(raw_value) if type(raw_value) is bytes else len(value.encode()))
                > MAX_FIELD_BYTES):
            raise fail(f"field {short(key, 30)} exceeds {MAX_FIELD_BYTES} bytes", Reason.OVERSIZED)
        total += size
        if total > MAX_ENTRY_BYTES:
            raise fail(f"{kind} entry exceeds {MAX_ENTRY_BYTES} bytes", Reason.OVERSIZED)
        if key in out:
            raise fail(f"field {short(key, 30)} appears twice")
        out[key] = value
    if "v" not in out:
        raise fail(f"{kind} entry has no version field 'v'")
    if out["v"] not in [str(version) for version in versions]:
        known = " or ".join(str(version) for version in versions)
        raise fail(f"{kind} version {short(out['v'], 20)}, expected {known}", Reason.VERSION)
    missing = [name for name in expected if name not in out]
    unknown = sorted(name for name in out if name not in expected)
    if missing and missing != ["sig"]:
        raise fail(f"{kind} entry lacks fields {missing}")
    if unknown:
        raise fail(f"{kind} entry has unknown fields {[short(u, 30) for u in unknown[:5]]}")
    if out.get("type") != kind:
        raise fail(f"entry type {short(out.get('type'), 30)}, expected {kind!r}")
    return out


def _field_text(raw: object, name: str | None) -> str:
    """:func:`text` of a field name (``name`` None) or of the value of field ``name``, with
    the message built only when the value is refused (a signaler decodes ~20 fields for
    every summary it reads)."""
    if type(raw) is bytes:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
    elif type(raw) is str:
        return raw
    return text(raw, "field name" if name is None else f"field {short(name, 30)}")


def text(raw: object, what: str) -> str:
    """``raw`` (bytes-like or str) as str; UTF-8 or a :class:`WireError`."""
    if isinstance(raw, bytes | bytearray | memoryview):
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise fail(f"{what} is not UTF-8") from None
    if isinstance(raw, str):
        return raw
    raise fail(f"{what} must be bytes or str, got {type(raw).__name__}")


def parse_int(text_: str, what: str) -> int:
    if not INT_RE.fullmatch(text_):
        raise fail(f"{what} must be a non-negative decimal integer, got {short(text_)}")
    return int(text_)


def parse_float(text_: str, what: str) -> float:
    if not FLOAT_RE.fullmatch(text_):
        raise fail(f"{what} must be a finite decimal number, got {short(text_)}")
    return float(text_)


def _reject_constant(name: str) -> float:
    raise fail(f"non-finite number {name} in JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
"""One decoder for every entry (``json.loads`` with an option builds a new one per call)."""
_SCAN: Any = _DECODER.scan_once  # type: ignore[attr-defined]  # the C scanner


def _parse_json(text_: str, what: str) -> Any:
    try:
        return _DECODER.decode(text_)
    except WireError:
        raise
    except (ValueError, RecursionError):
        raise fail(f"{what} is not valid JSON: {short(text_)}") from None


def json_exact(text_: str) -> Any:
    """The JSON value spelled by exactly ``text_`` (no whitespace around it), for decoders'
    fast paths: one call into the C scanner. Raises (``ValueError``, ``StopIteration``,
    ``WireError`` for NaN or an infinity, ``RecursionError``) for anything else; the caller
    then takes its reference path, which names the reason."""
    value, end = _SCAN(text_, 0)
    if end != len(text_):
        raise ValueError("trailing text after the JSON value")
    return value


def json_list(text_: str, what: str, depth: int = 1) -> list[Any]:
    value = _parse_json(text_, what)
    if not isinstance(value, list):
        raise fail(f"{what} must be a JSON array, got {short(text_)}")
    if depth == 2 and not all(isinstance(row, list) for row in value):
        raise fail(f"{what} must be a JSON array of arrays")
    if any(isinstance(x, dict) for x in value):
        raise fail(f"{what} must not contain objects")
    return value


def unexpected(exc: Exception) -> WireError:
    """What a decoder raises for anything but a :class:`WireError` (it never lets one escape)."""
    return fail(f"unexpected {type(exc).__name__} while decoding: {short(str(exc))}")
