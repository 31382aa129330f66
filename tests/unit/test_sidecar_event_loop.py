"""``sidecar.event_loop``: the --event-loop choice, its asyncio fallback, the running loop."""

from __future__ import annotations

import asyncio
import sys

import pytest

from sidecar.event_loop import EventLoopError, choose_event_loop, running_loop


def _name_of_loop_made_by(factory: object) -> str:
    with asyncio.Runner(loop_factory=factory) as runner:  # type: ignore[arg-type]
        return runner.run(_running())


async def _running() -> str:
    return running_loop()


def test_asyncio_is_forced_and_runs_asyncio() -> None:
    choice = choose_event_loop("asyncio")
    assert (choice.name, choice.factory, choice.reason) == ("asyncio", None, "requested")
    assert _name_of_loop_made_by(choice.factory) == "asyncio"


@pytest.mark.parametrize("requested", ["auto", "uvloop"])
def test_auto_and_uvloop_run_uvloop_when_installed(requested: str) -> None:
    choice = choose_event_loop(requested)
    assert choice.name == "uvloop" and choice.requested == requested
    assert _name_of_loop_made_by(choice.factory) == "uvloop"


def test_auto_falls_back_to_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` now raises ImportError
    choice = choose_event_loop("auto")
    assert (choice.name, choice.factory) == ("asyncio", None)
    assert "not installed" in choice.reason
    with pytest.raises(EventLoopError, match="uvloop requested but not importable"):
        choose_event_loop("uvloop")


@pytest.mark.parametrize("bad", ["", "trio", "UVLOOP"])
def test_unknown_names_are_rejected(bad: str) -> None:
    with pytest.raises(EventLoopError, match="must be one of auto, asyncio, uvloop"):
        choose_event_loop(bad)
