"""The ``X-GT-Reputation`` response header: a caller's standing as the inbound side reports it.

This module owns the one wire format of that header (version 1) and its validation; it does
no I/O. The inbound sidecar writes it on every response from a :class:`mesh.reputation.Decision`
(or :class:`~mesh.reputation.Standing`); the calling sidecar reads it to back off by itself
while it is punished, without waiting for 429s (the folk theorem's punishment phase is then
played by the deviator's own sidecar, at no cost to the app).

Wire format (the ``v=1;key=value`` convention of :mod:`wire.headers`)::

    X-GT-Reputation: v=1;score=<0..1>;level=<0..max>;phase=<good|punished|probation>[;retry=<s>]

- ``score`` is the reputation in [0, 1] (1 = fully cooperative), three decimals;
- ``level`` is the punishment level (0 = good standing);
- ``phase`` is where the caller stands on the ladder;
- ``retry`` is present only while punished: whole seconds of punishment left (at least 1).

Unknown keys are ignored (forward compatible); a missing key, a bad number or an unknown phase
is a :class:`~wire.errors.WireError` (``malformed``, ``version``, ``out-of-range``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mesh.reputation import Phase
from wire.errors import Reason, WireError
from wire.headers import REPUTATION, VERSION, parse_fields, parse_number
from wire.numerals import ascii_uint

MAX_LEVEL = 100
MAX_RETRY_SECONDS = 86_400


@dataclass(frozen=True, slots=True)
class StandingSignal:
    """A parsed ``X-GT-Reputation`` value."""

    score: float
    level: int
    phase: Phase
    retry_after: float | None = None

    @property
    def punished(self) -> bool:
        return self.phase is Phase.PUNISHED


def format_standing(score: float, level: int, phase: Phase, retry_after: float | None) -> str:
    """The ``X-GT-Reputation`` value; ``retry_after`` is written (rounded up) only if punished."""
    score = min(1.0, max(0.0, score)) if math.isfinite(score) else 0.0
    out = f"v={VERSION};score={score:.3f};level={max(0, int(level))};phase={phase.value}"
    if phase is Phase.PUNISHED:
        seconds = 1 if retry_after is None or not math.isfinite(retry_after) else retry_after
        out += f";retry={max(1, math.ceil(seconds))}"
    return out


def parse_standing(value: str) -> StandingSignal:
    """Parse an ``X-GT-Reputation`` value (WireError if malformed)."""
    fields = parse_fields(REPUTATION, value)
    for key in ("score", "level", "phase"):
        if key not in fields:
            raise WireError(Reason.MALFORMED, f"missing {key}", REPUTATION)
    score = parse_number(REPUTATION, fields["score"], low=0.0, high=1.0)
    level = ascii_uint(fields["level"], max_digits=3)
    if level is None or level > MAX_LEVEL:
        raise WireError(Reason.MALFORMED, f"level must be 0..{MAX_LEVEL}", REPUTATION)
    try:
        phase = Phase(fields["phase"])
    except ValueError:
        shown = fields["phase"][:16]
        raise WireError(Reason.MALFORMED, f"unknown phase {shown!r}", REPUTATION) from None
    retry: float | None = None
    if "retry" in fields:
        retry = parse_number(REPUTATION, fields["retry"], low=0.0, high=MAX_RETRY_SECONDS)
    return StandingSignal(score, level, phase, retry)
