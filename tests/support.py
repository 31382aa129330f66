"""What every test that drives real processes shares: the child environment, the bounded wait,
and reading a Prometheus exposition.

Owns exactly five helpers, so no test grows its own copy:

- :func:`child_env`: the environment a child ``python -m equilibrium ...`` (or a test helper
  module) runs with: this checkout first on ``PYTHONPATH``, unbuffered output, and none of the
  caller's ``EQUILIBRIUM_*`` settings or proxy variables leaking in.
- :func:`eventually`: poll a blocking check from an async test until it holds, within a bound;
  on timeout it fails with what was awaited and whatever context the caller attaches (logs).
- :func:`metric_value`: one sample sum out of a ``/metrics`` text, parsed by
  ``prometheus_client``'s own text-format parser (never by a regex of ours).
- :func:`keep_reading`: drain a running child's output pipe in a thread, so a child that
  writes more than a pipe holds never blocks (and can still exit when told to).
- :func:`interruptible_children`: children started inside it act on SIGINT (Ctrl-C), even
  when the test run itself was started in the background, which ignores it.

It must not start processes, open sockets or know any component's metric names.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, TypeVar

from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parents[1]

_PROXY_VARS = frozenset({"http_proxy", "https_proxy", "all_proxy", "no_proxy"})
_KEPT = frozenset({"EQUILIBRIUM_REDIS_SERVER", "EQUILIBRIUM_H2_ENGINE"})
"""``EQUILIBRIUM_*`` variables that say where a tool lives rather than how to behave, and the
HTTP/2 engine a test run exercises (CI runs the HTTP/2 tests once on each)."""

T = TypeVar("T")


def child_env(extra: Mapping[str, str] | None = None, /, **more: str) -> dict[str, str]:
    """This process's environment for a child run from this checkout.

    Drops ``EQUILIBRIUM_*`` settings (a developer's mesh key or Redis URL must not change what a
    test runs; ``EQUILIBRIUM_REDIS_SERVER``, a binary's location, stays) and proxy variables
    (every request goes to loopback), puts the repository first on ``PYTHONPATH`` and sets
    ``PYTHONUNBUFFERED``; then ``extra`` and ``more`` override.
    """
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("EQUILIBRIUM_") and k not in _KEPT)
           and k.lower() not in _PROXY_VARS}
    root = str(REPO_ROOT)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    env["PYTHONPATH"] = os.pathsep.join([root, *paths])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    env.update(more)
    return env


async def eventually(
    check: Callable[[], T],
    what: str = "the condition",
    *,
    timeout: float = 10.0,
    interval: float = 0.05,
    context: Callable[[], str] | None = None,
) -> T:
    """Poll ``check()`` until it returns a truthy value, and return that value.

    ``check`` runs in a thread (it may do blocking HTTP). After ``timeout`` seconds it raises
    ``AssertionError`` naming ``what`` and the last value, followed by ``context()`` (process
    output, say) when given.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        if time.monotonic() >= deadline:
            details = f"\n{context()}" if context is not None else ""
            raise AssertionError(f"not within {timeout}s: {what} (last: {value!r}){details}")
        await asyncio.sleep(interval)


def samples(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """Every sample of a Prometheus text exposition as ``(name, labels, value)``."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            yield sample.name, dict(sample.labels), float(sample.value)


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
    return sum(value for sample, found, value in samples(text)
               if sample == name and all(found.get(k) == v for k, v in labels.items()))


def keep_reading(stream: IO[str] | None, lines: list[str]) -> threading.Thread:
    """Read ``stream`` (a child's stdout or stderr pipe) to its end in a daemon thread,
    appending each line to ``lines``. A child whose pipe nobody reads blocks in its next
    write once the pipe's 64 KiB are full, and then cannot even act on a signal to stop."""
    def read() -> None:
        if stream is not None:
            for line in stream:
                lines.append(line)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def interruptible_children() -> Iterator[None]:
    """Children started inside the block get SIGINT's default action.

    A shell starts a background job (``make test &``, ``nohup ... &``) with SIGINT and SIGQUIT
    ignored, every child inherits that, and Python does not turn SIGINT into
    KeyboardInterrupt in a process that starts with it ignored: a test that sends SIGINT to
    play Ctrl-C would wait in vain. A handled signal (unlike an ignored one) is reset to its
    default when a child starts a program, so SIGINT is handled here for the block."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
