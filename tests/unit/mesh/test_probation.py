"""mesh.probation: the calling sidecar's back-off and slow-start probation, by hand.

Defaults: doubling 2 s, headroom 2, throttle_fraction 0.5, rate_tau 5 s, min_rate 1/s.
"""

from __future__ import annotations

import math

import pytest

from mesh.probation import Paced, ProbationRules, SelfProbation, SelfStanding


def delivered_at(probation: SelfProbation, rate: float, start: float, end: float) -> None:
    t = start
    while t < end - 1e-9:
        probation.delivered(t)
        t += 1.0 / rate


def test_a_caller_never_punished_is_free() -> None:
    probation = SelfProbation()
    delivered_at(probation, 100.0, 0.0, 10.0)
    assert probation.check(10.0) == Paced(True, SelfStanding.FREE)
    assert probation.allowed_rate(10.0) == math.inf


def test_backs_off_then_ramps_from_the_throttled_delivered_rate() -> None:
    probation = SelfProbation()
    delivered_at(probation, 40.0, 0.0, 30.0)  # 40/s delivered for 30 s (6 time constants)
    before = probation.delivered_rate(30.0)
    assert before == pytest.approx(40.0 * (1 - math.exp(-6)), rel=0.02)
    assert probation.punish(30.0, 40.0, level=2)  # 10 s at level 2
    assert not probation.punish(31.0, 39.0, level=2)  # an earlier end extends nothing
    # back-off: nothing is sent, the wait is the time left
    paced = probation.check(35.0)
    assert not paced.send and paced.standing is SelfStanding.BACKING_OFF
    assert paced.wait == pytest.approx(5.0)
    # probation starts at 40 * 0.5^2 = 10/s and doubles every 2 s: 20/s at 42 s, 40 at 44 s,
    # 80/s = headroom 2 x 40 at 46 s, when probation is over
    assert probation.start_rate == pytest.approx(before * 0.25)
    assert probation.allowed_rate(40.0) == pytest.approx(before * 0.25)
    assert probation.allowed_rate(42.0) == pytest.approx(before * 0.5)
    assert probation.standing(45.9) is SelfStanding.PROBATION
    assert probation.standing(46.01) is SelfStanding.FREE


def test_on_probation_a_flood_is_paced_to_the_allowed_rate() -> None:
    probation = SelfProbation()
    delivered_at(probation, 20.0, 0.0, 50.0)  # ~20/s before
    probation.punish(50.0, 60.0, level=1)  # start at ~10/s, free after 2 doublings (4 s)
    sent = []
    for k in range(6000):  # the app floods at 1,000/s for 6 s
        t = 60.0 + k / 1000
        if probation.check(t).send:
            sent.append(t)
    in_first = sum(1 for s in sent if s < 61.0)
    # the bucket starts full (10 tokens) and refills at 10-14/s in the first second
    assert 18 <= in_first <= 26
    in_second_two = sum(1 for s in sent if 62.0 <= s < 63.0)  # 20-28/s
    assert 18 <= in_second_two <= 30
    assert probation.standing(64.01) is SelfStanding.FREE
    assert sum(1 for s in sent if 65.0 <= s < 66.0) == 1000  # free: everything goes


def test_a_refusal_says_how_long_until_the_next_token() -> None:
    probation = SelfProbation(ProbationRules(min_rate=1.0))
    probation.punish(0.0, 1.0, level=3)  # nothing delivered: the ramp starts at 1/s
    assert probation.check(1.0).send  # the bucket's one token
    paced = probation.check(1.0)
    assert not paced.send and paced.standing is SelfStanding.PROBATION
    assert paced.wait == pytest.approx(1.0)


def test_a_new_punishment_during_probation_keeps_the_rate_from_before_the_first() -> None:
    probation = SelfProbation()
    delivered_at(probation, 40.0, 0.0, 30.0)
    probation.punish(30.0, 40.0, level=1)
    before = probation.before
    delivered_at(probation, 20.0, 40.0, 41.0)  # on probation
    assert probation.punish(41.0, 61.0, level=2)  # punished again before probation ended
    assert probation.before == before
    assert probation.standing(50.0) is SelfStanding.BACKING_OFF


def test_rules_are_validated() -> None:
    for bad in ({"doubling": 0.0}, {"headroom": 0.5}, {"throttle_fraction": 1.0},
                {"rate_tau": -1.0}, {"min_rate": math.nan}):
        with pytest.raises(ValueError):
            ProbationRules(**bad)  # type: ignore[arg-type]
