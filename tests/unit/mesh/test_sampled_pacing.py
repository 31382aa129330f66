"""Pacing for many endpoints at O(log k) a request (mesh.pacing.SampledPacer, CostOrder) and
the regret policy's switch to it past EXACT_PACING_ENDPOINTS endpoints."""

from __future__ import annotations

import random

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mesh.estimators import PROBE_FRESH
from mesh.pacing import EXACT_PACING_ENDPOINTS, CostOrder, CreditPacer, SampledPacer
from mesh.policies import RegretMatchingPolicy, make_policy
from mesh.policy import Outcome
from mesh.probes import ProbeReport
from mesh.profiles import get_profile


def sampled(weights: list[float], keys: list[float], window: float = 4.0,
            paced: list[bool] | None = None) -> SampledPacer:
    p = SampledPacer(window=window)
    p.resize([None] * len(weights))
    p.set_strategy(weights, paced if paced is not None else [True] * len(weights))
    p.order.reset(keys)
    return p


def exact_rule(p: SampledPacer, usable: list[bool]) -> int | None:
    """The rule over every endpoint, read from ``p``'s own credits after the request's earning:
    the endpoint that will fall ``window`` + 1 behind first (ties: the lower index) if it is
    owed the whole window already (-1: one of the owed), else the cheapest endpoint that can
    pay (ties: the lower index), as CreditPacer's rule."""
    k = len(p.rate)
    live = [i for i in range(k) if p.rate[i] > 0 and usable[i]]
    first = min(live, key=lambda i: ((p.window + 1.0 - p.credit(i)) / p.rate[i], i))
    if p.credit(first) >= p.window:
        return -1
    payers = [i for i in live if p.credit(i) - 1.0 >= -p.window]
    return min(payers, key=lambda i: (p.order.keys[i], i)) if payers else None


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 60), st.integers(0, 2**32 - 1))
def test_each_choice_is_the_exact_rule_over_the_same_credits(k: int, seed: int) -> None:
    rng = random.Random(seed)
    weights = [rng.random() for _ in range(k)]
    p = sampled(weights, [rng.random() for _ in range(k)])
    for _ in range(400):
        for _ in range(rng.randrange(3)):  # costs move as requests start and end
            p.order.update(rng.randrange(k), rng.random())
        p.paced += 1.0  # what choose() does first, to read the credits it sees
        expected = exact_rule(p, [True] * k)
        p.paced -= 1.0
        chosen = p.choose(lambda i: True, 0)
        assert chosen is not None
        if expected == -1:
            assert p.credit(chosen) >= p.window - 1.0 - 1e-9  # one owed the window, served
        else:
            assert chosen == expected


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(0.0, 1.0), min_size=2, max_size=40).filter(lambda w: sum(w) > 0.05),
    st.integers(0, 2**32 - 1),
)
@example([0.001953125, 6.103515625e-05, 0.03125, 0.015625, 0.00390625, 0.0625, 0.03125, 1.0,
          0.021484375], 1)  # window + 2.04
def test_every_endpoint_gets_its_share_within_the_window(weights: list[float], seed: int) -> None:
    rng = random.Random(seed)
    k = len(weights)
    p = sampled(weights, [1.0] * k)
    share = [w / sum(weights) for w in weights]
    counts = [0] * k
    for n in range(1, 2001):
        p.order.update(rng.randrange(k), rng.uniform(0.001, 5.0))  # any pattern of costs
        i = p.choose(lambda i: True, 0)
        assert i is not None and share[i] > 0
        counts[i] += 1
        for j in range(k):
            # within about window + 1 (a request or two more when several fall due together:
            # window + 2.04 was found, nine endpoints, eight small ones around one at 86 %)
            assert abs(counts[j] - share[j] * n) <= p.window + 3.0


def test_the_cheapest_goes_first_until_it_is_a_window_ahead_as_with_the_exact_pacer() -> None:
    costs = [0.1, 0.5, 0.2, 0.9]
    p = sampled([0.25] * 4, costs)
    picks = [p.choose(lambda i: True, 0) for _ in range(400)]
    # endpoint 0 may run 4 requests ahead of its quarter: it takes the first five, then the
    # next cheapest (2) takes over while 0 is set aside, and 0 returns once it can pay again
    assert picks[:6] == [0, 0, 0, 0, 0, 2]
    exact = CreditPacer(window=4.0)
    exact.resize([None] * 4)
    exact.set_strategy([0.25] * 4)
    assert picks == [exact.choose(costs) for _ in range(400)]
    assert all(abs(picks.count(i) - 100) <= 5 for i in range(4))


def test_an_unusable_endpoint_is_passed_over_and_forfeits_what_it_was_owed() -> None:
    p = sampled([0.5, 0.5], [0.1, 0.9])
    picks = [p.choose(lambda i: i == 1, 1) for _ in range(20)]
    assert set(picks) == {1}
    assert p.credit(0) <= p.window  # owed at most the window, never a burst
    assert [p.choose(lambda i: True, 0) for _ in range(4)].count(0) <= 4


def test_no_weight_no_request_and_no_strategy_no_choice() -> None:
    p = sampled([0.0, 1.0, 0.0], [0.001, 9.0, 0.001])
    assert {p.choose(lambda i: True, 0) for _ in range(20)} == {1}
    left_out = sampled([0.5, 0.5, 0.0], [0.1, 0.2, 0.0], paced=[True, False, True])
    assert {left_out.choose(lambda i: True, 0) for _ in range(20)} == {0}
    empty = SampledPacer()
    assert empty.choose(lambda i: True, 0) is None


def test_credit_survives_a_resize_of_the_endpoints_that_stay() -> None:
    p = sampled([0.5, 0.5], [0.9, 0.1])
    p.choose(lambda i: True, 0)  # endpoint 1 served, endpoint 0 is owed
    owed = p.credit(0)
    assert owed > 0
    p.resize([None, 0])  # endpoint 0 now at index 1, a new endpoint at 0
    assert p.credit(1) > p.credit(0)


def test_cost_order_skips_stale_keys_and_parks_on_request() -> None:
    order = CostOrder()
    order.reset([3.0, 1.0, 2.0])
    assert order.cheapest(lambda i: False, lambda i: True) == 1
    order.update(1, 5.0)
    assert order.cheapest(lambda i: False, lambda i: True) == 2
    assert order.cheapest(lambda i: i == 2, lambda i: True) == 0  # 2 parked on the way
    assert order.parked == [False, False, True]
    order.update(2, 0.5)  # a parked endpoint's key is kept, it stays out
    assert order.cheapest(lambda i: False, lambda i: True) == 0
    order.unpark(2)
    assert order.cheapest(lambda i: False, lambda i: True) == 2
    assert order.cheapest(lambda i: False, lambda i: i == 1) == 1  # refused ones go back
    assert order.cheapest(lambda i: False, lambda i: True) == 2
    for step in range(1000):  # stale entries do not pile up
        order.update(step % 3, float(step))
    assert len(order._heap) <= 4 * 3 + 64


def _policy(k: int) -> RegretMatchingPolicy:
    policy = make_policy("equilibrium", get_profile("balanced"))
    assert isinstance(policy, RegretMatchingPolicy)
    policy.set_endpoints([f"pod-{i}" for i in range(k)], 0.0)
    return policy


def test_the_policy_paces_exactly_up_to_the_bound_and_sampled_past_it() -> None:
    assert isinstance(_policy(EXACT_PACING_ENDPOINTS)._pacer, CreditPacer)
    policy = _policy(EXACT_PACING_ENDPOINTS + 1)
    assert isinstance(policy._pacer, SampledPacer)
    policy.set_endpoints([f"pod-{i}" for i in range(4)], 1.0)
    assert isinstance(policy._pacer, CreditPacer)


def test_many_endpoints_the_slow_ones_get_less_and_busy_ones_are_passed_over() -> None:
    k = 40
    policy = _policy(k)
    rng = random.Random(7)
    slow = {f"pod-{i}" for i in range(5)}
    counts = dict.fromkeys(policy.endpoints, 0)
    now, next_tick = 0.0, 0.5
    in_flight: list[tuple[float, str]] = []
    for _ in range(12000):
        now += 0.002
        while in_flight and in_flight[0][0] <= now:
            done, e = in_flight.pop(0)
            policy.on_outcome(Outcome(endpoint=e, latency=0.2 if e in slow else 0.01,
                                      ok=True, now=done))
        e = policy.pick(rng, now)
        assert e is not None
        policy.on_start(e, now)
        counts[e] += 1
        in_flight.append((now + (0.2 if e in slow else 0.01), e))
        in_flight.sort()
        if now >= next_tick:
            policy.tick(now)
            next_tick += 0.5
    fast_mean = sum(counts[e] for e in counts if e not in slow) / (k - len(slow))
    assert all(counts[e] < 0.5 * fast_mean for e in slow)
    assert all(counts[e] > 0 for e in counts)


def test_an_endpoint_left_out_earns_nothing_so_the_others_keep_within_the_window() -> None:
    k, window = 20, 4.0
    weights = [0.3] + [0.7 / (k - 1)] * (k - 1)
    p = sampled(weights, [float(i) for i in range(k)], window, paced=[False] + [True] * (k - 1))
    rng = random.Random(1)
    for _ in range(400):  # endpoint 0 failing: its picks go to it unpaced, the rest are paced
        p.choose(lambda i: i != 0, rng.choices(range(1, k), weights[1:])[0])
    assert min(p.credit(i) for i in range(1, k)) >= -window - 1.0


def test_the_policy_takes_a_failing_endpoint_out_of_the_pacer_and_back() -> None:
    policy = _policy(20)
    rng = random.Random(3)
    now = 0.0
    for step in range(1, 20):  # learn a little: every endpoint answers in 10 ms
        for _ in range(40):
            now += 0.0125
            e = policy.pick(rng, now)
            assert e is not None
            policy.on_start(e, now)
            policy.on_outcome(Outcome(endpoint=e, latency=0.01, ok=True, now=now))
        policy.tick(step * 0.5)
    pacer = policy._pacer
    assert isinstance(pacer, SampledPacer)
    failing = policy.endpoints[0]
    policy.on_start(failing, now)
    policy.on_outcome(Outcome(endpoint=failing, latency=0.001, ok=False, now=now))
    assert pacer.rate[0] == 0.0  # out of the pacer while its last request failed
    for _ in range(400):
        now += 0.001
        e = policy.pick(rng, now)
        assert e is not None
        policy.on_start(e, now)
        policy.on_outcome(Outcome(endpoint=e, latency=0.001 if e == failing else 0.01,
                                  ok=e != failing, now=now))
    assert min(pacer.credit(i) for i in range(1, 20)) >= -pacer.window - 1.0
    policy.on_start(failing, now)
    policy.on_outcome(Outcome(endpoint=failing, latency=0.01, ok=True, now=now))
    assert pacer.rate[0] > 0.0  # back once it answers


def test_the_tick_keeps_every_cost_key_current_with_and_without_probes() -> None:
    """The tick computes again only the keys of endpoints with a probe answer (the only ones
    that change with time); the others it takes as requests left them. Both must equal the
    key computed from scratch, through starts, outcomes, failures, probes going stale and a
    change of the endpoint set."""
    policy = _policy(24)
    rng = random.Random(11)
    now, next_tick = 0.0, 0.5
    in_flight: list[tuple[float, str]] = []
    probed = {f"pod-{i}" for i in range(0, 24, 5)}
    for step in range(6000):
        now += 0.0011
        while in_flight and in_flight[0][0] <= now:
            done, e = in_flight.pop(0)
            policy.on_outcome(Outcome(endpoint=e, latency=0.03 if e == "pod-3" else 0.01,
                                      ok=e != "pod-7" or step % 3 != 0, now=done))
        e = policy.pick(rng, now)
        assert e is not None
        policy.on_start(e, now)
        in_flight.append((now + rng.uniform(0.002, 0.04), e))
        in_flight.sort()
        if step % 400 == 0 and now < 3.0:  # probe answers, fresh for PROBE_FRESH only
            for p in probed & set(policy.endpoints):
                policy.on_probe(p, ProbeReport(in_flight=rng.randrange(9), mean=0.01, p50=0.01,
                                               p90=0.02, samples=5, congestion=0.0, limit=0,
                                               draining=False), now)
        if step == 3000:
            policy.set_endpoints([f"pod-{i}" for i in range(2, 26)], now)
        if now >= next_tick:
            policy.tick(now)
            next_tick += 0.5
            pacer = policy._pacer
            assert isinstance(pacer, SampledPacer)
            assert pacer.order.keys == [policy._cost_key(policy.stats[e], now)
                                        for e in policy.endpoints]
    for done, e in in_flight:  # quiet: a probe answer, then nothing until it is stale
        policy.on_outcome(Outcome(endpoint=e, latency=0.01, ok=True, now=done))
    now = max([now] + [done for done, _ in in_flight])
    policy.on_probe("pod-5", ProbeReport(in_flight=8, mean=0.01, p50=0.01, p90=0.02, samples=5,
                                         congestion=0.0, limit=0, draining=False), now)
    for later in (now + 0.1, now + PROBE_FRESH + 0.5):
        policy.tick(later)
        assert isinstance(policy._pacer, SampledPacer)
        assert policy._pacer.order.keys == [policy._cost_key(policy.stats[e], later)
                                            for e in policy.endpoints]
    stale = policy._cost_key(policy.stats["pod-5"], now + PROBE_FRESH + 0.5)
    assert policy._cost_key(policy.stats["pod-5"], now + 0.1) > stale  # the probe counted
