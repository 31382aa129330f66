"""sidecar.hooks: the wait for /readyz, on a given clock, and the hooks' command lines."""

from __future__ import annotations

import argparse

import pytest

from equilibrium.cli import build_parser
from sidecar.hooks import POLL, wait_ready


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_ready_at_once_does_not_sleep() -> None:
    clock = Clock()
    assert wait_ready("a:1", 60, ready=lambda admin: True, clock=clock, sleep=clock.sleep)
    assert clock.slept == []


def test_polls_until_ready() -> None:
    clock = Clock()
    answers = iter([False, False, False, True])
    assert wait_ready("a:1", 60, ready=lambda admin: next(answers), clock=clock,
                      sleep=clock.sleep)
    assert clock.slept == [POLL] * 3


def test_gives_up_at_the_timeout_and_no_later() -> None:
    clock = Clock()
    asked: list[str] = []

    def never(admin: str) -> bool:
        asked.append(admin)
        return False

    assert not wait_ready("127.0.0.1:15020", 0.25, ready=never, clock=clock, sleep=clock.sleep)
    assert clock.now == pytest.approx(0.25)
    assert set(asked) == {"127.0.0.1:15020"} and len(asked) == 4  # at 0, 0.1, 0.2, 0.25


@pytest.mark.parametrize("argv", [
    ["sidecar-hook", "pre-stop", "--seconds", "-1"],
    ["sidecar-hook", "pre-stop", "--seconds", "601"],
    ["sidecar-hook", "pre-stop"],
    ["sidecar-hook", "post-start", "--timeout", "nan"],
    ["sidecar-hook"],
])
def test_bad_command_lines_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser(argv).parse_args(argv)
    assert exit_.value.code == 2


def test_defaults() -> None:
    args: argparse.Namespace = build_parser(["sidecar-hook"]).parse_args(
        ["sidecar-hook", "post-start"])
    assert (args.admin, args.timeout) == ("127.0.0.1:15020", 60.0)
