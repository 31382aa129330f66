"""sidecar.notice_log: a failure that recurs per request is one line a while, not one each."""

from __future__ import annotations

import logging

import pytest

from sidecar.notice_log import UPSTREAM_NOTICE_INTERVAL, NoticeLog


def test_one_line_then_one_an_interval_with_how_many_were_folded_in(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    notices = NoticeLog(logging.getLogger("test.notices"), lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.notices"):
        for i in range(163):  # a stranger's count: a line each in 20 s before
            now[0] = i * 20.0 / 163
            notices.notice(("svc", "http://10.0.0.4:8080", "body-relay-failed"),
                           f"svc http://10.0.0.4:8080: body relay failed: #{i}")
        notices.notice(("svc", "http://10.0.0.5:8080", "body-relay-failed"), "another pod")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "svc http://10.0.0.4:8080: body relay failed: #0"
    assert UPSTREAM_NOTICE_INTERVAL == 10.0
    assert len(lines) == 3  # at 0 s, at the first past 10 s, and the other pod's
    assert lines[1].endswith("(81 more like it since the last report)"), lines[1]
    assert lines[-1] == "another pod"  # its own key: said at once
