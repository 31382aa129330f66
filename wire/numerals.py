"""ASCII numerals: the one check every parser of numbers from the wire goes through.

``str.isdigit`` is true for ``'²'`` and ``'٣'``, ``int``/``float`` accept Arabic-Indic digits,
``_`` separators, surrounding blanks and ``nan``/``inf``, and ``int`` raises (not
``WireError``) above 4,300 digits. Text from a peer, an app or an annotation is therefore
read here: ASCII ``0-9`` only, in the plain decimal syntax, with a bounded length, so a
parser can turn ``None`` into its own clear rejection. Pure; raises nothing.
"""

from __future__ import annotations

import math
import re

MAX_NUMBER_CHARS = 32
"""Longer numbers are refused before conversion (no wire number needs more)."""

_UINT = re.compile(r"[0-9]+", re.ASCII)
_DECIMAL = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]{1,3})?",
                      re.ASCII)


def ascii_uint(text: str, max_digits: int = 18) -> int | None:
    """The value of ``text`` if it is 1..``max_digits`` ASCII digits (no sign, no blanks)."""
    if not 0 < len(text) <= max_digits or not _UINT.fullmatch(text):
        return None
    return int(text)


def ascii_decimal(text: str) -> float | None:
    """The finite value of ``text`` in plain decimal syntax (``-1.5``, ``.5``, ``2e3``;
    ASCII only, at most :data:`MAX_NUMBER_CHARS` characters), else None."""
    if len(text) > MAX_NUMBER_CHARS or not _DECIMAL.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None
