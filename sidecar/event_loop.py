"""The sidecar's event loop: asyncio's own, or uvloop (libuv, written in C) when installed.

Owns the ``--event-loop auto|asyncio|uvloop`` choice: :func:`choose_event_loop` turns it into
a loop factory for :class:`asyncio.Runner`, falling back to asyncio's loop when ``auto`` finds
no uvloop, and :func:`running_loop` names the loop that actually runs (for the startup log
line and ``/debug/state``). Why uvloop is the default: docs/benchmarks.md, "Event loop:
asyncio vs uvloop" (CPU per proxied request measured side by side).
"""

from __future__ import annotations

import asyncio
import platform
from collections.abc import Callable
from dataclasses import dataclass

EVENT_LOOPS = ("auto", "asyncio", "uvloop")
DEFAULT_EVENT_LOOP = "auto"


class EventLoopError(ValueError):
    """The requested event loop is unknown or not installed."""


@dataclass(frozen=True, slots=True)
class LoopChoice:
    requested: str  # what the flag or environment asked for
    name: str  # the loop that will run: "asyncio" or "uvloop"
    version: str
    factory: Callable[[], asyncio.AbstractEventLoop] | None  # None: asyncio's default
    reason: str  # one phrase for the log line


def choose_event_loop(requested: str) -> LoopChoice:
    """The loop for ``requested`` (one of :data:`EVENT_LOOPS`); raises :class:`EventLoopError`."""
    if requested not in EVENT_LOOPS:
        raise EventLoopError(
            f"event loop must be one of {', '.join(EVENT_LOOPS)}, got {requested!r}")
    python = platform.python_version()
    if requested == "asyncio":
        return LoopChoice(requested, "asyncio", python, None, "requested")
    try:
        import uvloop
    except ImportError as exc:
        if requested == "uvloop":
            raise EventLoopError(f"event loop uvloop requested but not importable: {exc}") from None
        return LoopChoice(requested, "asyncio", python, None,
                          "auto: uvloop not installed, asyncio fallback")
    reason = "requested" if requested == "uvloop" else "auto: uvloop installed"
    return LoopChoice(requested, "uvloop", uvloop.__version__, uvloop.new_event_loop, reason)


def running_loop() -> str:
    """``"uvloop"`` or ``"asyncio"``: the kind of the loop running the caller."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.split(".")[0] == "uvloop" else "asyncio"
