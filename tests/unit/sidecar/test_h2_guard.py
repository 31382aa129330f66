"""sidecar.h2_guard: the per-connection frame budgets (token buckets on a given clock)."""

from __future__ import annotations

import pytest

from sidecar.h2_guard import (
    DEFAULT_ALLOWANCES,
    DEFAULT_BUDGETS,
    EARNED_KINDS,
    KINDS,
    PING,
    PRIORITY,
    RAPID_RESET,
    SETTINGS,
    TIMED_KINDS,
    WINDOW_UPDATE,
    Allowance,
    Budget,
    FloodGuard,
    FrameBudget,
)


def test_a_burst_is_allowed_then_refused() -> None:
    bucket = FrameBudget(Budget(rate=1.0, burst=3), now=0.0)
    assert [bucket.spend(0.0) for _ in range(4)] == [True, True, True, False]


def test_the_budget_refills_at_its_rate_up_to_the_burst() -> None:
    bucket = FrameBudget(Budget(rate=2.0, burst=3), now=0.0)
    for _ in range(3):
        assert bucket.spend(0.0)
    assert not bucket.spend(0.1)  # 0.2 of a token back: not enough
    assert bucket.spend(0.5)  # one token back
    assert not bucket.spend(0.5)
    assert [bucket.spend(100.0) for _ in range(4)] == [True, True, True, False]  # capped


def test_a_steady_rate_within_the_budget_never_runs_out() -> None:
    bucket = FrameBudget(Budget(rate=10.0, burst=5), now=0.0)
    assert all(bucket.spend(i * 0.1) for i in range(1000))


def test_a_clock_going_back_gives_nothing() -> None:
    bucket = FrameBudget(Budget(rate=10.0, burst=1), now=5.0)
    assert bucket.spend(5.0)
    assert not bucket.spend(1.0)
    assert not bucket.spend(1.05)


def test_kinds_are_counted_apart() -> None:
    guard = FloodGuard(0.0, {PING: Budget(rate=0.0, burst=2), SETTINGS: Budget(0.0, 1)})
    assert guard.spend(PING, 0.0) and guard.spend(PING, 0.0)
    assert not guard.spend(PING, 0.0)
    assert guard.spend(SETTINGS, 0.0)
    assert not guard.spend(SETTINGS, 0.0)
    assert guard.spend("unknown", 0.0)  # no budget: not limited


def test_the_defaults_cover_every_kind() -> None:
    assert set(DEFAULT_BUDGETS) == set(TIMED_KINDS)
    assert set(DEFAULT_ALLOWANCES) == set(EARNED_KINDS)
    assert set(TIMED_KINDS) & set(EARNED_KINDS) == set()
    assert set(TIMED_KINDS) | set(EARNED_KINDS) == set(KINDS)
    guard = FloodGuard(0.0)
    assert sum(guard.spend(RAPID_RESET, 0.0) for _ in range(1000)) == 500


def test_rapid_resets_are_allowed_as_many_as_the_calls_answered_plus_500() -> None:
    # A peer sidecar's pooled connection relays its apps' cancellations (a deadline burst,
    # hedging's losers) beside their finished calls: not a flood however fast they come,
    # while resets that outnumber the calls let finish (the CVE-2023-44487 pattern) are.
    guard = FloodGuard(0.0)
    for i in range(2000):  # a call answered, a call cancelled, 100 of each a second
        guard.earn(RAPID_RESET)
        assert guard.spend(RAPID_RESET, i / 100)
    assert sum(guard.spend(RAPID_RESET, 20.0 + i / 100) for i in range(1000)) == 500


def test_a_kind_with_an_allowance_and_a_budget_must_pass_both() -> None:
    guard = FloodGuard(0.0, {SETTINGS: Budget(rate=0.0, burst=3)},
                       {SETTINGS: Allowance(base=5, per_unit=1)})
    assert sum(guard.spend(SETTINGS, 0.0) for _ in range(10)) == 3  # the bucket first
    guard = FloodGuard(0.0, {SETTINGS: Budget(rate=0.0, burst=30)},
                       {SETTINGS: Allowance(base=5, per_unit=1)})
    assert sum(guard.spend(SETTINGS, 0.0) for _ in range(10)) == 5  # the allowance first


@pytest.mark.parametrize(("rate", "burst"), [(-1.0, 5.0), (1.0, 0.5)])
def test_a_budget_that_allows_nothing_is_an_error(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="budget"):
        Budget(rate=rate, burst=burst)


def test_an_allowance_is_its_base_until_the_connection_earns_more() -> None:
    guard = FloodGuard(0.0, {}, {PRIORITY: Allowance(base=3, per_unit=2)})
    assert [guard.spend(PRIORITY, 0.0) for _ in range(4)] == [True, True, True, False]
    guard.earn(PRIORITY)  # one stream opened: 3 + 2 frames in all, the refused one counted
    assert [guard.spend(PRIORITY, 0.0) for _ in range(2)] == [True, False]
    guard.earn(PRIORITY, 2)  # 3 + 2 × 3 = 9 in all, 6 counted
    assert [guard.spend(PRIORITY, 9.0) for _ in range(4)] == [True, True, True, False]


def test_time_alone_earns_no_allowance() -> None:
    guard = FloodGuard(0.0, {}, {WINDOW_UPDATE: Allowance(base=2, per_unit=10)})
    assert guard.spend(WINDOW_UPDATE, 0.0) and guard.spend(WINDOW_UPDATE, 0.0)
    assert not guard.spend(WINDOW_UPDATE, 3600.0)
    guard.earn(PING)  # a kind without an allowance: nothing happens
    assert not guard.spend(WINDOW_UPDATE, 3600.0)


def test_the_default_window_update_allowance_follows_the_data_sent() -> None:
    guard = FloodGuard(0.0)
    assert sum(guard.spend(WINDOW_UPDATE, 0.0) for _ in range(1000)) == 100
    guard = FloodGuard(0.0)
    for _ in range(1000):  # a download: each DATA frame sent, the app's two updates
        guard.earn(WINDOW_UPDATE)
        assert guard.spend(WINDOW_UPDATE, 0.0) and guard.spend(WINDOW_UPDATE, 0.0)


@pytest.mark.parametrize(("base", "per_unit"), [(0, 5), (1, -1)])
def test_an_allowance_that_allows_nothing_is_an_error(base: int, per_unit: int) -> None:
    with pytest.raises(ValueError, match="allowance"):
        Allowance(base=base, per_unit=per_unit)
