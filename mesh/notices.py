"""When a condition that keeps happening is worth another log line: once, then once an interval.

Owns :class:`NoticeThrottle`: the first occurrence of each key (an upstream and what went wrong
with it) is logged at once; later ones are counted and logged at most once per ``interval``
seconds with how many were folded in. Bad data that recurs every epoch (a wrong-typed Redis
key, a forged stream) is then one line a minute, not one an epoch, while its metric counts
every occurrence. Pure: ``now`` is passed in; nothing is logged here. Memory is bounded by
``max_keys`` (the least recently noticed key is forgotten first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class NoticeThrottle:
    """Decides which occurrences of a recurring condition are logged (see the module)."""

    def __init__(self, interval: float = 60.0, max_keys: int = 1024) -> None:
        if interval < 0 or max_keys < 1:
            raise ValueError("interval must be >= 0 and max_keys >= 1")
        self.interval = interval
        self.max_keys = max_keys
        self._last: OrderedDict[Hashable, tuple[float, int]] = OrderedDict()  # logged at, held

    def due(self, key: Hashable, now: float) -> int | None:
        """Record one occurrence of ``key`` at ``now``: None while it should stay quiet, else
        how many earlier occurrences were held back since the last line (0 the first time)."""
        held = self._last.get(key)
        if held is not None and now - held[0] < self.interval:
            self._last[key] = (held[0], held[1] + 1)
            return None
        self._last[key] = (now, 0)
        self._last.move_to_end(key)
        while len(self._last) > self.max_keys:
            self._last.popitem(last=False)
        return 0 if held is None else held[1]
