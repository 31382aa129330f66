"""sidecar.log_guard: aiohttp's traceback per malformed request becomes a count and one line
per interval; other records pass untouched."""

from __future__ import annotations

import logging

from aiohttp import http_exceptions

from sidecar.log_guard import KINDS, MalformedRequestLog, kind_of


def record(exc: BaseException | None, msg: str = "Error handling request") -> logging.LogRecord:
    return logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, msg, (),
                             (type(exc), exc, None) if exc else None)


def test_one_line_per_interval_and_every_one_counted() -> None:
    counted: list[str] = []
    now = [100.0]
    guard = MalformedRequestLog(counted.append, interval=60.0, clock=lambda: now[0])
    bad = http_exceptions.BadHttpMessage("Missing 'Host' header in request.")
    first = record(bad)
    assert guard.filter(first)  # the first one is told, without its traceback
    assert first.levelno == logging.WARNING and first.exc_info is None
    assert "bad-message" in first.getMessage()
    assert [guard.filter(record(bad)) for _ in range(5)] == [False] * 5
    now[0] += 61.0
    later = record(http_exceptions.InvalidURLError("bad url"))
    assert guard.filter(later)
    assert later.getMessage().startswith("refused 6 malformed request(s)")
    assert counted == ["bad-message"] * 6 + ["bad-target"]


def test_other_records_pass_unchanged() -> None:
    guard = MalformedRequestLog(lambda kind: None)
    plain = record(None, "something else")
    crash = record(RuntimeError("a bug"))
    assert guard.filter(plain) and guard.filter(crash)
    assert crash.levelno == logging.ERROR and crash.exc_info is not None


def test_kinds_are_bounded() -> None:
    assert kind_of(http_exceptions.LineTooLong("x", "8190")) == "too-long"
    assert kind_of(ValueError()) is None
    assert len(KINDS) <= 10
