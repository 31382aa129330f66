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


def configure(level: str | int, log_format: str, *, plain: str = PLAIN,
              stream: TextIO | None = None) -> None:
    """The root logger writes ``log_format`` lines (one of :data:`FORMATS`) at ``level``."""
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(plain))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def add_option(parser: argparse.ArgumentParser) -> None:
    """``--log-format plain|json`` (its default from :data:`ENV`), for a service's command."""
    parser.add_argument(
        "--log-format", default=os.environ.get(ENV, "plain"), choices=FORMATS,
        help=f"stderr lines for people (plain) or for a log pipeline (json: one object a "
             f"line, UTC times); env {ENV} (default plain)")
