"""Log lines, as every service writes them to stderr (docs/operations.md, "Logs").

``plain`` (the default) is for people: ``2026-12-05 13:09:19,123 INFO sidecar.runner:
message``. ``json`` is for a log pipeline (Loki, Elasticsearch, Cloud Logging): one JSON
object a line, with ``time`` (RFC 3339 in UTC, milliseconds, ``Z``), ``level``, ``logger``,
``message``, and ``exception`` (the traceback's text) when the line carries one; a message
with line breaks stays one line. Unversioned: fields are only ever added.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Final, TextIO

FORMATS: Final = ("plain", "json")
ENV: Final = "EQUILIBRIUM_LOG_FORMAT"
LEVEL_ENV: Final = "EQUILIBRIUM_LOG_LEVEL"
LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
"""The levels ``--log-level`` offers; the environment may also use ``logging``'s other names
for them (WARN, FATAL), as before it was checked."""
PLAIN: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object a record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, str] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False)


_configured = "plain"


def configure(level: str | int, log_format: str, *, plain: str = PLAIN,
              stream: TextIO | None = None) -> None:
    """The root logger writes ``log_format`` lines (one of :data:`FORMATS`) at ``level``."""
    global _configured
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(plain))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    _configured = log_format


def start(program: str, level: str | int, log_format: str, *, plain: str = PLAIN) -> bool:
    """:func:`configure` for a command (``program``: its name in the message): False, the
    reason printed on stderr, for a level that is none of :data:`LEVELS` or a format that is
    none of :data:`FORMATS` (from the environment: argparse checks only flags)."""
    if isinstance(level, str):
        name = level.strip().upper()
        if not isinstance(logging.getLevelNamesMapping().get(name), int) or name == "NOTSET":
            print(f"{program}: {LEVEL_ENV}: log level must be one of {', '.join(LEVELS)}, "
                  f"got {level!r}", file=sys.stderr)
            return False
        level = name
    try:
        configure(level, log_format, plain=plain)
    except ValueError as exc:
        print(f"{program}: {ENV}: {exc}", file=sys.stderr)
        return False
    return True


def add_level_option(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` (any case; its default from :data:`LEVEL_ENV`, checked by
    :func:`start`), for a service's command."""
    parser.add_argument(
        "--log-level", type=str.upper, choices=LEVELS,
        default=os.environ.get(LEVEL_ENV, "").strip() or "INFO",  # empty: unset
        help=f"the least severe lines written; env {LEVEL_ENV} (default INFO)")


def current() -> str:
    """The format :func:`configure` set last (``plain`` before)."""
    return _configured


def fatal(message: str) -> None:
    """A service's last word before it exits (bad configuration, a port in use): printed on
    stderr as it always was, or, with ``json``, as one more JSON line (level ERROR), so the
    line that explains a crash loop is one the log pipeline can read."""
    if _configured == "json":
        logging.getLogger("equilibrium").error("%s", message)
    else:
        print(message, file=sys.stderr)


def add_option(parser: argparse.ArgumentParser, *, inherited: bool = False) -> None:
    """``--log-format plain|json`` (its default from :data:`ENV`), for a service's command;
    ``inherited``: a subcommand's copy of its parent's option, which leaves the parent's
    value alone when not given again (``injector --log-format json controller``)."""
    parser.add_argument(
        "--log-format", choices=FORMATS,
        default=argparse.SUPPRESS if inherited else os.environ.get(ENV, "plain"),
        help=f"stderr lines for people (plain) or for a log pipeline (json: one object a "
             f"line, UTC times); env {ENV} (default plain)")
