"""wire.logs: the services' log lines, plain or one JSON object a line."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from wire import logs


@pytest.fixture
def root() -> Iterator[logging.Logger]:
    """The root logger, its handlers and level put back after the test."""
    logger = logging.getLogger()
    handlers, level = logger.handlers[:], logger.level
    logger.handlers = []
    try:
        yield logger
    finally:
        logger.handlers, logger.level = handlers, level


def test_json_lines_hold_time_level_logger_message_and_the_traceback(
        root: logging.Logger) -> None:
    out = io.StringIO()
    logs.configure("INFO", "json", stream=out)
    log = logging.getLogger("sidecar.test")
    log.debug("not at INFO")
    log.info("two\nlines, «unicode» and %s", "args")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # a message with a line break, a traceback: still one line each
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "INFO" and first["logger"] == "sidecar.test"
    assert first["message"] == "two\nlines, «unicode» and args"
    assert first["time"].endswith("Z") and first["time"][10] == "T"
    assert len(first["time"]) == len("2026-12-05T13:09:19.123Z")
    assert "exception" not in first
    assert second["level"] == "ERROR" and second["message"] == "failed"
    assert second["exception"].startswith("Traceback") and "RuntimeError: boom" in second[
        "exception"]


def test_plain_lines_are_the_default_format(root: logging.Logger) -> None:
    out = io.StringIO()
    logs.configure("INFO", "plain", stream=out)
    logging.getLogger("signaler.service").warning("careful")
    assert out.getvalue().rstrip().endswith(" WARNING signaler.service: careful")


def test_an_unknown_format_is_refused(root: logging.Logger) -> None:
    with pytest.raises(ValueError, match="plain, json"):
        logs.configure("INFO", "xml")


def test_a_bad_level_from_the_environment_is_named_as_such(
        root: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    # The stranger's finding: EQUILIBRIUM_LOG_LEVEL=verbose was reported as a bad
    # EQUILIBRIUM_LOG_FORMAT, and a lower-case `debug` was refused
    assert not logs.start("equilibrium sidecar", "verbose", "plain")
    err = capsys.readouterr().err
    assert err.startswith("equilibrium sidecar: EQUILIBRIUM_LOG_LEVEL: log level must be one")
    assert logs.start("equilibrium sidecar", "debug", "plain")
    assert root.level == logging.DEBUG
    assert logs.start("equilibrium sidecar", "WARN", "plain")  # logging's names, as before
    assert root.level == logging.WARNING
    assert not logs.start("equilibrium sidecar", "INFO", "xml")
    assert capsys.readouterr().err.startswith("equilibrium sidecar: EQUILIBRIUM_LOG_FORMAT:")


def test_the_level_option_takes_any_case_and_its_default_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    monkeypatch.setenv(logs.LEVEL_ENV, "warning")
    parser = argparse.ArgumentParser()
    logs.add_level_option(parser)
    assert parser.parse_args([]).log_level == "WARNING"
    assert parser.parse_args(["--log-level", "debug"]).log_level == "DEBUG"
    monkeypatch.setenv(logs.LEVEL_ENV, " ")  # empty counts as unset
    parser = argparse.ArgumentParser()
    logs.add_level_option(parser)
    assert parser.parse_args([]).log_level == "INFO"
