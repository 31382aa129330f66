"""One timer per proxied request: the request timeout as a stall bound, pushed forward cheaply.

Owns :class:`Watchdog`, the replacement on the request path for an ``asyncio.timeout`` per
step (upload, wait for the answer's head, each chunk of the body): one ``loop.call_at``
handle per request, which a step "pushes" by moving a number forward (no new timer, no
cancelled handle); when the handle fires before the deadline it re-arms itself at the
deadline, and past it it cancels the request's task. The code awaiting sees
``CancelledError`` and asks :meth:`Watchdog.took_back` whether the watchdog caused it (then
it is a timeout, and the cancellation is taken back) or someone else (a drain deadline).

It must not decide what a timeout means for the request: that is :mod:`sidecar.outbound`'s.
"""

from __future__ import annotations

import asyncio


class Watchdog:
    """Cancels the current task once ``idle`` seconds pass without a :meth:`push`."""

    __slots__ = ("_handle", "_loop", "_task", "_when", "expired", "idle")

    def __init__(self, idle: float) -> None:
        loop = self._loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None, "a Watchdog guards a task"
        self._task = task
        self.idle = idle
        self.expired = False
        self._when = loop.time() + idle
        self._handle: asyncio.TimerHandle | None = loop.call_at(self._when, self._fire)

    def push(self) -> None:
        """Progress: the deadline is ``idle`` seconds from now again."""
        self._when = self._loop.time() + self.idle

    def _fire(self) -> None:
        if self._loop.time() < self._when:
            self._handle = self._loop.call_at(self._when, self._fire)
            return
        self._handle = None
        self.expired = True
        self._task.cancel()

    def took_back(self) -> bool:
        """After a ``CancelledError``: True if the watchdog caused it (its cancellation is
        then withdrawn, and the caller treats it as a timeout)."""
        if not self.expired:
            return False
        self.expired = False
        self._task.uncancel()
        self._when = self._loop.time() + self.idle  # guards what the caller does next
        self._handle = self._loop.call_at(self._when, self._fire)
        return True

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
