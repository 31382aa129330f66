"""What every test that drives real processes shares: the child environment, the bounded wait,
and reading a Prometheus exposition.

Owns exactly three helpers, so no test grows its own copy:

- :func:`child_env`: the environment a child ``python -m equilibrium ...`` (or a test helper
  module) runs with: this checkout first on ``PYTHONPATH``, unbuffered output, and none of the
  caller's ``EQUILIBRIUM_*`` settings or proxy variables leaking in.
- :func:`eventually`: poll a blocking check from an async test until it holds, within a bound;
  on timeout it fails with what was awaited and whatever context the caller attaches (logs).
- :func:`metric_value`: one sample sum out of a ``/metrics`` text, parsed by
  ``prometheus_client``'s own text-format parser (never by a regex of ours).

It must not start processes, open sockets or know any component's metric names.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parents[1]

_PROXY_VARS = frozenset({"http_proxy", "https_proxy", "all_proxy", "no_proxy"})
_KEPT = frozenset({"EQUILIBRIUM_REDIS_SERVER"})
"""``EQUILIBRIUM_*`` variables that say where a tool lives rather than how to behave."""

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
