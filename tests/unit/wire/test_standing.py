"""wire.standing: the ``X-GT-Reputation`` wire format."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.reputation import Phase
from wire.errors import WireError
from wire.standing import format_standing, parse_standing


def test_standing_round_trip_and_retry_only_when_punished() -> None:
    good = format_standing(0.98765, 0, Phase.GOOD, None)
    assert good == "v=1;score=0.988;level=0;phase=good"
    punished = parse_standing(format_standing(0.2, 2, Phase.PUNISHED, 7.2))
    assert punished.punished and punished.level == 2 and punished.retry_after == 8.0
    assert parse_standing(format_standing(0.8, 1, Phase.PROBATION, 5.0)).retry_after is None
    assert parse_standing("v=1;score=1;level=0;phase=good;future=x").score == 1.0


@given(st.floats(allow_nan=True, allow_infinity=True), st.integers(0, 100),
       st.sampled_from(list(Phase)), st.one_of(st.none(), st.floats(0, 1e4)))
def test_any_standing_formats_to_a_parseable_value(score: float, level: int, phase: Phase,
                                                   retry: float | None) -> None:
    parsed = parse_standing(format_standing(score, level, phase, retry))
    assert 0.0 <= parsed.score <= 1.0 and parsed.level == level and parsed.phase is phase
    assert (parsed.retry_after is not None) == (phase is Phase.PUNISHED)


@pytest.mark.parametrize("value", [
    "score=1;level=0;phase=good",            # no version
    "v=2;score=1;level=0;phase=good",        # unknown version
    "v=1;level=0;phase=good",                # missing score
    "v=1;score=2;level=0;phase=good",        # out of range
    "v=1;score=1;level=-1;phase=good",       # bad level
    "v=1;score=1;level=0;phase=exiled",      # unknown phase
    "v=1;score=1;level=0;phase=punished;retry=inf",
])
def test_malformed_standing_is_a_header_error(value: str) -> None:
    with pytest.raises(WireError):
        parse_standing(value)
