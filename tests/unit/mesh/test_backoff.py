"""mesh.backoff: the one backoff formula, against hand-made cases."""

from __future__ import annotations

import random

import pytest

from mesh.backoff import Backoff, backoff_ceiling, backoff_delay


class FixedDraw(random.Random):
    """A generator whose uniform(a, b) returns a + fraction * (b - a)."""

    def __init__(self, fraction: float) -> None:
        super().__init__(0)
        self.fraction = fraction

    def uniform(self, a: float, b: float) -> float:
        return a + self.fraction * (b - a)


def test_the_ceiling_doubles_from_base_and_stops_at_cap() -> None:
    assert [backoff_ceiling(n, 0.1, 1.0) for n in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert backoff_ceiling(0, 0.25, 5.0) == 0.25
    assert backoff_ceiling(10_000, 0.2, 30.0) == 30.0  # no overflow after many failures
    assert backoff_ceiling(-3, 0.2, 30.0) == 0.2


def test_the_wait_is_between_half_the_ceiling_and_the_ceiling() -> None:
    assert backoff_delay(0, 0.2, 30.0, FixedDraw(0.0)) == 0.1
    assert backoff_delay(0, 0.2, 30.0, FixedDraw(1.0)) == 0.2
    assert backoff_delay(3, 0.2, 30.0, FixedDraw(0.5)) == pytest.approx(1.2)  # c = 1.6
    assert backoff_delay(9, 0.2, 30.0, FixedDraw(0.0)) == 15.0  # c = cap


def test_a_loop_backs_off_then_starts_over_after_a_success() -> None:
    backoff = Backoff(FixedDraw(1.0), base=0.5, cap=3.0)
    assert [backoff.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    backoff.reset()
    assert backoff.next() == 0.5


def test_seeded_waits_stay_in_their_band() -> None:
    backoff = Backoff(random.Random(7), base=0.2, cap=5.0)
    for n in range(12):
        ceiling = min(5.0, 0.2 * 2**n)
        assert ceiling / 2 <= backoff.next() <= ceiling


def test_a_base_above_the_cap_waits_the_cap() -> None:
    backoff = Backoff(FixedDraw(1.0), base=2.0, cap=1.0)
    assert [backoff.next() for _ in range(3)] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(("base", "cap"), [(0.0, 1.0), (-1.0, 1.0), (0.1, 0.0),
                                           (0.1, float("inf")), (float("nan"), 1.0)])
def test_zero_negative_or_infinite_bounds_are_refused(base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="positive and finite"):
        Backoff(random.Random(), base=base, cap=cap)


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    backoff = Backoff(random.Random(7), base=0.2, cap=5.0)
    waits = [backoff.next() for _ in range(12)]
    for n, wait in enumerate(waits):
        ceiling = min(5.0, 0.2 * 2**n)
        assert ceiling / 2 <= wait <= ceiling
    backoff.reset()
    assert backoff.next() <= 0.2
