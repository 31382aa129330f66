"""The reputation book's aggregates, kept incrementally: O(changed callers) per read, not O(all).

Owns :class:`StandingsIndex`, what the inbound sidecar's periodic gauges and ``/debug/state``
read of :class:`mesh.reputation.ReputationBook` (how many callers are punished, the worst
reputation and level among the callers without a metric label of their own, the busiest
callers), updated only for the callers whose state changed since the last read. The book
records which callers changed (a set insert on the request path) and folds them in here
when read (:meth:`mesh.reputation.ReputationBook.gauge_digest`,
:meth:`~mesh.reputation.ReputationBook.snapshot`). At 10,000 callers the full scan this
replaces held the event loop for ~150 ms every 0.5 s (docs/benchmarks.md).

How: per caller the index keeps the values last folded in, and a version; counts per level and
of the punished are adjusted on each fold; the worst reputation and the busiest callers are
min-heaps with lazy deletion (an entry whose version is not the caller's current one is
stale and dropped when it surfaces; the heaps are rebuilt when stale entries outnumber live
ones, amortised O(1) per fold). "Busiest" orders callers by their recent requests, an
exponentially decayed count with one time constant ``tau`` for all: ``c * exp(-(now - t) /
tau)``. Its logarithm ``ln c + t / tau - now / tau`` orders callers the same at every ``now``,
so the heap key ``ln c + t / tau`` never needs refreshing while a caller is idle.

Pure: no clock, no I/O. :attr:`StandingsIndex.operations` counts the work done (entries
folded, heap pushes and pops), so tests can bound the work per read without timing it.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Collection
from dataclasses import dataclass

__all__ = ["IndexedStanding", "StandingsIndex"]


@dataclass(frozen=True, slots=True)
class IndexedStanding:
    """What the index keeps of one caller: the values folded in last, and their version."""

    reputation: float
    level: int
    punished: bool
    busy_key: float
    version: int


class StandingsIndex:
    """Counts and lazy heaps over every tracked caller (see the module docstring)."""

    def __init__(self, max_level: int) -> None:
        self._entries: dict[str, IndexedStanding] = {}
        self._levels = [0] * (max_level + 1)
        self.punished = 0
        self._worst: list[tuple[float, str, int]] = []  # (reputation, caller, version)
        self._busy: list[tuple[float, str, int]] = []  # (-busy_key, caller, version)
        self._version = 0
        self.operations = 0
        """Work done so far: entries folded in or removed, heap pushes and pops, rebuilds."""

    def __len__(self) -> int:
        return len(self._entries)

    def update(self, caller: str, reputation: float, level: int, punished: bool,
               busy_key: float) -> None:
        """Fold in ``caller``'s current values (a new caller, or one whose state changed)."""
        self._forget(caller)
        self._version += 1
        entry = IndexedStanding(reputation, level, punished, busy_key, self._version)
        self._entries[caller] = entry
        self._levels[level] += 1
        self.punished += punished
        heapq.heappush(self._worst, (reputation, caller, entry.version))
        heapq.heappush(self._busy, (-busy_key, caller, entry.version))
        self.operations += 3
        self._compact()

    def remove(self, caller: str) -> None:
        """``caller`` is no longer tracked (evicted or idle too long)."""
        self._forget(caller)
        self.operations += 1

    def _forget(self, caller: str) -> None:
        old = self._entries.pop(caller, None)
        if old is not None:
            self._levels[old.level] -= 1
            self.punished -= old.punished

    def _live(self, item: tuple[float, str, int]) -> bool:
        entry = self._entries.get(item[1])
        return entry is not None and entry.version == item[2]

    def _compact(self) -> None:
        """Rebuild a heap once its stale entries outnumber the live ones (amortised O(1))."""
        limit = 2 * len(self._entries) + 64
        for name in ("_worst", "_busy"):
            heap = getattr(self, name)
            if len(heap) > limit:
                fresh = [item for item in heap if self._live(item)]
                heapq.heapify(fresh)
                setattr(self, name, fresh)
                self.operations += len(heap)

    def _smallest(self, heap: list[tuple[float, str, int]], count: int,
                  skip: Collection[str] = ()) -> list[tuple[float, str, int]]:
        """The ``count`` smallest live entries not in ``skip``, in order; stale entries met on
        the way are dropped, the others are pushed back."""
        found: list[tuple[float, str, int]] = []
        kept: list[tuple[float, str, int]] = []
        while heap and len(found) < count:
            item = heapq.heappop(heap)
            self.operations += 1
            if not self._live(item):
                continue
            kept.append(item)
            if item[1] not in skip:
                found.append(item)
        for item in kept:
            heapq.heappush(heap, item)
        self.operations += len(kept)
        return found

    def worst_reputation(self, skip: Collection[str] = ()) -> float | None:
        """The lowest reputation among the callers not in ``skip`` (None if there is none).
        Costs the stale entries on top plus ``len(skip)`` at most."""
        found = self._smallest(self._worst, 1, skip)
        return found[0][0] if found else None

    def worst_level(self, skip: Collection[str] = ()) -> int:
        """The highest level among the callers not in ``skip`` (0 if there is none)."""
        counts = list(self._levels)
        for caller in skip:
            entry = self._entries.get(caller)
            if entry is not None:
                counts[entry.level] -= 1
        return max((level for level, n in enumerate(counts) if n > 0), default=0)

    def busiest(self, count: int) -> list[str]:
        """The ``count`` callers with the most recent requests, busiest first (ties by name)."""
        return [caller for _, caller, _ in self._smallest(self._busy, count)]

    def level(self, caller: str) -> int | None:
        entry = self._entries.get(caller)
        return None if entry is None else entry.level


def busy_key(parts: Collection[tuple[float, float]], tau: float) -> float:
    """The time-invariant order key of a decayed count ``sum(c * exp(-(now - t) / tau))`` over
    ``(c, t)`` parts: ``ln(sum(c * exp(t / tau)))``, computed without overflow; -inf if all
    counts are 0."""
    logs = [math.log(c) + t / tau for c, t in parts if c > 0]
    if not logs:
        return -math.inf
    top = max(logs)
    return top + math.log(math.fsum(math.exp(x - top) for x in logs))
