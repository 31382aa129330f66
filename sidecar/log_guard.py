"""Malformed requests are counted, not logged with a traceback each.

aiohttp's HTTP/1.1 server logs every request it cannot parse (a bad method after the first
request, a bad target, a header without a colon, a missing ``Host``, a line too long, bad
framing) at ERROR with a full traceback, about fifteen lines each: anyone who can reach a
listener can fill the sidecar's log, and the container runtime's disk, at wire speed. The
client already got its 400; what an operator needs is how many and of what kind.

Owns :class:`MalformedRequestLog`, a filter on the ``aiohttp.server`` logger: a record whose
exception is one of aiohttp's HTTP parsing errors is counted by kind (the
``equilibrium_malformed_requests_total`` counter) and dropped, except one WARNING line per
interval without a traceback that says how many were refused since the last one. Every other
record passes unchanged. It must not parse, answer or refuse anything itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from aiohttp import http_exceptions

SERVER_LOGGER = "aiohttp.server"
DEFAULT_INTERVAL = 60.0  # seconds between two summary lines

# aiohttp's parsing errors, most specific first, and the kind each is counted under
_KINDS: tuple[tuple[type[BaseException], str], ...] = (
    (http_exceptions.BadHttpMethod, "bad-method"),
    (http_exceptions.InvalidURLError, "bad-target"),
    (http_exceptions.LineTooLong, "too-long"),
    (http_exceptions.InvalidHeader, "bad-header"),
    (http_exceptions.BadStatusLine, "bad-request-line"),
    (http_exceptions.TransferEncodingError, "bad-framing"),
    (http_exceptions.ContentLengthError, "bad-framing"),
    (http_exceptions.BadHttpMessage, "bad-message"),
    (http_exceptions.HttpProcessingError, "other"),
)
KINDS = tuple(dict.fromkeys(kind for _, kind in _KINDS))


def kind_of(exc: BaseException) -> str | None:
    """The kind a parsing error is counted under, or None if it is not one."""
    for cls, kind in _KINDS:
        if isinstance(exc, cls):
            return kind
    return None


class MalformedRequestLog(logging.Filter):
    """Count aiohttp's malformed-request records and let one line through per ``interval``."""

    def __init__(self, count: Callable[[str], None], *, interval: float = DEFAULT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._count, self._interval, self._clock = count, interval, clock
        self._since_line = 0
        self._last_line: float | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        kind = kind_of(exc) if exc is not None else None
        if kind is None:
            return True
        self._count(kind)
        self._since_line += 1
        now = self._clock()
        if self._last_line is not None and now - self._last_line < self._interval:
            return False
        message = str(exc).replace("\n", " ").strip()[:200]
        record.msg = ("refused %d malformed request(s) since the last such line (counted in "
                      "equilibrium_malformed_requests_total); this one: %s: %s")
        record.args = (self._since_line, kind, message)
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        self._since_line, self._last_line = 0, now
        return True


def install(count: Callable[[str], None], *, interval: float = DEFAULT_INTERVAL
            ) -> Callable[[], None]:
    """Attach a :class:`MalformedRequestLog` to aiohttp's server logger; returns its removal."""
    guard = MalformedRequestLog(count, interval=interval)
    logger = logging.getLogger(SERVER_LOGGER)
    logger.addFilter(guard)
    return lambda: logger.removeFilter(guard)
