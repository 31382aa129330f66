"""sidecar.inbound_site: the accept-error throttle and the cap derived from the file limit."""

from __future__ import annotations

import asyncio
import logging
import resource

import pytest
from prometheus_client import CollectorRegistry

from sidecar.inbound_site import effective_cap, quiet_accept_errors
from sidecar.metrics import H2Metrics, InboundListenerMetrics


def test_the_cap_is_at_most_half_the_file_limit() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert effective_cap(10**9) == max(1, soft // 2)
    assert effective_cap(3) == min(3, soft // 2)


def test_accept_errors_are_counted_and_logged_once_per_interval(
        caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.new_event_loop()
    try:
        seen: list[dict[str, object]] = []
        loop.set_exception_handler(lambda _loop, context: seen.append(context))
        registry = CollectorRegistry()
        metrics = InboundListenerMetrics(registry, H2Metrics(registry))
        now = [100.0]
        quiet_accept_errors(loop, metrics, interval=10.0, clock=lambda: now[0])
        quiet_accept_errors(loop, metrics, interval=10.0, clock=lambda: now[0])  # once only
        handler = loop.get_exception_handler()
        assert handler is not None
        error = {"message": "socket.accept() out of system resource",
                 "exception": OSError(24, "Too many open files")}
        with caplog.at_level(logging.WARNING, logger="sidecar.inbound_site"):
            for step in range(2000):  # a storm: 2,000 failures over 20 s
                now[0] = 100.0 + step * 0.01
                handler(loop, dict(error))
        assert metrics.accept_errors._value.get() == 2000
        assert len(caplog.records) == 2  # at 100 s and at 110 s
        assert not any(r.exc_info for r in caplog.records)
        handler(loop, {"message": "something else"})
        assert seen == [{"message": "something else"}]  # passed on untouched
    finally:
        loop.close()
