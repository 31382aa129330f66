"""Request timeouts as stall bounds, pushed forward cheaply, on one timer per event loop.

Owns :class:`Watchdog`, the replacement on the request path for an ``asyncio.timeout`` per
step (upload, wait for the answer's head, each chunk of the body): a step "pushes" the
deadline by moving a number forward (no new timer, no cancelled handle). Past its deadline
the watchdog cancels the request's task, unless its ``moving`` says there was progress no
push saw (an answer's reader that takes it slowly: ``H1Connection.reader_moving``). The code
awaiting sees ``CancelledError`` and asks :meth:`Watchdog.took_back` whether the watchdog
caused it (then it is a timeout, and the cancellation is taken back) or someone else (a
drain deadline).

The deadlines of all the watchdogs of a loop sit in one heap (:class:`_Sweeper`) behind one
``loop.call_at`` handle armed at the earliest: starting and stopping a watchdog costs a heap
push and a flag, not a timer of the event loop each (on uvloop one libuv timer is made,
started, stopped and freed per ``call_at``). A pushed deadline is not moved in the heap: when
its old place comes up it is put back at its new one. Entries of stopped watchdogs are
dropped when they come up, or all at once when they outnumber the live ones, so the heap
holds at most about twice the requests in flight plus those of the last second.

It must not decide what a timeout means for the request: that is :mod:`sidecar.outbound`'s.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import weakref
from collections.abc import Callable

log = logging.getLogger(__name__)

# the heap is rebuilt without stopped entries once it holds this many and most are stopped
_COMPACT_AT = 1024


class Watchdog:
    """Cancels the current task once ``idle`` seconds pass without a :meth:`push`."""

    __slots__ = ("_loop", "_sweeper", "_task", "_when", "expired", "idle", "moving", "stopped")

    def __init__(self, idle: float) -> None:
        loop = self._loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None, "a Watchdog guards a task"
        self._task: asyncio.Task[object] | None = task
        self.idle = idle
        self.expired = False
        self.stopped = False
        # asked once the deadline passed: True if there was progress after all (a reader
        # taking an answer slowly, which does not wake the writer each time)
        self.moving: Callable[[], bool] | None = None
        self._when = loop.time() + idle
        self._sweeper = _Sweeper.of(loop)
        self._sweeper.add(self, self._when)

    def push(self) -> None:
        """Progress: the deadline is ``idle`` seconds from now again."""
        self._when = self._loop.time() + self.idle

    def _expire(self) -> None:
        self.expired = True
        task = self._task
        if task is not None:
            task.cancel()

    def took_back(self) -> bool:
        """After a ``CancelledError``: True if the watchdog caused it (its cancellation is
        then withdrawn, and the caller treats it as a timeout)."""
        if not self.expired:
            return False
        self.expired = False
        task = self._task
        if task is not None:
            if task.cancelling() > 1:  # someone else cancelled it too (an app's reset in the
                task.uncancel()  # same loop pass): theirs stands, the stall is moot
                return False
            task.uncancel()
        self._when = self._loop.time() + self.idle  # guards what the caller does next
        self.stopped = False
        self._sweeper.add(self, self._when)
        return True

    def stop(self) -> None:
        """The request is done: the watchdog no longer fires (nor holds on to the task)."""
        self._task = None
        if not self.stopped:
            self.stopped = True
            self._sweeper.stopped += 1


class _Sweeper:
    """The deadlines of one loop's watchdogs, and the one timer that fires at the earliest."""

    __slots__ = ("__weakref__", "_handle", "_handle_when", "_heap", "_loop", "_seq", "stopped")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # weakly: the table of sweepers is keyed by the loop, which must be free to go
        self._loop = weakref.proxy(loop)
        self._heap: list[tuple[float, int, Watchdog]] = []
        self._seq = itertools.count()
        self._handle: asyncio.TimerHandle | None = None
        self._handle_when = 0.0
        self.stopped = 0  # stopped watchdogs still in the heap (an upper bound)

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Sweeper:
        global _last_loop, _last_sweeper
        if _last_loop is not None and _last_loop() is loop and _last_sweeper is not None:
            return _last_sweeper  # the common case: the process's one loop, asked again
        sweeper = _sweepers.get(loop)
        if sweeper is None:
            sweeper = _sweepers[loop] = cls(loop)
        _last_loop, _last_sweeper = weakref.ref(loop), sweeper
        return sweeper

    def add(self, watchdog: Watchdog, when: float) -> None:
        heap = self._heap
        if self.stopped > len(heap) // 2 and len(heap) >= _COMPACT_AT:
            self._compact()
        heapq.heappush(heap, (when, next(self._seq), watchdog))
        if self._handle is None or when < self._handle_when:
            self._arm(when)

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._loop.call_at(when, self._fire)
        self._handle_when = when

    def _compact(self) -> None:
        self._heap = [entry for entry in self._heap if not entry[2].stopped]
        heapq.heapify(self._heap)
        self.stopped = 0

    def _fire(self) -> None:
        self._handle = None
        heap = self._heap
        now = self._loop.time()
        while heap and heap[0][0] <= now:
            _, _, watchdog = heapq.heappop(heap)
            if watchdog.stopped:
                if self.stopped > 0:
                    self.stopped -= 1
                continue
            if watchdog._when > now:  # pushed since: back in at its new deadline
                heapq.heappush(heap, (watchdog._when, next(self._seq), watchdog))
                continue
            if watchdog.moving is not None and _still_moving(watchdog.moving):
                # progress no push saw: a stall bound more
                watchdog._when = now + watchdog.idle
                heapq.heappush(heap, (watchdog._when, next(self._seq), watchdog))
                continue
            watchdog.stopped = True  # fired: out of the heap until took_back() re-adds it
            watchdog._expire()
        if heap:
            self._arm(heap[0][0])


def _still_moving(moving: Callable[[], bool]) -> bool:
    """Ask a watchdog's hook; one that fails says no (the sweeper's timer must go on)."""
    try:
        return moving()
    except Exception:
        log.exception("a request's progress check failed; the request is cut as stalled")
        return False


_sweepers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Sweeper] = (
    weakref.WeakKeyDictionary())
# the loop asked for last and its sweeper (WeakKeyDictionary.get is Python code)
_last_loop: weakref.ref[asyncio.AbstractEventLoop] | None = None
_last_sweeper: _Sweeper | None = None
