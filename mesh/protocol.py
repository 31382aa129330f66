"""The signaling plane's wire formats: Redis key names, regret summaries, signed recommendations.

This module owns every byte the sidecars and the signaler exchange through Redis (documented
for operators in ``docs/protocol.md``):

* key names: one hash-tagged key family per upstream service (``eq:{<upstream>}:...``), so a
  Redis Cluster keeps an upstream's streams, lease and fence in one slot and the fenced publish
  script can touch them atomically;
* :class:`RegretSummary` — what a sidecar appends to ``eq:{u}:summaries`` every epoch
  (:func:`encode_summary` / :func:`decode_summary`);
* :class:`Recommendation` — what the leading signaler appends to ``eq:{u}:recs:<sidecar>``,
  signed with HMAC-SHA256 under the mesh key (:func:`sign_recommendation` /
  :func:`verify_recommendation`);
* the leader lease value and the Lua scripts for the lease and the fenced publish;
* :func:`check_redis_url`, the one check of the URL both sides are given to reach Redis.

Pure: no Redis client, no clock, no I/O. Entries are flat ``str -> str`` maps ready for XADD;
decoding accepts what redis-py returns (``bytes`` or ``str`` keys and values). Anything that is
not a valid entry raises :class:`ProtocolError` whose :attr:`~ProtocolError.reason` is a stable
identifier (a :class:`Reason`) meant for metric labels; nothing else is ever raised by the
decoders, whatever the input.

The regret matrix is Hart & Mas-Colell's conditional regret D(j, k) (Econometrica 2000, "A
simple adaptive procedure leading to correlated equilibrium") of the sidecar, in seconds; its
positive part is the sidecar's violation of the correlated-equilibrium constraints at its
empirical play, which is why the signaler can read the CE gap from the summaries.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from mesh.identity import MIN_KEY_BYTES

__all__ = [
    "FENCED_XADD_LUA",
    "LEASE_ACQUIRE_LUA",
    "LEASE_RELEASE_LUA",
    "PROTOCOL_VERSION",
    "RECOMMENDATION_MAXLEN",
    "SIGNALER_GROUP",
    "SUMMARY_MAXLEN",
    "Lease",
    "ProtocolError",
    "Reason",
    "Recommendation",
    "RegretSummary",
    "canonical_recommendation_bytes",
    "decode_lease",
    "decode_summary",
    "encode_lease",
    "encode_recommendation",
    "encode_summary",
    "fence_key",
    "leader_key",
    "recommendation_stream",
    "sign_recommendation",
    "summary_stream",
    "verify_recommendation",
]

PROTOCOL_VERSION = 1
"""Version of every entry (field ``v``). Any change to fields or meaning bumps it."""

SIGNALER_GROUP = "eq-signalers"
"""The consumer group of ``eq:{u}:summaries`` that all signaler replicas share."""
SUMMARY_MAXLEN = 10_000
"""``XADD ... MAXLEN ~`` bound of a summary stream (a few minutes of a large fleet)."""
RECOMMENDATION_MAXLEN = 16
"""``XADD ... MAXLEN ~`` bound of one sidecar's recommendation stream (only the last matters)."""

# ------------------------------------------------------------------------------------ limits
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
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""Upstream names and sidecar/signer ids: DNS-label-ish, no ``{}:;|`` or whitespace."""
_ENDPOINT_RE = re.compile(r"[A-Za-z0-9\[\]][A-Za-z0-9._:\[\]/-]{0,199}")
"""Endpoint ids: ``host:port``, ``[v6]:port`` or a pod name; no whitespace, quotes or commas."""
_TOKEN_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")
_INT_RE = re.compile(r"0|[1-9][0-9]{0,18}")
_FLOAT_RE = re.compile(r"-?(?:0|[1-9][0-9]{0,17})(?:\.[0-9]{1,20})?(?:[eE][-+]?[0-9]{1,3})?")
_SIG_RE = re.compile(r"[A-Za-z0-9_-]{43}")
_SIGNATURE_CONTEXT = b"equilibrium/recommendation/v1\n"


class Reason(StrEnum):
    """Why an entry was rejected: stable identifiers, used verbatim as metric labels."""

    MALFORMED = "malformed"
    """Missing, unknown or unparsable fields, values out of range, inconsistent shapes."""
    OVERSIZED = "oversized"
    """Too many endpoints or too many bytes."""
    VERSION = "version"
    """An entry of another protocol version."""
    UNSIGNED = "unsigned"
    """A recommendation without a signature."""
    BAD_SIGNATURE = "bad-signature"
    """The HMAC does not verify under any accepted key (forged, corrupted or another mesh)."""
    WRONG_UPSTREAM = "wrong-upstream"
    WRONG_SIDECAR = "wrong-sidecar"
    ENDPOINT_MISMATCH = "endpoint-mismatch"
    """A recommendation over another endpoint set than the reader routes to."""
    STALE = "stale"
    """Older than what the reader already follows (an earlier epoch)."""
    FENCED = "fenced"
    """Signed by a leader whose fencing token was superseded (a deposed signaler)."""
    NOT_YET_VALID = "not-yet-valid"
    """Issued further in the future than the allowed clock skew."""
    EXPIRED = "expired"


class ProtocolError(ValueError):
    """An entry that must not be used; ``reason`` is a :class:`Reason`, ``detail`` says why."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


def _fail(detail: str, reason: Reason = Reason.MALFORMED) -> ProtocolError:
    return ProtocolError(reason, detail)


# ---------------------------------------------------------------------------------- key names


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise _fail(f"{what} must match {_NAME_RE.pattern}, got {_short(value)}")
    return value


REDIS_URL_SCHEMES = ("redis://", "rediss://", "unix://")


def check_redis_url(value: object) -> str:
    """``value`` stripped, if it is a ``redis://[user:password@]host:port[/db]``, ``rediss://``
    (TLS) or ``unix://`` URL; ``ValueError`` otherwise. The message names only the scheme:
    the URL may carry the Redis password."""
    text = str(value).strip()
    scheme = next((s for s in REDIS_URL_SCHEMES if text.startswith(s)), None)
    if scheme is None or len(text) <= len(scheme):
        got = text.partition("://")[0] if "://" in text else "no scheme"
        raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {got}")
    return text


def summary_stream(upstream: str) -> str:
    """The stream every sidecar appends its summaries for ``upstream`` to."""
    return f"eq:{{{_check_name(upstream, 'upstream')}}}:summaries"


def recommendation_stream(upstream: str, sidecar: str) -> str:
    """The private stream the signaler writes ``sidecar``'s recommendations for ``upstream`` to."""
    return f"eq:{{{_check_name(upstream, 'upstream')}}}:recs:{_check_name(sidecar, 'sidecar')}"


def leader_key(upstream: str) -> str:
    """The lease key (``SET ... NX PX``) naming the signaler that leads ``upstream``."""
    return f"eq:{{{_check_name(upstream, 'upstream')}}}:leader"


def fence_key(upstream: str) -> str:
    """The counter (``INCR``) handing out fencing tokens for ``upstream``'s leadership."""
    return f"eq:{{{_check_name(upstream, 'upstream')}}}:fence"


# ------------------------------------------------------------------------------ value checks


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_int(value: object, what: str, low: int = 0, high: int = MAX_COUNT) -> int:
    """An integer (numpy integers too, never bool) within [low, high], as a Python int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(f"{what} must be an integer in [{low}, {high}], got {_short(value)}")
    number = int(value)
    if not low <= number <= high:
        raise _fail(f"{what} must be an integer in [{low}, {high}], got {_short(value)}")
    return number


def _check_float(value: object, what: str, low: float, high: float) -> float:
    """A finite real (numpy reals too, never bool) within [low, high], as a Python float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(f"{what} must be a number, got {_short(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise _fail(f"{what} must be finite, got {number!r}")
    if not low <= number <= high:
        raise _fail(f"{what} must be in [{low:g}, {high:g}], got {number!r}")
    return number


def _check_timestamp(value: object, what: str) -> float:
    number = _check_float(value, what, 0.0, MAX_TIMESTAMP)
    if number <= 0.0:
        raise _fail(f"{what} must be positive unix seconds, got {number!r}")
    return number


def _check_endpoints(value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise _fail(f"endpoints must be a list, got {_short(value)}")
    if not value:
        raise _fail("endpoints must not be empty")
    if len(value) > MAX_ENDPOINTS:
        raise _fail(f"{len(value)} endpoints, at most {MAX_ENDPOINTS}", Reason.OVERSIZED)
    for endpoint in value:
        if not isinstance(endpoint, str) or not _ENDPOINT_RE.fullmatch(endpoint):
            raise _fail(f"endpoint ids must match {_ENDPOINT_RE.pattern}, got {_short(endpoint)}")
    if len(set(value)) != len(value):
        raise _fail("endpoint ids must be unique")
    return tuple(value)


def _check_vector(value: object, what: str, k: int) -> tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        raise _fail(f"{what} must be a list, got {_short(value)}")
    if len(value) != k:
        raise _fail(f"{what} has {len(value)} values for {k} endpoints")
    return tuple(value)


def _check_weights(value: object, k: int) -> tuple[float, ...]:
    """Finite, in [0, 1], summing to 1 within tolerance; rounding noise below 0 reads as 0."""
    weights = tuple(
        max(0.0, _check_float(w, f"weights[{i}]", -WEIGHT_ROUNDING, 1.0 + WEIGHT_SUM_TOLERANCE))
        for i, w in enumerate(_check_vector(value, "weights", k))
    )
    total = math.fsum(weights)
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise _fail(f"weights must sum to 1 (within {WEIGHT_SUM_TOLERANCE:g}), sum is {total!r}")
    return weights


# ---------------------------------------------------------------------------------- summaries


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
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if self.version != PROTOCOL_VERSION:
            raise _fail(f"summary version {self.version!r}, expected {PROTOCOL_VERSION}",
                        Reason.VERSION)
        _check_name(self.sidecar, "sidecar")
        _check_name(self.upstream, "upstream")
        set_ = object.__setattr__
        set_(self, "epoch", _check_int(self.epoch, "epoch", 0, MAX_EPOCH))
        set_(self, "sent_at", _check_timestamp(self.sent_at, "sent_at"))
        endpoints = _check_endpoints(self.endpoints)
        k = len(endpoints)
        set_(self, "endpoints", endpoints)
        requests = tuple(_check_int(n, f"requests[{i}]")
                         for i, n in enumerate(_check_vector(self.requests, "requests", k)))
        failures = tuple(_check_int(n, f"failures[{i}]")
                         for i, n in enumerate(_check_vector(self.failures, "failures", k)))
        for i, (n, f) in enumerate(zip(requests, failures, strict=True)):
            if f > n:
                raise _fail(f"failures[{i}]={f} exceeds requests[{i}]={n}")
        set_(self, "requests", requests)
        set_(self, "failures", failures)
        stats: dict[str, tuple[float | None, ...]] = {}
        for name in ("latency_mean", "latency_p50", "latency_p99"):
            column = []
            for i, x in enumerate(_check_vector(getattr(self, name), name, k)):
                if x is None:
                    if requests[i] > 0:
                        raise _fail(f"{name}[{i}] is missing although requests[{i}] > 0")
                    column.append(None)
                else:
                    column.append(_check_float(x, f"{name}[{i}]", 0.0, MAX_SECONDS))
            stats[name] = tuple(column)
            set_(self, name, stats[name])
        for i, (p50, p99) in enumerate(
            zip(stats["latency_p50"], stats["latency_p99"], strict=True)
        ):
            if p50 is not None and p99 is not None and p50 > p99 * (1 + 1e-9) + 1e-12:
                raise _fail(f"latency_p50[{i}]={p50!r} exceeds latency_p99[{i}]={p99!r}")
        set_(self, "in_flight", tuple(
            _check_int(n, f"in_flight[{i}]")
            for i, n in enumerate(_check_vector(self.in_flight, "in_flight", k))))
        set_(self, "demand", _check_float(self.demand, "demand", 0.0, MAX_RATE))
        set_(self, "weights", _check_weights(self.weights, k))
        rows = _check_vector(self.regret, "regret", k)
        set_(self, "regret", tuple(
            tuple(_check_float(x, f"regret[{j}][{c}]", -MAX_SECONDS, MAX_SECONDS)
                  for c, x in enumerate(_check_vector(row, f"regret[{j}]", k)))
            for j, row in enumerate(rows)))


_SUMMARY_FIELDS = (
    "v", "type", "sidecar", "upstream", "epoch", "sent_at", "endpoints", "requests", "failures",
    "latency_mean", "latency_p50", "latency_p99", "in_flight", "demand", "weights", "regret",
)
_REC_FIELDS = (
    "v", "type", "upstream", "sidecar", "epoch", "issued_at", "expires_at", "endpoints",
    "weights", "status", "objective", "ce_gap", "signer", "fence",
)
_SIGNED_REC_FIELDS = (*_REC_FIELDS, "sig")


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=True)


def _num(value: float) -> str:
    return repr(float(value))


def encode_summary(summary: RegretSummary) -> dict[str, str]:
    """The XADD fields of ``summary`` (flat strings; vectors as compact JSON arrays)."""
    return {
        "v": str(summary.version),
        "type": "summary",
        "sidecar": summary.sidecar,
        "upstream": summary.upstream,
        "epoch": str(summary.epoch),
        "sent_at": _num(summary.sent_at),
        "endpoints": _json(list(summary.endpoints)),
        "requests": _json(list(summary.requests)),
        "failures": _json(list(summary.failures)),
        "latency_mean": _json(list(summary.latency_mean)),
        "latency_p50": _json(list(summary.latency_p50)),
        "latency_p99": _json(list(summary.latency_p99)),
        "in_flight": _json(list(summary.in_flight)),
        "demand": _num(summary.demand),
        "weights": _json(list(summary.weights)),
        "regret": _json([list(row) for row in summary.regret]),
    }


# ------------------------------------------------------------------------------ raw decoding


def _text_fields(entry: object, expected: Sequence[str], kind: str) -> dict[str, str]:
    """Decode a redis-py field map to ``str -> str``, checking sizes and the field set."""
    if not isinstance(entry, Mapping):
        raise _fail(f"{kind} entry must be a mapping, got {type(entry).__name__}")
    out: dict[str, str] = {}
    total = 0
    for raw_key, raw_value in entry.items():
        key = _text(raw_key, "field name")
        value = _text(raw_value, f"field {_short(key, 30)}")
        size = len(key) + len(value)  # UTF-8 bytes >= characters; checked exactly below
        if len(value) > MAX_FIELD_BYTES or len(value.encode()) > MAX_FIELD_BYTES:
            raise _fail(f"field {_short(key, 30)} exceeds {MAX_FIELD_BYTES} bytes",
                        Reason.OVERSIZED)
        total += size
        if total > MAX_ENTRY_BYTES:
            raise _fail(f"{kind} entry exceeds {MAX_ENTRY_BYTES} bytes", Reason.OVERSIZED)
        if key in out:
            raise _fail(f"field {_short(key, 30)} appears twice")
        out[key] = value
    if "v" not in out:
        raise _fail(f"{kind} entry has no version field 'v'")
    if out["v"] != str(PROTOCOL_VERSION):
        raise _fail(f"{kind} version {_short(out['v'], 20)}, expected {PROTOCOL_VERSION}",
                    Reason.VERSION)
    missing = [name for name in expected if name not in out]
    unknown = sorted(name for name in out if name not in expected)
    if missing and not (kind == "recommendation" and missing == ["sig"]):
        raise _fail(f"{kind} entry lacks fields {missing}")
    if unknown:
        raise _fail(f"{kind} entry has unknown fields {[_short(u, 30) for u in unknown[:5]]}")
    if out.get("type") != kind:
        raise _fail(f"entry type {_short(out.get('type'), 30)}, expected {kind!r}")
    return out


def _text(raw: object, what: str) -> str:
    if isinstance(raw, bytes | bytearray | memoryview):
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise _fail(f"{what} is not UTF-8") from None
    if isinstance(raw, str):
        return raw
    raise _fail(f"{what} must be bytes or str, got {type(raw).__name__}")


def _parse_int(text: str, what: str) -> int:
    if not _INT_RE.fullmatch(text):
        raise _fail(f"{what} must be a non-negative decimal integer, got {_short(text)}")
    return int(text)


def _parse_float(text: str, what: str) -> float:
    if not _FLOAT_RE.fullmatch(text):
        raise _fail(f"{what} must be a finite decimal number, got {_short(text)}")
    return float(text)


def _reject_constant(name: str) -> float:
    raise _fail(f"non-finite number {name} in JSON")


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except (ValueError, RecursionError):
        raise _fail(f"{what} is not valid JSON: {_short(text)}") from None


def _json_list(text: str, what: str, depth: int = 1) -> list[Any]:
    value = _parse_json(text, what)
    if not isinstance(value, list):
        raise _fail(f"{what} must be a JSON array, got {_short(text)}")
    if depth == 2 and not all(isinstance(row, list) for row in value):
        raise _fail(f"{what} must be a JSON array of arrays")
    if any(isinstance(x, dict) for x in value):
        raise _fail(f"{what} must not contain objects")
    return value


def decode_summary(entry: Mapping[bytes | str, bytes | str]) -> RegretSummary:
    """Parse and validate a summary entry as read from the stream; raises :class:`ProtocolError`."""
    try:
        raw = _text_fields(entry, _SUMMARY_FIELDS, "summary")
        return RegretSummary(
            sidecar=raw["sidecar"],
            upstream=raw["upstream"],
            epoch=_parse_int(raw["epoch"], "epoch"),
            sent_at=_parse_float(raw["sent_at"], "sent_at"),
            endpoints=tuple(_json_list(raw["endpoints"], "endpoints")),
            requests=tuple(_json_list(raw["requests"], "requests")),
            failures=tuple(_json_list(raw["failures"], "failures")),
            latency_mean=tuple(_json_list(raw["latency_mean"], "latency_mean")),
            latency_p50=tuple(_json_list(raw["latency_p50"], "latency_p50")),
            latency_p99=tuple(_json_list(raw["latency_p99"], "latency_p99")),
            in_flight=tuple(_json_list(raw["in_flight"], "in_flight")),
            demand=_parse_float(raw["demand"], "demand"),
            weights=tuple(_json_list(raw["weights"], "weights")),
            regret=tuple(tuple(row) for row in _json_list(raw["regret"], "regret", depth=2)),
        )
    except ProtocolError:
        raise
    except Exception as exc:  # a decoder never lets anything else escape
        raise _fail(f"unexpected {type(exc).__name__} while decoding: {_short(str(exc))}") from exc


# ---------------------------------------------------------------------------- recommendations


@dataclass(frozen=True, slots=True)
class Recommendation:
    """The signaler's private routing signal for one sidecar on one upstream for one epoch.

    ``weights`` (aligned with ``endpoints``, summing to 1) is the sidecar's share of the sampled
    configuration of the correlated-equilibrium plan. ``status`` is the solver's outcome
    (``optimal``, ``system-optimum``, ...), ``objective`` the plan's expected total latency in
    seconds per unit time, ``ce_gap`` the largest gain (seconds) any token could get by
    deviating from its recommendation. ``signer`` is the leading signaler's id and ``fence`` its
    fencing token (from ``INCR eq:{u}:fence`` when it took the lease).
    """

    upstream: str
    sidecar: str
    epoch: int
    issued_at: float
    expires_at: float
    endpoints: tuple[str, ...]
    weights: tuple[float, ...]
    status: str
    objective: float
    ce_gap: float
    signer: str
    fence: int
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if self.version != PROTOCOL_VERSION:
            raise _fail(f"recommendation version {self.version!r}, expected {PROTOCOL_VERSION}",
                        Reason.VERSION)
        _check_name(self.upstream, "upstream")
        _check_name(self.sidecar, "sidecar")
        _check_name(self.signer, "signer")
        set_ = object.__setattr__
        set_(self, "epoch", _check_int(self.epoch, "epoch", 0, MAX_EPOCH))
        set_(self, "fence", _check_int(self.fence, "fence", 1, MAX_EPOCH))
        issued = _check_timestamp(self.issued_at, "issued_at")
        expires = _check_timestamp(self.expires_at, "expires_at")
        if expires <= issued:
            raise _fail(f"expires_at {expires!r} is not after issued_at {issued!r}")
        set_(self, "issued_at", issued)
        set_(self, "expires_at", expires)
        endpoints = _check_endpoints(self.endpoints)
        set_(self, "endpoints", endpoints)
        set_(self, "weights", _check_weights(self.weights, len(endpoints)))
        if not isinstance(self.status, str) or not _TOKEN_RE.fullmatch(self.status):
            raise _fail(f"status must match {_TOKEN_RE.pattern}, got {_short(self.status)}")
        set_(self, "objective",
             _check_float(self.objective, "objective", -MAX_OBJECTIVE, MAX_OBJECTIVE))
        set_(self, "ce_gap", _check_float(self.ce_gap, "ce_gap", 0.0, MAX_OBJECTIVE))

    def weight_map(self) -> dict[str, float]:
        """``{endpoint: weight}``."""
        return dict(zip(self.endpoints, self.weights, strict=True))


def _keys(key: bytes | Sequence[bytes]) -> list[bytes]:
    keys = [key] if isinstance(key, bytes | bytearray) else list(key)
    if not keys:
        raise ValueError("no mesh key given")
    for k in keys:
        if not isinstance(k, bytes | bytearray) or len(k) < MIN_KEY_BYTES:
            raise ValueError(f"mesh keys must be bytes of at least {MIN_KEY_BYTES} bytes")
    return [bytes(k) for k in keys]


def canonical_recommendation_bytes(fields_: Mapping[str, str]) -> bytes:
    """What the signature covers: a context line, then ``name=<len>:<value>\\n`` per field.

    Fields are taken in the fixed order of the protocol (every field but ``sig``), with the
    exact strings that travel in the entry, length-prefixed in UTF-8 bytes so that no two
    different entries share an encoding and no float is re-formatted on the way.
    """
    parts = [_SIGNATURE_CONTEXT]
    for name in _REC_FIELDS:
        value = fields_[name].encode("utf-8")
        parts.append(b"%s=%d:%s\n" % (name.encode("ascii"), len(value), value))
    return b"".join(parts)


def _mac(key: bytes, fields_: Mapping[str, str]) -> str:
    digest = hmac.new(key, canonical_recommendation_bytes(fields_), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def encode_recommendation(rec: Recommendation) -> dict[str, str]:
    """The unsigned fields of ``rec`` (use :func:`sign_recommendation` to publish)."""
    return {
        "v": str(rec.version),
        "type": "recommendation",
        "upstream": rec.upstream,
        "sidecar": rec.sidecar,
        "epoch": str(rec.epoch),
        "issued_at": _num(rec.issued_at),
        "expires_at": _num(rec.expires_at),
        "endpoints": _json(list(rec.endpoints)),
        "weights": _json(list(rec.weights)),
        "status": rec.status,
        "objective": _num(rec.objective),
        "ce_gap": _num(rec.ce_gap),
        "signer": rec.signer,
        "fence": str(rec.fence),
    }


def sign_recommendation(rec: Recommendation, key: bytes | Sequence[bytes]) -> dict[str, str]:
    """XADD fields of ``rec`` with ``sig`` = unpadded base64url HMAC-SHA256 under ``key``.

    With several keys (rotation) the first one signs. Raises ``ValueError`` for a short key.
    """
    signing_key = _keys(key)[0]
    out = encode_recommendation(rec)
    out["sig"] = _mac(signing_key, out)
    return out


def _decode_recommendation_fields(raw: Mapping[str, str]) -> Recommendation:
    return Recommendation(
        upstream=raw["upstream"],
        sidecar=raw["sidecar"],
        epoch=_parse_int(raw["epoch"], "epoch"),
        issued_at=_parse_float(raw["issued_at"], "issued_at"),
        expires_at=_parse_float(raw["expires_at"], "expires_at"),
        endpoints=tuple(_json_list(raw["endpoints"], "endpoints")),
        weights=tuple(_json_list(raw["weights"], "weights")),
        status=raw["status"],
        objective=_parse_float(raw["objective"], "objective"),
        ce_gap=_parse_float(raw["ce_gap"], "ce_gap"),
        signer=raw["signer"],
        fence=_parse_int(raw["fence"], "fence"),
    )


def verify_recommendation(
    entry: Mapping[bytes | str, bytes | str],
    key: bytes | Sequence[bytes],
    now: float,
    expected_upstream: str,
    expected_sidecar: str,
    *,
    min_epoch: int | None = None,
    min_fence: int | None = None,
    max_skew: float = 5.0,
    expected_endpoints: Sequence[str] | None = None,
) -> Recommendation:
    """Check a recommendation entry and return it, or raise :class:`ProtocolError`.

    Order of the checks (the first failure is the reason): sizes (``oversized``), field set and
    version (``malformed``/``version``), presence of ``sig`` (``unsigned``), the MAC in constant
    time against each accepted key (``bad-signature``), the values (``malformed``), then
    ``wrong-upstream``, ``wrong-sidecar``, ``endpoint-mismatch`` (only with
    ``expected_endpoints``: the recommendation must name exactly that set), ``stale`` (epoch
    below ``min_epoch``), ``fenced`` (fence below ``min_fence``), ``not-yet-valid`` (issued more
    than ``max_skew`` s after ``now``) and ``expired`` (``now >= expires_at``). Values are only
    interpreted after the MAC verified, so unauthenticated senders learn little.
    """
    keys = _keys(key)
    try:
        raw = _text_fields(entry, _SIGNED_REC_FIELDS, "recommendation")
        if "sig" not in raw or raw["sig"] == "":
            raise _fail("recommendation carries no signature", Reason.UNSIGNED)
        if not _SIG_RE.fullmatch(raw["sig"]):
            raise _fail("signature is not 43 base64url characters", Reason.BAD_SIGNATURE)
        sig = raw["sig"].encode("ascii")
        matched = False
        for candidate in keys:
            matched |= hmac.compare_digest(_mac(candidate, raw).encode("ascii"), sig)
        if not matched:
            raise _fail("signature does not verify under the mesh key", Reason.BAD_SIGNATURE)
        rec = _decode_recommendation_fields(raw)
    except ProtocolError:
        raise
    except Exception as exc:  # a decoder never lets anything else escape
        raise _fail(f"unexpected {type(exc).__name__} while decoding: {_short(str(exc))}") from exc

    if rec.upstream != expected_upstream:
        raise _fail(f"for upstream {rec.upstream!r}, not {expected_upstream!r}",
                    Reason.WRONG_UPSTREAM)
    if rec.sidecar != expected_sidecar:
        raise _fail(f"for sidecar {rec.sidecar!r}, not {expected_sidecar!r}", Reason.WRONG_SIDECAR)
    if expected_endpoints is not None and set(rec.endpoints) != set(expected_endpoints):
        raise _fail(
            f"endpoints {sorted(rec.endpoints)} differ from the known {sorted(expected_endpoints)}",
            Reason.ENDPOINT_MISMATCH,
        )
    if min_epoch is not None and rec.epoch < min_epoch:
        raise _fail(f"epoch {rec.epoch} is older than {min_epoch}", Reason.STALE)
    if min_fence is not None and rec.fence < min_fence:
        raise _fail(f"fence {rec.fence} from {rec.signer!r} was superseded by {min_fence}",
                    Reason.FENCED)
    if rec.issued_at > now + max_skew:
        raise _fail(f"issued {rec.issued_at - now:.3f}s in the future (skew {max_skew:g}s)",
                    Reason.NOT_YET_VALID)
    if now >= rec.expires_at:
        raise _fail(f"expired {now - rec.expires_at:.3f}s ago", Reason.EXPIRED)
    return rec


# ------------------------------------------------------------------------ leader lease, fence


@dataclass(frozen=True, slots=True)
class Lease:
    """The value of ``eq:{u}:leader``: who leads and under which fencing token."""

    holder: str
    fence: int

    def __post_init__(self) -> None:
        _check_name(self.holder, "lease holder")
        _check_int(self.fence, "fence", 1, MAX_EPOCH)


def encode_lease(lease: Lease) -> str:
    """``"<holder> <fence>"`` (the format the Lua scripts below read and write)."""
    return f"{lease.holder} {lease.fence}"


def decode_lease(raw: bytes | str) -> Lease:
    """Parse a lease value; raises :class:`ProtocolError` (``malformed``)."""
    text = _text(raw, "lease")
    holder, sep, fence = text.partition(" ")
    if not sep:
        raise _fail(f"lease must be '<holder> <fence>', got {_short(text)}")
    return Lease(holder=holder, fence=_parse_int(fence, "lease fence"))


LEASE_ACQUIRE_LUA = """
-- KEYS[1] = eq:{u}:leader, KEYS[2] = eq:{u}:fence; ARGV[1] = holder id, ARGV[2] = ttl ms.
-- Returns the holder's fencing token (renewing its lease), or 0 if another holder leads.
local current = redis.call('GET', KEYS[1])
if current then
  local holder, token = string.match(current, '^(%S+) (%d+)$')
  if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(token)
  end
  return 0
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. token, 'PX', ARGV[2])
return token
"""
"""Take or renew the lease for one upstream, atomically (``EVAL``, two keys, two args).

A new leader always gets a strictly larger token than every leader before it, so readers can
refuse a deposed leader's late writes (``fenced``)."""

LEASE_RELEASE_LUA = """
-- KEYS[1] = eq:{u}:leader; ARGV[1] = holder id, ARGV[2] = its token. Returns 1 if released.
if redis.call('GET', KEYS[1]) == ARGV[1] .. ' ' .. ARGV[2] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
"""Give the lease up (graceful shutdown) only if it is still ours."""

FENCED_XADD_LUA = """
-- KEYS[1] = eq:{u}:leader, KEYS[2] = the stream; ARGV[1] = holder id, ARGV[2] = its token,
-- ARGV[3] = MAXLEN (approximate), ARGV[4..] = field, value, field, value, ...
-- Appends only while the caller still holds the lease under that token; returns the entry id,
-- or false when fenced off.
if redis.call('GET', KEYS[1]) ~= ARGV[1] .. ' ' .. ARGV[2] then
  return false
end
local args = {'XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*'}
for i = 4, #ARGV do
  args[#args + 1] = ARGV[i]
end
return redis.call(unpack(args))
"""
"""Publish a recommendation only as the current leader (one round trip, atomic)."""


def recommendation_field_names() -> tuple[str, ...]:
    """All fields of a signed recommendation entry, in canonical order (``sig`` last)."""
    return _SIGNED_REC_FIELDS


def summary_field_names() -> tuple[str, ...]:
    """All fields of a summary entry."""
    return _SUMMARY_FIELDS
