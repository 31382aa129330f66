"""The first-signal wait's state machine (mesh.first_signal), transition by transition."""

from __future__ import annotations

import pytest

from mesh.first_signal import TRANSITIONS, FirstSignalStage, FirstSignalWait

NEW, IDLE, BUSY = FirstSignalStage.NEW, FirstSignalStage.IDLE, FirstSignalStage.BUSY


def test_the_table_covers_every_stage_and_observation() -> None:
    assert set(TRANSITIONS) == {(stage, traffic) for stage in FirstSignalStage
                                for traffic in (False, True)}
    assert all(nxt is not NEW for nxt, _ in TRANSITIONS.values())  # no way back to NEW


@pytest.mark.parametrize(
    ("observations", "starts", "stage"),
    [
        ([False], [True], IDLE),  # seen quiet: the wait starts
        ([True], [True], BUSY),  # seen busy at once: one start
        ([False, False, False], [True, False, False], IDLE),  # quiet: not restarted
        ([False, False, True], [True, False, True], BUSY),  # first traffic: restarted once
        ([False, True, False, True], [True, True, False, False], BUSY),  # then never again
        ([True, True, False], [True, False, False], BUSY),
    ],
)
def test_the_wait_starts_when_first_seen_and_again_at_first_traffic(
    observations: list[bool], starts: list[bool], stage: FirstSignalStage
) -> None:
    wait = FirstSignalWait()
    assert wait.stage is NEW
    assert [wait.step(traffic) for traffic in observations] == starts
    assert wait.stage is stage
