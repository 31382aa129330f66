"""Log lines for failures that recur per request, throttled per kind.

Owns :class:`NoticeLog`: a logger, a clock and a :class:`mesh.notices.NoticeThrottle`. The
first occurrence of a key (an upstream, an endpoint, what went wrong) is logged at once, later
ones at most once per interval with how many were folded in; the metrics count each. A pod
that breaks off every answer would otherwise write a line per request at INFO, which
docs/operations.md says the sidecar never does (a stranger counted 163 lines in 20 s).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

from mesh.notices import NoticeThrottle

UPSTREAM_NOTICE_INTERVAL = 10.0  # seconds between two lines of one kind of failure


class NoticeLog:
    """``notice(key, message)``: log ``message`` at ``level`` unless ``key`` was logged
    lately."""

    def __init__(self, logger: logging.Logger, clock: Callable[[], float],
                 interval: float = UPSTREAM_NOTICE_INTERVAL, level: int = logging.INFO) -> None:
        self._log, self._clock, self._level = logger, clock, level
        self._throttle = NoticeThrottle(interval)

    def notice(self, key: Hashable, message: str) -> None:
        held = self._throttle.due(key, self._clock())
        if held is not None:
            self._log.log(self._level, "%s%s", message,
                          f" ({held} more like it since the last report)" if held else "")
