"""The ``X-GT-*`` HTTP headers: their names, the ``v=1;key=value`` convention, and the small
signals (congestion, retry) that need no module of their own.

Game signals ride on ordinary HTTP headers so that firewalls and tracing keep working. Every
structured value is a ``;``-separated list of ``key=value`` pairs whose first pair is
``v=<version>``; unknown keys are ignored (forward compatible), a missing or unknown version,
a missing required key, or a non-finite number is a :class:`~wire.errors.WireError` whose
``subject`` is the header name (the proxy ignores the header and counts it by ``reason``). The
app never sees any of them: sidecars strip ``X-GT-*`` in both directions, underscore spellings
(``X_GT_Identity``, ``X-GT_Price``) included (:func:`is_gt_header`). Pure; documented for
users in docs/protocol.md ("HTTP headers").

========================  =========  ==========================================================
header                    direction  value
========================  =========  ==========================================================
X-GT-Retry                request    ``<attempt>`` (1, 2, ...) — this request is a retry
X-GT-Congestion           response   ``v=1;level=<0..1>[;limit=<n>;inflight=<n>]``
X-GT-Bid                  request    ``<decimal>`` — bid for priority (see wire.bid)
X-GT-Price                response   ``<decimal>`` — the second price charged (see wire.bid)
X-GT-Identity             request    signed caller identity, bound to its request (see
                                     wire.identity)
X-GT-Challenge            request    ``<nonce>`` — fresh per attempt; the answer's signals are
                                     signed over it (see wire.signals)
X-GT-Demand               request    ``v=1;rate=<r>;endpoints=<n>;sig=<mac>`` — the caller's
                                     rate to the service, signed with its identity (see
                                     wire.demand)
X-GT-Signals              response   ``v=1;caller=<id>;sig=<mac>`` — the callee sidecar's MAC
                                     over its signals and the request (see wire.signals)
X-GT-Probe                request    a probe's nonce (see wire.probe)
X-GT-Reputation           response   ``v=1;score=<0..1>;level=<n>;phase=<phase>[;retry=<s>]``,
                                     phase good|punished|probation (see wire.standing)
X-GT-Refused              response   ``queue-full`` | ``queue-timeout`` | ``shutting-down``:
                                     the callee's sidecar sent the request away before its
                                     app saw it (signed, see wire.signals)
========================  =========  ==========================================================
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

from wire.errors import Reason, WireError
from wire.numerals import ascii_decimal, ascii_uint

GT_PREFIX = "x-gt-"
RETRY = "X-GT-Retry"
CONGESTION = "X-GT-Congestion"
BID = "X-GT-Bid"
PRICE = "X-GT-Price"
IDENTITY = "X-GT-Identity"
REPUTATION = "X-GT-Reputation"
CHALLENGE = "X-GT-Challenge"
SIGNALS = "X-GT-Signals"
DEMAND = "X-GT-Demand"
REFUSED = "X-GT-Refused"
# the game headers above, by their lower-case names (a bounded set of metric labels)
GAME_HEADERS = {name.lower(): name for name in (
    RETRY, CONGESTION, BID, PRICE, IDENTITY, REPUTATION, CHALLENGE, SIGNALS, DEMAND, REFUSED)}
OTHER_GAME_HEADER = "X-GT-*"
"""The metric label of a game header that is none of :data:`GAME_HEADERS`."""


def header_label(name: str) -> str:
    """A game header's name as a metric label: its canonical spelling if it is one of ours,
    else :data:`OTHER_GAME_HEADER`. Whoever chose the name (the app, an upstream, a client
    outside the mesh) cannot make a new time series with it."""
    return GAME_HEADERS.get(name.lower().replace("_", "-"), OTHER_GAME_HEADER)


REFUSALS = frozenset({"queue-full", "queue-timeout", "shutting-down", "app-unreachable"})
"""The values of ``X-GT-Refused``: refusals that prove the app never saw the request."""

SHED = frozenset({"queue-full", "queue-timeout"})
"""The refusals for load (the app is busy, not broken): a caller's sidecar counts them in the
endpoint's cost, never towards an ejection (:class:`mesh.policy.Outcome` ``shed``)."""

APP_RESET = "app-reset"
"""The value of ``X-GT-Refused`` on an answer (502) whose app's connection broke before any
answer came. Unlike :data:`REFUSALS` it proves nothing of what the app saw: a caller's sidecar
sends the request again only where it would after its own connection to a pod broke that way
(an idempotent request without a body, within the retry budget)."""

SIGNED_REFUSED = REFUSALS | {APP_RESET}
"""Every value ``X-GT-Refused`` may carry, signed."""

VERSION = "1"
"""Version of the ``v=``-headers (Congestion, Reputation; Identity and Probe have their own)."""
MAX_HEADER_LENGTH = 512


def parse_fields(header: str, value: str) -> dict[str, str]:
    """Parse ``v=1;k=v;...`` into a dict, checking the version."""
    if len(value) > MAX_HEADER_LENGTH:
        raise WireError(Reason.TOO_LONG, f"value longer than {MAX_HEADER_LENGTH} bytes", header)
    fields: dict[str, str] = {}
    for part in value.split(";"):
        part = part.strip()
        if not part:
            continue
        key, sep, val = part.partition("=")
        if not sep or not key.strip():
            raise WireError(Reason.MALFORMED, f"expected key=value, got {part!r}", header)
        fields[key.strip().lower()] = val.strip()
    version = fields.get("v")
    if version is None:
        raise WireError(Reason.VERSION, "missing version (v=1)", header)
    if version != VERSION:
        raise WireError(Reason.VERSION, f"unsupported version {version!r}", header)
    return fields


def parse_number(header: str, raw: str, *, low: float = -math.inf,
                 high: float = math.inf) -> float:
    """A finite number within [low, high] from a header value (``malformed``/``out-of-range``)."""
    x = ascii_decimal(raw)
    if x is None:  # also nan/inf, non-ASCII digits and over-long numbers
        raise WireError(Reason.MALFORMED, f"not a finite decimal number: {raw[:32]!r}",
                        header)
    if not low <= x <= high:
        raise WireError(Reason.OUT_OF_RANGE, f"{x} outside [{low}, {high}]", header)
    return x


@dataclass(frozen=True, slots=True)
class CongestionSignal:
    """A parsed ``X-GT-Congestion``: level in [0, 1], optionally the limit and in-flight count."""

    level: float
    limit: int | None = None
    in_flight: int | None = None


def format_congestion(level: float, limit: int | None = None,
                      in_flight: int | None = None) -> str:
    """The ``X-GT-Congestion`` value; a level outside [0, 1] is clamped, a non-finite one is 1."""
    level = min(1.0, max(0.0, level)) if math.isfinite(level) else 1.0
    out = f"v={VERSION};level={level:.3f}"
    if limit is not None:
        out += f";limit={int(limit)}"
    if in_flight is not None:
        out += f";inflight={int(in_flight)}"
    return out


def parse_congestion_signal(value: str) -> CongestionSignal:
    """Parse an ``X-GT-Congestion`` value (WireError if bad)."""
    f = parse_fields(CONGESTION, value)
    if "level" not in f:
        raise WireError(Reason.MALFORMED, "missing level", CONGESTION)
    level = parse_number(CONGESTION, f["level"], low=0.0, high=1.0)
    limit = f.get("limit")
    inflight = f.get("inflight")
    return CongestionSignal(
        level,
        int(parse_number(CONGESTION, limit, low=0, high=1e9)) if limit is not None else None,
        int(parse_number(CONGESTION, inflight, low=0, high=1e9)) if inflight is not None else None,
    )


def parse_congestion(value: str) -> float:
    """The congestion level in [0, 1] from an ``X-GT-Congestion`` value (WireError if bad)."""
    return parse_congestion_signal(value).level


def parse_retry(value: str) -> int:
    """The attempt number of an ``X-GT-Retry`` value (1 = first retry)."""
    v = value.strip()
    attempt = ascii_uint(v, max_digits=3)
    if attempt is None or not 1 <= attempt <= 100:
        raise WireError(Reason.MALFORMED, f"expected an attempt number 1..100, got {v[:16]!r}",
                        RETRY)
    return attempt


def is_gt_header(name: str) -> bool:
    """Whether ``name`` is a game header: ``X-GT-*`` in any case, with ``_`` read as ``-``.

    CGI and WSGI servers hand ``X_GT_Identity`` and ``X-GT_Price`` to the app as
    ``HTTP_X_GT_IDENTITY``/``HTTP_X_GT_PRICE``, exactly like the real headers, so the
    underscore spellings are game headers too: stripped, never read as signals (only the
    canonical spelling is)."""
    return name[:len(GT_PREFIX)].replace("_", "-").lower() == GT_PREFIX


_X = (b"x", b"X")


def is_gt_field(name: bytes) -> bool:
    """:func:`is_gt_header` of a field name as HTTP/2 carries it (bytes): the first byte
    alone decides for nearly every field, without decoding it."""
    return name[:1] in _X and is_gt_header(name.decode("latin-1"))


def strip_gt_headers(headers: MutableMapping[str, Any]) -> list[str]:
    """Remove every game header (:func:`is_gt_header`: any case, ``_`` for ``-``, every
    occurrence); return the names removed."""
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
