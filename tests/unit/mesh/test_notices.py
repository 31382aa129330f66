"""mesh.notices: the first occurrence is logged, then at most one line per interval."""

from __future__ import annotations

from mesh.notices import NoticeThrottle


def test_first_then_once_per_interval_with_the_count_held_back() -> None:
    throttle = NoticeThrottle(interval=60.0)
    assert throttle.due(("orders", "WRONGTYPE"), 0.0) == 0
    assert [throttle.due(("orders", "WRONGTYPE"), t) for t in (1.0, 30.0, 59.0)] == [None] * 3
    assert throttle.due(("payments", "WRONGTYPE"), 1.0) == 0  # another key: its own line
    assert throttle.due(("orders", "WRONGTYPE"), 60.0) == 3
    assert throttle.due(("orders", "WRONGTYPE"), 61.0) is None


def test_memory_is_bounded() -> None:
    throttle = NoticeThrottle(interval=60.0, max_keys=10)
    for i in range(1000):
        throttle.due(i, 0.0)
    assert len(throttle._last) == 10
