"""The probe exchange: a caller's question to an inbound sidecar and its signed answer.

Owns the wire format of both halves, their signing and their checks (documented for users in
docs/protocol.md, "Probes"). Pure: no I/O, no clock; the key is passed in (the sidecar reads
it with :func:`wire.signing.read_mesh_key`) and the nonce comes from the caller's generator.

Request (answered by the inbound listener itself; the app never sees it)::

    GET /.well-known/equilibrium/probe
    X-GT-Identity: <the caller's signed identity, wire.identity>
    X-GT-Probe: v=1;nonce=<16..43 characters of base64url>

Answer (``200``, ``text/plain``, one line)::

    v=1;nonce=<n>;inflight=<u>;mean=<s>;p50=<s>;p90=<s>;n=<u>;cong=<0..1>;limit=<u>;drain=<0|1>;sig=<mac>
    <mac> = base64url(HMAC-SHA256(key, "X-GT-Probe-Answer|" + everything before ";sig=")), unpadded

The fields appear in exactly this order, once each; numbers are plain ASCII decimals
(:mod:`wire.numerals`) within bounds (latencies 0..3600 s, counts and limits up to 10**6,
samples up to 10**9, congestion 0..1). The MAC covers the nonce the caller chose, so an answer
can be neither forged without the mesh key nor replayed to another probe; the domain prefix
keeps any other MAC made with the mesh key from passing as an answer. Anything else is refused
with a :class:`~wire.errors.WireError` (``malformed``, ``too-long``, ``out-of-range``,
``version``, ``unsigned``, ``bad-signature``, ``stale`` for another probe's nonce): an answer
from outside the mesh is worth nothing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from mesh.probes import ProbeReport
from wire.errors import Reason, WireError
from wire.numerals import ascii_decimal, ascii_uint
from wire.signing import SIGNATURE_RE, mac, verify_mac

__all__ = [
    "PROBE",
    "PROBE_PATH",
    "format_answer",
    "format_request",
    "parse_answer",
    "parse_request",
]

PROBE = "X-GT-Probe"
"""The request header that makes a request to :data:`PROBE_PATH` a probe."""
PROBE_PATH = "/.well-known/equilibrium/probe"
"""The path the inbound listener answers itself (RFC 8615 well-known URI)."""
VERSION = "v=1"
MAX_ANSWER_CHARS = 512
NONCE_RE = re.compile(r"[A-Za-z0-9_-]{16,43}")
_DOMAIN = b"X-GT-Probe-Answer|"
_FIELDS = ("nonce", "inflight", "mean", "p50", "p90", "n", "cong", "limit", "drain")
MAX_COUNT = 10**6
MAX_SAMPLES = 10**9
MAX_LATENCY = 3600.0


def _error(reason: Reason, detail: str) -> WireError:
    return WireError(reason, detail, PROBE)


def format_request(nonce: str) -> str:
    """The ``X-GT-Probe`` request header value for ``nonce`` (ValueError if it is not 16..43
    characters of base64url)."""
    if not NONCE_RE.fullmatch(nonce):
        raise ValueError("a probe nonce is 16..43 characters of base64url")
    return f"{VERSION};nonce={nonce}"


def parse_request(value: str | None) -> str:
    """The nonce of an ``X-GT-Probe`` request header (WireError if absent or bad)."""
    if not value:
        raise _error(Reason.MISSING, "no X-GT-Probe header")
    if len(value) > 64:
        raise _error(Reason.TOO_LONG, "longer than 64 characters")
    version, sep, rest = value.strip().partition(";")
    if version != VERSION:
        raise _error(Reason.VERSION, f"expected {VERSION}")
    name, eq, nonce = rest.partition("=")
    if not sep or name != "nonce" or not eq or not NONCE_RE.fullmatch(nonce):
        raise _error(Reason.MALFORMED, "expected nonce=<16..43 characters of base64url>")
    return nonce


def _seconds(value: float) -> str:
    return f"{min(max(value, 0.0), MAX_LATENCY):.6f}" if math.isfinite(value) else "0.000000"


def format_answer(key: bytes, nonce: str, report: ProbeReport) -> str:
    """The signed answer to the probe with ``nonce`` (values clamped into their bounds)."""
    if not NONCE_RE.fullmatch(nonce):
        raise ValueError("a probe nonce is 16..43 characters of base64url")
    congestion = report.congestion if math.isfinite(report.congestion) else 1.0
    body = (
        f"{VERSION};nonce={nonce};inflight={min(max(report.in_flight, 0), MAX_COUNT)}"
        f";mean={_seconds(report.mean)};p50={_seconds(report.p50)};p90={_seconds(report.p90)}"
        f";n={min(max(report.samples, 0), MAX_SAMPLES)}"
        f";cong={min(max(congestion, 0.0), 1.0):.4f}"
        f";limit={min(max(report.limit, 0), MAX_COUNT)};drain={1 if report.draining else 0}"
    )
    return f"{body};sig={mac(key, _DOMAIN + body.encode('ascii'))}"


def _count(name: str, text: str, high: int) -> int:
    value = ascii_uint(text, len(str(high)))
    if value is None:
        raise _error(Reason.MALFORMED, f"{name} is not a count")
    if value > high:
        raise _error(Reason.OUT_OF_RANGE, f"{name} above {high}")
    return value


def _decimal(name: str, text: str, high: float) -> float:
    value = ascii_decimal(text)
    if value is None or text[:1] in "+-":
        raise _error(Reason.MALFORMED, f"{name} is not a plain decimal")
    if not 0.0 <= value <= high:
        raise _error(Reason.OUT_OF_RANGE, f"{name} outside [0, {high:g}]")
    return value


def is_answer_shaped(text: str) -> bool:
    """Whether ``text`` is shaped like a probe answer of some version (``v=...;``): an app
    outside the mesh that answers every path (an echo, a catch-all page) answers the probe
    path too, and what it says is no sidecar's answer at all, not a wrong one."""
    return text.lstrip().startswith("v=")


def parse_answer(text: str, keys: bytes | Sequence[bytes], nonce: str) -> ProbeReport:
    """Check a probe answer against the mesh key(s) and the nonce that was sent; the report,
    or :class:`WireError` (see the module docstring). Shape is checked before the MAC, the
    nonce after it (an outsider learns only ``bad-signature``)."""
    text = text.strip()
    if len(text) > MAX_ANSWER_CHARS:
        raise _error(Reason.TOO_LONG, f"answer longer than {MAX_ANSWER_CHARS} characters")
    if not text.isascii():
        raise _error(Reason.MALFORMED, "the answer is not ASCII")
    body, sep, sig = text.rpartition(";sig=")
    if not sep:
        raise _error(Reason.UNSIGNED, "the answer carries no signature")
    parts = body.split(";")
    if parts[0] != VERSION:
        raise _error(Reason.VERSION, f"expected {VERSION}")
    if len(parts) != 1 + len(_FIELDS):
        raise _error(Reason.MALFORMED, f"expected exactly the fields {', '.join(_FIELDS)}")
    values: list[str] = []
    for part, name in zip(parts[1:], _FIELDS, strict=True):
        got, eq, value = part.partition("=")
        if got != name or not eq:
            raise _error(Reason.MALFORMED, f"expected field {name!r} in that position")
        values.append(value)
    if not SIGNATURE_RE.fullmatch(sig):
        raise _error(Reason.MALFORMED, "sig is not 43 characters of base64url")
    key_list = [keys] if isinstance(keys, bytes | bytearray) else list(keys)
    if not verify_mac(key_list, _DOMAIN + body.encode("ascii"), sig):
        raise _error(Reason.BAD_SIGNATURE, "the answer is not signed with the mesh key")
    got_nonce, inflight, mean, p50, p90, samples, cong, limit, drain = values
    if got_nonce != nonce:
        raise _error(Reason.STALE, "the answer is for another probe")
    if drain not in ("0", "1"):
        raise _error(Reason.MALFORMED, "drain must be 0 or 1")
    return ProbeReport(
        in_flight=_count("inflight", inflight, MAX_COUNT),
        mean=_decimal("mean", mean, MAX_LATENCY),
        p50=_decimal("p50", p50, MAX_LATENCY),
        p90=_decimal("p90", p90, MAX_LATENCY),
        samples=_count("n", samples, MAX_SAMPLES),
        congestion=_decimal("cong", cong, 1.0),
        limit=_count("limit", limit, MAX_COUNT),
        draining=drain == "1",
    )
