"""The ``X-GT-Bid`` request header and the ``X-GT-Price`` response header (no version field),
and their app-facing twins ``X-Equilibrium-Bid`` / ``X-Equilibrium-Price``.

Owns the one text format of a bid and of a price: a plain non-negative decimal (``3``,
``2.5``, ``1e2``), at most :data:`MAX_BID_CHARS` characters and at most :data:`MAX_BID`.
:func:`parse_bid` reads both headers (and the app's ``X-Equilibrium-Bid``); :func:`format_bid`
writes a bid (and the price handed back to the app) so that :func:`parse_bid` reads it back to
within 1e-6; :func:`format_price` writes the inbound side's ``X-GT-Price``. What a bid buys is
the auction's business (:mod:`mesh.auction`, Vickrey's second price). Pure; bad input raises
:class:`~wire.errors.WireError` with subject ``X-GT-Bid`` (documented in docs/policing.md).
"""

from __future__ import annotations

import math
import re

from wire.errors import Reason, WireError
from wire.headers import BID

__all__ = [
    "APP_BID_HEADER",
    "APP_PRICE_HEADER",
    "MAX_BID",
    "MAX_BID_CHARS",
    "format_bid",
    "format_price",
    "parse_bid",
]

APP_BID_HEADER = "X-Equilibrium-Bid"
"""The header an app sets on an outgoing request to bid for priority (the sidecar turns it
into a signed caller's ``X-GT-Bid`` and never forwards it)."""
APP_PRICE_HEADER = "X-Equilibrium-Price"
"""The response header that tells the app the second price its request paid."""
MAX_BID = 1_000_000.0
"""Largest accepted ``X-GT-Bid`` value."""
MAX_BID_CHARS = 32
_DECIMAL = re.compile(r"[+-]?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def _bad(reason: Reason, detail: str) -> WireError:
    return WireError(reason, detail, BID)


def parse_bid(header_value: str | None, max_bid: float = MAX_BID) -> float:
    """The bid carried by an ``X-GT-Bid`` header value; an absent or empty header bids 0.

    Accepts a plain decimal (``3``, ``2.5``, ``1e2``). Raises :class:`WireError` (the sidecar
    answers 400) for anything else: non-numbers (``malformed``), NaN (``nan``), infinities
    (``infinite``), negative values (``negative``), values above ``max_bid`` (``too-large``) and
    values longer than 32 characters (``too-long``).
    """
    if header_value is None:
        return 0.0
    text = header_value.strip()
    if text == "":
        return 0.0
    if len(text) > MAX_BID_CHARS:
        raise _bad(Reason.TOO_LONG, f"longer than {MAX_BID_CHARS} characters")
    lowered = text.lower().lstrip("+-")
    if lowered == "nan":
        raise _bad(Reason.NAN, "must be a number, got NaN")
    if lowered in ("inf", "infinity"):
        raise _bad(Reason.INFINITE, "must be finite")
    if not _DECIMAL.fullmatch(text):
        raise _bad(Reason.MALFORMED, f"must be a decimal number, got {text!r}")
    value = float(text)
    if not math.isfinite(value):
        raise _bad(Reason.INFINITE, "must be finite")
    if value < 0:
        raise _bad(Reason.NEGATIVE, f"must not be negative, got {text}")
    if value > max_bid:
        raise _bad(Reason.TOO_LARGE, f"must be at most {max_bid:g}, got {text}")
    return value + 0.0  # turns -0.0 into 0.0


def format_bid(bid: float) -> str:
    """A bid as a plain decimal that :func:`parse_bid` reads back (six decimals at most)."""
    text = f"{bid:.6f}".rstrip("0").rstrip(".")
    return text or "0"


def format_price(price: float) -> str:
    """The ``X-GT-Price`` value of a second price (``%g``: six significant digits)."""
    return f"{price:g}"
