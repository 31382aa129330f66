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
from mesh.probes import ProbeReport
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


def _drive(policy: RegretMatchingPolicy, seconds: float, rps: int, busy: str | None,
           seed: int = 3) -> dict[str, int]:
    """Requests at ``rps``; each finishes after 5 ms except on ``busy``, where each takes
    15 ms (three times as long: under the 4x that lets a sidecar's own evidence overrule a
    recommendation), so it always holds more of them in flight."""
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
        pending.append((now + (0.015 if e == busy else 0.005), e))
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
    paced = _drive(_following(4.0), 20.0, 200, busy="a")
    # "a" answers slower, so it is always the busier one; pacing still sends it its half
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


def test_pacing_orders_requests_in_local_learning_as_while_following() -> None:
    paced, drawn = _burst(_following(4.0)), _burst(_following(0.0))
    assert paced != drawn
    # the paced burst alternates: every ten requests hold at least three for each endpoint
    assert all(paced[i:i + 10].count("a") >= 3 for i in range(0, 40, 10))
    assert all(paced[i:i + 10].count("b") >= 3 for i in range(0, 40, 10))
    local = _burst(_local(4.0))
    assert not _local(4.0).following
    assert all(local[i:i + 10].count("a") >= 3 for i in range(0, 40, 10))
    assert all(local[i:i + 10].count("b") >= 3 for i in range(0, 40, 10))


def test_an_endpoint_left_out_of_the_choice_earns_nothing_and_forfeits_its_credit() -> None:
    p = pacer([0.5, 0.3, 0.2])
    p.credit = [0.0, 0.0, 3.9]  # endpoint 2 was owed almost the whole window
    # endpoint 2 is out: 0 and 1 share the request 0.5/0.8 and 0.3/0.8; 0 is cheaper
    assert p.choose([1.0, 2.0, 0.0], [True, True, False]) == 0
    assert p.credit == pytest.approx([0.625 - 1.0, 0.375, 0.0])
    # back in, it is owed nothing: it wins only on cost, as any endpoint
    assert p.choose([1.0, 2.0, 3.0]) == 0  # credits 0.125, 0.675, 0.2: cheapest wins
    assert p.choose([9.0, 9.0, 9.0], [False, False, False]) is None


class _Draws(random.Random):
    """A generator whose ``random()`` returns the given values, in order."""

    def __init__(self, values: list[float]) -> None:
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


def test_a_request_drawn_for_an_endpoint_at_its_floor_goes_there_whatever_it_costs() -> None:
    policy = _following(4.0)
    policy.set_endpoints(["a", "b", "c"], 15.0)
    policy.follow({"a": 0.5, "b": 0.5, "c": 0.0}, expires_at=1e9)
    for t in range(31, 80):
        policy.tick(t * 0.5)
    w = policy.snapshot().weights
    assert w["c"] == pytest.approx(0.005)  # the exploration floor (not covered by probes)
    # the draw's cumulative weights: a [0, 0.4975), b [0.4975, 0.995), c [0.995, 1)
    rng = _Draws([0.999, 0.1, 0.6, 0.999])
    assert policy.pick(rng, 40.0) == "c"  # drawn at its floor: sent there, not re-chosen
    policy.on_start("a", 40.0)
    policy.on_start("a", 40.0)
    # a holds two of ours (30 ms x 3), b none but a probe says the callee holds three more
    # (30 ms x 4): a draw for either is paced to a, where it should finish first
    policy.on_probe("b", ProbeReport(3, 0.01, 0.01, 0.01, 20, 0.0, 8, False), 40.0)
    assert policy.stats["a"].finish_cost(40.0) < policy.stats["b"].finish_cost(40.0)
    assert policy.pick(rng, 40.0) == "a"
    assert policy.pick(rng, 40.0) == "a"  # drawn for b, paced to a
    # c failing is at its floor either way; it is never paced, so never owed a burst
    assert policy.pick(rng, 40.0) == "c"


def _pod_goes_down(seed: int, window: float, eject_after: int = 5) -> tuple[int, int]:
    """tests/integration/test_grpc_outbound.py's pod that goes down, on the pure core: 30
    calls one after another over three pods answering in 2 ms, then pod c refuses
    connections (fails in 0.2 ms; the call is sent again to another pod), 40 calls 20 ms
    apart, a 1 s pause, 40 more calls. Returns c's picks in the second batch and the third."""
    profile = replace(get_profile("balanced"), pacing_window=window,
                      eject_after_failures=eject_after)
    policy = make_policy("equilibrium", profile)
    policy.set_endpoints(["a", "b", "c"], 0.0)
    rng = random.Random(seed)
    now, next_tick, down = 0.0, 0.5, False
    picks = [0, 0, 0]

    def call(batch: int) -> None:
        nonlocal now, next_tick
        tried: frozenset[str] = frozenset()
        while True:
            e = policy.pick(rng, now, tried)
            assert e is not None
            policy.on_start(e, now)
            if down and e == "c":
                picks[batch] += 1
                now += 0.0002
                policy.on_outcome(Outcome(e, 0.0002, False, now))
                tried = tried | {e}
                continue
            now += 0.002
            policy.on_outcome(Outcome(e, 0.002, True, now))
            break

    def advance(seconds: float) -> None:
        nonlocal now, next_tick
        now += seconds
        while next_tick <= now:
            policy.tick(next_tick)
            next_tick += 0.5

    for _ in range(30):
        call(0)
        advance(0.001)
    down = True
    for _ in range(40):
        call(1)
        advance(0.02)
    advance(1.0)
    for _ in range(40):
        call(2)
        advance(0.0)
    return picks[1], picks[2]


@pytest.mark.parametrize("seed", range(12))
def test_a_pod_that_fails_fast_gets_no_calls_past_its_share(seed: int) -> None:
    tried, after = _pod_goes_down(seed, window=4.0)
    assert tried >= 1  # it was tried and found down
    assert after == 0  # ejected: five refusals in a row, drawn at random as unpaced
    # never ejected, it gets what drawing at random from the weights gives it (the same
    # draws: equal up to the weights' drift), not what the pacer would owe it
    paced = _pod_goes_down(seed, window=4.0, eject_after=1000)
    drawn = _pod_goes_down(seed, window=0.0, eject_after=1000)
    assert paced[0] <= drawn[0] + 2 and paced[1] <= drawn[1] + 2
