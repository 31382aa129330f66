"""The ``X-GT-*`` HTTP headers: names, versions, formats and validation, in one place.

Game signals ride on ordinary HTTP headers so that firewalls and tracing keep working. Every
structured value is a ``;``-separated list of ``key=value`` pairs whose first pair is
``v=<version>``; unknown keys are ignored (forward compatible), a missing or unknown version,
a missing required key, or a non-finite number is a :class:`HeaderError` (the proxy ignores the
header and counts it). The app never sees any of them: sidecars strip ``X-GT-*`` in both
directions. Documented for users in docs/protocol.md.

========================  =========  ==========================================================
header                    direction  value
========================  =========  ==========================================================
X-GT-Regret               request    ``v=1;gap=<s>;max=<s>;conv=<0|1>`` — the caller's Nash gap
                                     and largest conditional regret for this upstream (seconds)
X-GT-Retry                request    ``<attempt>`` (1, 2, ...) — this request is a retry
X-GT-Congestion           response   ``v=1;level=<0..1>[;limit=<n>;inflight=<n>]``
X-GT-Bid                  request    ``<decimal>`` — bid for priority (see mesh.auction)
X-GT-Price                response   ``<decimal>`` — the second price charged (see mesh.auction)
X-GT-Identity             request    signed caller identity (see mesh.identity)
X-GT-Reputation           response   ``v=1;score=<0..1>;level=<n>;phase=<phase>[;retry=<s>]``,
                                     phase good|punished|probation (see mesh.standing)
========================  =========  ==========================================================
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

from mesh.policy import PolicySnapshot

GT_PREFIX = "x-gt-"
REGRET = "X-GT-Regret"
RETRY = "X-GT-Retry"
CONGESTION = "X-GT-Congestion"
BID = "X-GT-Bid"
PRICE = "X-GT-Price"
IDENTITY = "X-GT-Identity"
REPUTATION = "X-GT-Reputation"

VERSION = "1"
MAX_HEADER_LENGTH = 512


class HeaderError(ValueError):
    """A game header is malformed; ``reason`` is a short stable label for metrics."""

    def __init__(self, header: str, reason: str, detail: str) -> None:
        super().__init__(f"{header}: {detail}")
        self.header = header
        self.reason = reason


def parse_fields(header: str, value: str) -> dict[str, str]:
    """Parse ``v=1;k=v;...`` into a dict, checking the version."""
    if len(value) > MAX_HEADER_LENGTH:
        raise HeaderError(header, "too-long", f"value longer than {MAX_HEADER_LENGTH} bytes")
    fields: dict[str, str] = {}
    for part in value.split(";"):
        part = part.strip()
        if not part:
            continue
        key, sep, val = part.partition("=")
        if not sep or not key.strip():
            raise HeaderError(header, "malformed", f"expected key=value, got {part!r}")
        fields[key.strip().lower()] = val.strip()
    version = fields.get("v")
    if version is None:
        raise HeaderError(header, "version", "missing version (v=1)")
    if version != VERSION:
        raise HeaderError(header, "version", f"unsupported version {version!r}")
    return fields


def parse_number(header: str, raw: str, *, low: float = -math.inf,
                 high: float = math.inf) -> float:
    try:
        x = float(raw)
    except ValueError:
        raise HeaderError(header, "malformed", f"not a number: {raw[:32]!r}") from None
    if not math.isfinite(x):
        raise HeaderError(header, "malformed", "number must be finite")
    if not low <= x <= high:
        raise HeaderError(header, "out-of-range", f"{x} outside [{low}, {high}]")
    return x


@dataclass(frozen=True, slots=True)
class RegretSignal:
    gap: float
    max_regret: float
    converged: bool


def format_regret(snapshot: PolicySnapshot) -> str:
    biggest = max((v.regret for v in snapshot.endpoints), default=0.0)
    return (f"v={VERSION};gap={snapshot.nash_gap:.6f};max={max(0.0, biggest):.6f};"
            f"conv={1 if snapshot.converged else 0}")


def parse_regret(value: str) -> RegretSignal:
    f = parse_fields(REGRET, value)
    try:
        gap, biggest, conv = f["gap"], f["max"], f.get("conv", "0")
    except KeyError as missing:
        raise HeaderError(REGRET, "malformed", f"missing {missing.args[0]}") from None
    if conv not in ("0", "1"):
        raise HeaderError(REGRET, "malformed", "conv must be 0 or 1")
    return RegretSignal(parse_number(REGRET, gap, low=0.0, high=3600.0),
                        parse_number(REGRET, biggest, low=0.0, high=3600.0), conv == "1")


@dataclass(frozen=True, slots=True)
class CongestionSignal:
    level: float
    limit: int | None = None
    in_flight: int | None = None


def format_congestion(level: float, limit: int | None = None,
                      in_flight: int | None = None) -> str:
    level = min(1.0, max(0.0, level)) if math.isfinite(level) else 1.0
    out = f"v={VERSION};level={level:.3f}"
    if limit is not None:
        out += f";limit={int(limit)}"
    if in_flight is not None:
        out += f";inflight={int(in_flight)}"
    return out


def parse_congestion_signal(value: str) -> CongestionSignal:
    f = parse_fields(CONGESTION, value)
    if "level" not in f:
        raise HeaderError(CONGESTION, "malformed", "missing level")
    level = parse_number(CONGESTION, f["level"], low=0.0, high=1.0)
    limit = f.get("limit")
    inflight = f.get("inflight")
    return CongestionSignal(
        level,
        int(parse_number(CONGESTION, limit, low=0, high=1e9)) if limit is not None else None,
        int(parse_number(CONGESTION, inflight, low=0, high=1e9)) if inflight is not None else None,
    )


def parse_congestion(value: str) -> float:
    """The congestion level in [0, 1] from an ``X-GT-Congestion`` value (HeaderError if bad)."""
    return parse_congestion_signal(value).level


def parse_retry(value: str) -> int:
    """The attempt number of an ``X-GT-Retry`` value (1 = first retry)."""
    v = value.strip()
    if not (v.isascii() and v.isdigit()) or not 1 <= int(v) <= 100:
        raise HeaderError(RETRY, "malformed", f"expected an attempt number 1..100, got {v[:16]!r}")
    return int(v)


def is_gt_header(name: str) -> bool:
    return name.lower().startswith(GT_PREFIX)


def strip_gt_headers(headers: MutableMapping[str, Any]) -> list[str]:
    """Remove every ``X-GT-*`` header (any case, every occurrence); return the names removed."""
    names = [k for k in list(headers.keys()) if is_gt_header(k)]
    removed: list[str] = []
    for k in names:
        if k in headers:
            # multidict's popall removes every duplicate; a plain dict has one value per key.
            popall = getattr(headers, "popall", None)
            if popall is not None:
                popall(k, None)
            else:
                del headers[k]
            removed.append(k)
    return removed
