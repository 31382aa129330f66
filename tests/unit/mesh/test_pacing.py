"""Share-preserving in-flight pacing (mesh.pacing) and its use by the regret policy while it
follows a recommendation."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.pacing import CreditPacer
from mesh.policies import RegretMatchingPolicy, make_policy
from mesh.policy import Outcome
from mesh.profiles import get_profile


def pacer(weights: list[float], window: float = 4.0) -> CreditPacer:
    p = CreditPacer(window=window)
    p.resize([None] * len(weights))
    p.set_strategy(weights)
    return p


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0.0, 1.0), min_size=2, max_size=6).filter(lambda w: sum(w) > 0.05),
    st.integers(0, 2**32 - 1),
)
def test_every_endpoint_gets_its_share_within_the_window(weights: list[float], seed: int) -> None:
    rng = random.Random(seed)
    k = len(weights)
    p = pacer(weights)
    share = [w / sum(weights) for w in weights]
    counts = [0] * k
    for n in range(1, 2001):
        i = p.choose([rng.uniform(0.001, 5.0) for _ in range(k)])  # any pattern of costs
        assert i is not None and share[i] > 0
        counts[i] += 1
        for j in range(k):
            assert abs(counts[j] - share[j] * n) <= p.window + 1.0


def test_a_request_goes_where_it_should_finish_first() -> None:
    p = pacer([0.5, 0.5])
    assert p.choose([0.030, 0.010]) == 1
    assert p.choose([0.010, 0.030]) == 0
    # the policy's cost is peak-EWMA x (in flight + 1): a 10 ms endpoint with two requests out
    # (30 ms) loses to an idle 25 ms one, and wins against it once it is idle
    q = pacer([0.5, 0.5])
    assert q.choose([0.010 * 3, 0.025 * 1]) == 1
    assert q.choose([0.010 * 1, 0.025 * 2]) == 0


def test_an_endpoint_owed_the_whole_window_is_served_however_busy() -> None:
    p = pacer([0.5, 0.5], window=2.0)
    picks = [p.choose([5.0, 0.001]) for _ in range(8)]
    assert picks.count(0) >= 2  # endpoint 0 is never left more than ~2 requests behind
    assert picks.count(1) <= 6


def test_no_weight_no_request_and_no_strategy_no_choice() -> None:
    p = pacer([0.0, 1.0, 0.0])
    assert {p.choose([0.001, 9.0, 0.001]) for _ in range(20)} == {1}
    empty = CreditPacer()
    empty.resize([None, None])
    empty.set_strategy([0.0, 0.0])
    assert empty.choose([0.01, 0.01]) is None


def test_credit_survives_a_resize_of_the_endpoints_that_stay() -> None:
    p = pacer([0.5, 0.5])
    p.choose([9.0, 0.01])  # endpoint 1 served, endpoint 0 is owed
    owed = p.credit[0]
    p.resize([0, None])  # endpoint 0 stays, endpoint 1 is replaced
    assert p.credit[0] > 0 and p.credit[0] <= owed
    assert sum(p.credit) == pytest.approx(0.0)


def _drive(policy: RegretMatchingPolicy, seconds: float, rps: int, stuck: str | None,
           seed: int = 3) -> dict[str, int]:
    """Requests at ``rps``; each finishes after 5 ms except on ``stuck``, which holds every
    request until the end (its in-flight count only grows)."""
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    pending: list[tuple[float, str]] = []
    now, next_tick = 0.0, 0.5
    while now < seconds:
        for done_at, e in [x for x in pending if x[0] <= now]:
            pending.remove((done_at, e))
            policy.on_outcome(Outcome(e, 0.005, True, done_at))
        e = policy.pick(rng, now)
        assert e is not None
        policy.on_start(e, now)
        if e != stuck:
            pending.append((now + 0.005, e))
        counts[e] = counts.get(e, 0) + 1
        now += 1.0 / rps
        if now >= next_tick:
            policy.tick(now)
            next_tick += 0.5
    return counts


def _following(profile_window: float) -> RegretMatchingPolicy:
    profile = replace(get_profile("balanced"), pacing_window=profile_window)
    policy = make_policy("equilibrium", profile)
    assert isinstance(policy, RegretMatchingPolicy)
    policy.set_endpoints(["a", "b"], 0.0)
    policy.follow({"a": 0.5, "b": 0.5}, expires_at=1e9)
    for t in range(1, 30):  # let the herd guard's smoothing reach the recommendation
        policy.tick(t * 0.5)
    return policy


def test_following_keeps_the_recommended_split_while_pacing_requests() -> None:
    paced = _drive(_following(4.0), 20.0, 200, stuck="a")
    # "a" never answers, so it is always the busier one; pacing still sends it its half
    assert paced["a"] == pytest.approx(paced["b"], abs=12)


def _burst(policy: RegretMatchingPolicy, n: int = 40) -> list[str]:
    """``n`` picks at one instant, every request still in flight."""
    rng = random.Random(0)
    picks = []
    for _ in range(n):
        e = policy.pick(rng, 15.0)
        assert e is not None
        policy.on_start(e, 15.0)
        picks.append(e)
    return picks


def _local(window: float) -> RegretMatchingPolicy:
    policy = make_policy("equilibrium", replace(get_profile("balanced"), pacing_window=window))
    assert isinstance(policy, RegretMatchingPolicy)
    policy.set_endpoints(["a", "b"], 0.0)
    return policy


def test_pacing_orders_requests_while_following_only() -> None:
    paced, drawn = _burst(_following(4.0)), _burst(_following(0.0))
    assert paced != drawn
    # the paced burst alternates: every ten requests hold at least three for each endpoint
    assert all(paced[i:i + 10].count("a") >= 3 for i in range(0, 40, 10))
    assert all(paced[i:i + 10].count("b") >= 3 for i in range(0, 40, 10))
    # local learning draws from its weights unpaced: paced by cost, an endpoint that fails
    # fast (connection refused) looked cheapest and got calls past its exploration floor
    local = _local(4.0)
    assert not local.following
    assert _burst(local) == _burst(_local(0.0))


def test_a_new_follower_keeps_its_even_start_until_its_first_signal() -> None:
    def fresh() -> RegretMatchingPolicy:
        policy = make_policy("equilibrium", get_profile("balanced"))
        assert isinstance(policy, RegretMatchingPolicy)
        policy.set_endpoints(["fast", "slow"], 0.0)
        return policy

    def run(policy: RegretMatchingPolicy, start: float, end: float) -> None:
        rng, now = random.Random(1), start
        while now < end:
            e = policy.pick(rng, now)
            assert e is not None
            policy.on_start(e, now)
            latency = 0.005 if e == "fast" else 0.050
            policy.on_outcome(Outcome(e, latency, True, now + latency))
            now += 0.005
            if int(now / 0.5) != int((now - 0.005) / 0.5):
                policy.tick(now)

    waiting, alone = fresh(), fresh()
    waiting.await_signal(until=3.0)
    run(waiting, 0.0, 2.5)
    run(alone, 0.0, 2.5)
    assert waiting.snapshot().weights["fast"] == pytest.approx(0.5)  # held at its even start
    assert alone.snapshot().weights["fast"] > 0.6  # on its own it has moved to the fast one
    run(waiting, 2.5, 6.0)
    assert waiting.snapshot().weights["fast"] > 0.6  # the wait is over: local learning
    # a recommendation ends the wait at once, and so does Redis failing (stop_following)
    signalled, failed = fresh(), fresh()
    signalled.await_signal(until=100.0)
    signalled.follow({"fast": 0.3, "slow": 0.7}, expires_at=100.0)
    failed.await_signal(until=100.0)
    failed.stop_following()
    run(signalled, 0.0, 5.0)
    run(failed, 0.0, 5.0)
    assert signalled.snapshot().weights["fast"] == pytest.approx(0.3, abs=0.02)
    assert failed.snapshot().weights["fast"] > 0.6
