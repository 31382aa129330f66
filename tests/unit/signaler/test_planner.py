"""signaler.planner: the signaler's view of one upstream (newest summaries, observations,
borrowed models, capacity caps), its plans (off the bad endpoint, stable through noise,
redrawn at refresh), and on a demo-like fleet: alike pods share the tokens (indifference
pooling) and each sidecar's tokens stay put across epochs (steady deal)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signaler.latency_model import LatencyModel, fit_latency_model
from signaler.planner import (
    NoDemand,
    Plan,
    UpstreamView,
    capped,
    in_support,
    make_plan,
    pool_indifferent,
    sidecar_weights,
    still_apportions,
    two_writers,
)
from tests.signaling_samples import BAD, EPS, KEY, NOW, summary
from wire.recommendation import Recommendation, sign_recommendation, verify_recommendation
from wire.summary import RegretSummary

PODS = tuple(f"http://127.0.0.1:{9100 + i}" for i in range(5))  # PODS[4] is the bad one
SIDECARS = ("client-1", "client-2", "client-3")
TOKENS = 16


def report(view: UpstreamView, t: int, weights: Mapping[str, tuple[float, ...]],
           rng: np.random.Generator) -> None:
    """One epoch of the demo: 3 sidecars x 50 req/s; the good pods answer in ~3 ms with noise
    of a few tenths of a ms that differs from pod to pod, the bad one in ~250 ms."""
    for sidecar in SIDECARS:
        w = weights[sidecar]
        requests = tuple(max(round(50 * x), 0) for x in w)
        good = tuple(0.003 + rng.normal(0.0, 0.0003) for _ in range(4))
        latency = (*(max(x, 0.0015) for x in good), 0.25 + rng.normal(0.0, 0.01))
        view.offer(RegretSummary(
            sidecar=sidecar, upstream="demo", epoch=t, sent_at=NOW + t, endpoints=PODS,
            requests=requests, failures=(0,) * 5, latency_mean=latency,
            latency_p50=latency, latency_p99=tuple(2 * x for x in latency),
            in_flight=(0,) * 5, demand=50.0, weights=w, regret=((0.0,) * 5,) * 5,
        ))


def run(epochs: int, seed: int, **options: float) -> list[Plan]:
    view = UpstreamView("demo", freshness=5.0)
    noise, rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    weights = {s: tuple(np.random.default_rng(i).dirichlet(np.ones(5)))
               for i, s in enumerate(SIDECARS)}
    plans: list[Plan] = []
    previous: Plan | None = None
    for t in range(epochs):
        report(view, t, weights, noise)
        previous = make_plan(view, NOW + t, TOKENS, rng, previous=previous, **options)
        plans.append(previous)
        weights = {s: tuple(previous.weights[s][e] for e in PODS) for s in SIDECARS}
    return plans


def test_identical_noisy_pods_get_equal_tokens_and_the_bad_one_none() -> None:
    # (11 epochs: these sidecars send nothing where the plan says nothing, so the bad pod,
    # unobserved, is forgotten after ten; tested apart, below)
    for plan in run(11, seed=3)[2:]:
        marginal = plan.solution.marginal()  # expected tokens per endpoint
        assert marginal[4] < 0.01
        assert marginal[:4] == pytest.approx([TOKENS / 4] * 4, abs=1.0)


def test_without_the_margin_the_noise_crowds_the_tokens() -> None:
    # the same fleet planned with no indifference margin: the LP chases the noise in d
    crowded = [p.solution.marginal() for p in run(12, seed=3, indifference=0.0,
                                                   indifference_abs=0.0)[2:]]
    assert any(max(m[:4]) - min(m[:4]) >= 2.0 for m in crowded)


def test_pooling_groups_only_within_the_margin() -> None:
    models = [LatencyModel(0.0030, 5000.0), LatencyModel(0.0036, 400.0),
              LatencyModel(0.0028, 900.0), LatencyModel(0.250, 50.0),
              LatencyModel(0.0045, 900.0), LatencyModel(0.0052, 900.0)]
    latencies = [0.0030, 0.0037, 0.0029, 0.260, 0.0046, 0.0053]
    pooled = pool_indifferent(models, latencies)
    # the three within 1 ms of the fastest (2.9 ms) share the mean d and the smallest mu
    assert pooled[0] == pooled[1] == pooled[2]
    assert pooled[0].d == pytest.approx((0.0030 + 0.0036 + 0.0028) / 3)
    assert pooled[0].mu == 400.0
    # 4.6 ms is within 1 ms of 3.7 ms but 1.7 ms slower than the fastest: no chaining; it
    # starts the next group with 5.3 ms; the bad endpoint stays alone
    assert pooled[4] == pooled[5] != pooled[0]
    assert pooled[3] == models[3]
    assert pool_indifferent(models, latencies, 0.0, 0.0) == tuple(models)
    with pytest.raises(ValueError, match="latencies"):
        pool_indifferent(models, [0.003])


def moved(before: Plan, after: Plan) -> int:
    """Tokens that changed endpoint between two deals (the sidecars' counts being equal)."""
    return sum(max(before.deal[s].get(j, 0) - after.deal[s].get(j, 0), 0)
               for s in before.deal for j in range(len(before.endpoints)))


def test_a_sidecars_tokens_move_only_as_much_as_the_configuration() -> None:
    plans = run(10, seed=7, refresh=1.0, stability=0.0)  # re-drawn and re-solved every epoch
    for before, after in itertools.pairwise(plans):
        assert dict(after.tokens) == dict(before.tokens)
        change = sum(max(a - b, 0) for a, b in zip(after.configuration, before.configuration,
                                                    strict=True))
        assert moved(before, after) == change
        if change == 0:
            assert after.kept_deal and after.weights == before.weights
        for sidecar, holding in after.deal.items():  # weights are the sidecar's own tokens
            share = after.weights[sidecar]
            count = sum(holding.values())
            assert [share[e] for e in PODS] == pytest.approx(
                [holding.get(j, 0) / count for j in range(5)])


def test_view_keeps_only_each_sidecars_newest_summary() -> None:
    view = UpstreamView("orders", freshness=5.0)
    assert view.offer(summary(epoch=100, sent_at=NOW))
    assert not view.offer(summary(epoch=99, sent_at=NOW - 1))  # older: ignored
    assert view.offer(summary(epoch=101, sent_at=NOW + 1))
    assert view.offer(summary("sc-2"))
    assert [s.sidecar for s in view.fresh(NOW + 1)] == ["sc-1", "sc-2"]
    assert view.latest["sc-1"].epoch == 101
    # sc-2 reported at NOW and is forgotten once older than the freshness window
    assert [s.sidecar for s in view.fresh(NOW + 5.5)] == ["sc-1"]
    with pytest.raises(ValueError, match="offered"):
        view.offer(summary(upstream="payments"))


def test_two_writers_are_told_from_one_by_epochs_and_sending_times() -> None:
    one = summary(epoch=100, sent_at=NOW + 0.3)
    assert not two_writers(one, one)  # the same entry read twice
    assert not two_writers(one, summary(epoch=101, sent_at=NOW + 1.3))  # the next epoch
    assert not two_writers(summary(epoch=101, sent_at=NOW + 1.3), one)  # offered late
    assert two_writers(one, summary(epoch=100, sent_at=NOW + 0.7))  # one epoch, two times
    assert two_writers(one, summary(epoch=99, sent_at=NOW + 0.9))  # against the clock
    assert two_writers(one, summary(epoch=101, sent_at=NOW + 0.2))


def test_a_sidecar_id_two_processes_publish_under_is_named_and_a_restart_is_not() -> None:
    view = UpstreamView("orders", freshness=5.0)
    for k in range(6):  # "twin": two processes, a third of an epoch apart; "solo": one
        for phase in (0.2, 0.5):
            view.offer(summary("twin", epoch=100 + k, sent_at=NOW + k + phase))
        view.offer(summary("solo", epoch=100 + k, sent_at=NOW + k + 0.4))
    assert view.shared_ids(NOW + 6) == ["twin"]
    # "solo" restarts within an epoch (one clash), and once more four epochs later
    view.offer(summary("solo", epoch=105, sent_at=NOW + 5.9))
    assert view.shared_ids(NOW + 6) == ["twin"]
    view.offer(summary("solo", epoch=109, sent_at=NOW + 9.4))
    view.offer(summary("solo", epoch=109, sent_at=NOW + 9.8))
    assert view.shared_ids(NOW + 10) == []  # "twin" stopped at NOW + 5.5; "solo": two
    assert view.shared_ids(NOW + 11) == [] and view._clashes.keys() == {"solo"}
    assert view.shared_ids(NOW + 20) == [] and not view._clashes


def test_observations_add_load_over_sidecars_and_charge_failures() -> None:
    view = UpstreamView("orders", freshness=5.0, failure_penalty=1.0)
    view.offer(summary("sc-1", demand=50.0, requests=(40, 40, 20)))
    view.offer(summary("sc-2", demand=20.0, requests=(10, 0, 10), failures=(0, 0, 5),
                       latency_mean=(0.010, None, 0.300), latency_p50=(0.009, None, 0.25),
                       latency_p99=(0.02, None, 0.6)))
    view.observe(NOW)
    first, second, bad = (view.observations[e][-1] for e in EPS)
    assert first.load == pytest.approx(50 * 0.4 + 20 * 0.5)
    assert second.load == pytest.approx(50 * 0.4)
    assert bad.load == pytest.approx(50 * 0.2 + 20 * 0.5)
    # sc-2's bad-pod requests failed half of the time: charged 0.3 + 0.5 * 1 s
    assert bad.latency == pytest.approx((20 * 0.3 + 10 * 0.8) / 30)
    assert set(view.models) == set(EPS)
    view.observe(NOW)  # nothing new: no duplicate observation
    assert len(view.observations[EPS[0]]) == 1


def test_unknown_endpoint_borrows_the_median_model() -> None:
    view = UpstreamView("orders", freshness=5.0)
    view.offer(summary(requests=(40, 40, 0), latency_mean=(0.01, 0.012, None),
                       latency_p50=(0.01, 0.012, None), latency_p99=(0.02, 0.03, None)))
    view.observe(NOW)
    borrowed = view.model_for(BAD)
    known = [view.models[EPS[0]], view.models[EPS[1]]]
    assert min(m.d for m in known) <= borrowed.d <= max(m.d for m in known)


def test_an_endpoint_no_request_reaches_is_forgotten_and_planned_as_unknown() -> None:
    # The bad pod is seen slow once; then the sidecars' probes cover it and no request goes
    # there: its fit would stay the slow one, and the plan would give it nothing for good.
    view = UpstreamView("demo", freshness=5.0, forget_epochs=10)
    noise, rng = np.random.default_rng(3), np.random.default_rng(4)
    everywhere = dict.fromkeys(SIDECARS, (0.2,) * 5)
    covered = dict.fromkeys(SIDECARS, (0.25,) * 4 + (0.0,))
    report(view, 0, everywhere, noise)
    plans = [make_plan(view, NOW, TOKENS, rng)]
    for t in range(1, 13):
        report(view, t, covered, noise)
        plans.append(make_plan(view, NOW + t, TOKENS, rng, previous=plans[-1]))
        if t <= 10:  # what was seen of it is kept for ten epochs
            assert PODS[4] in view.models, t
            assert plans[-1].solution.marginal()[4] < 0.01, t
    assert PODS[4] not in view.models and PODS[4] not in view.observations
    # planned as a pod never seen: the others' median model, a share like theirs (each
    # sidecar still checks it against its own evidence: mesh.policies, _checked)
    assert plans[-1].solution.marginal()[4] == pytest.approx(TOKENS / 5, abs=1.0)
    assert all(PODS[i] in view.models for i in range(4))


def heal_and_report(view: UpstreamView, t: int, per_epoch: int,
                    noise: np.random.Generator) -> None:
    """One epoch after the bad pod (PODS[4]) healed: it answers in ~3 ms like the others, and
    gets ``per_epoch`` of each sidecar's 50 requests (the exploration floor, say)."""
    for sidecar in SIDECARS:
        requests = (12, 12, 12, 12, per_epoch)
        latency = tuple(max(0.003 + noise.normal(0.0, 0.0003), 0.0015) for _ in range(5))
        view.offer(RegretSummary(
            sidecar=sidecar, upstream="demo", epoch=t, sent_at=NOW + t, endpoints=PODS,
            requests=requests, failures=(0,) * 5, latency_mean=latency,
            latency_p50=latency, latency_p99=tuple(2 * x for x in latency),
            in_flight=(0,) * 5, demand=50.0, weights=tuple(r / sum(requests) for r in requests),
            regret=((0.0,) * 5,) * 5))


def test_a_pod_seen_much_faster_than_its_history_drops_the_history() -> None:
    # The demo without probes: the bad pod had its share at first (slow), then the floor's
    # few requests; healed, its fit (60 epochs of history, the old fit as prior) kept it
    # slow, and the plan kept it out for a minute and more.
    view = UpstreamView("demo", freshness=5.0)
    noise, rng = np.random.default_rng(3), np.random.default_rng(4)
    for t in range(10):
        report(view, t, dict.fromkeys(SIDECARS, (0.2,) * 5), noise)
        view.observe(NOW + t)
    slow = view.models[PODS[4]]
    assert float(slow.latency(1.0)) > 0.1
    for t in range(10, 14):  # four fast epochs: not yet enough to say it changed
        heal_and_report(view, t, 2, noise)
        view.observe(NOW + t)
        assert len(view.observations[PODS[4]]) == t + 1
    heal_and_report(view, 14, 2, noise)  # the fifth, and 30 requests in them
    plan = make_plan(view, NOW + 14, TOKENS, rng)
    assert len(view.observations[PODS[4]]) == 5  # the history before the change dropped
    kept = view.observations[PODS[4]]
    assert view.models[PODS[4]] == fit_latency_model(  # fitted afresh, no old prior
        [o.load for o in kept], [o.latency for o in kept], weights=[o.weight for o in kept])
    assert float(view.models[PODS[4]].latency(6.0)) < 0.01
    assert plan.solution.marginal()[4] == pytest.approx(TOKENS / 5, abs=1.0)


def test_a_few_fast_answers_are_no_change_until_they_are_enough() -> None:
    # A pod slow on half of its requests, reached a request or two an epoch, has a run of
    # fast epochs now and then: five epochs are not enough, twenty requests in them are.
    view = UpstreamView("demo", freshness=5.0)
    noise = np.random.default_rng(3)
    for t in range(10):
        report(view, t, dict.fromkeys(SIDECARS, (0.2,) * 5), noise)
        view.observe(NOW + t)
    for t in range(10, 16):  # 3 fast requests an epoch there: 18 in six epochs
        heal_and_report(view, t, 1, noise)
        view.observe(NOW + t)
    assert len(view.observations[PODS[4]]) == 16  # kept whole
    assert float(view.models[PODS[4]].latency(1.0)) > 0.01
    heal_and_report(view, 16, 1, noise)  # 21
    view.observe(NOW + 16)
    assert len(view.observations[PODS[4]]) == 7


def test_a_pod_forgotten_and_found_slow_again_is_forgotten_later_each_time() -> None:
    # Without probes nothing holds a forgotten pod back that is still slow: each time it is
    # planned again and found slow, the next try waits twice as long, up to 16x (a review's
    # finding: every twelve epochs, for good); used ten epochs in a row, it starts short again.
    view = UpstreamView("demo", freshness=5.0, forget_epochs=10)
    noise = np.random.default_rng(3)
    everywhere = dict.fromkeys(SIDECARS, (0.2,) * 5)
    covered = dict.fromkeys(SIDECARS, (0.25,) * 4 + (0.0,))
    forgotten_at: list[int] = []
    t = 0
    report(view, t, everywhere, noise)
    view.observe(NOW + t)
    while len(forgotten_at) < 6:
        t += 1
        # planned again as one never seen: tried once, and slow; else no request there
        report(view, t, covered if PODS[4] in view.models else everywhere, noise)
        was = PODS[4] in view.models
        view.observe(NOW + t)
        if was and PODS[4] not in view.models:
            forgotten_at.append(t)
    gaps = [b - a for a, b in itertools.pairwise(forgotten_at)]
    assert gaps == [22, 42, 82, 162, 162], forgotten_at  # the try, then over 20, 40, ... unseen
    for _ in range(10):  # used ten epochs in a row: the next wait is short again
        t += 1
        report(view, t, everywhere, noise)
        view.observe(NOW + t)
    start = t
    while PODS[4] in view.models:
        t += 1
        report(view, t, covered, noise)
        view.observe(NOW + t)
    assert t - start == 11


def test_an_idle_spell_is_no_epoch_unobserved() -> None:
    # A review's finding: counted in seconds, a pause in the traffic made the first busy
    # epoch after it forget every endpoint it did not reach, a known-bad pod among them.
    view = UpstreamView("demo", freshness=5.0, forget_epochs=10)
    noise, rng = np.random.default_rng(3), np.random.default_rng(4)
    report(view, 0, dict.fromkeys(SIDECARS, (0.2,) * 5), noise)
    view.observe(NOW)
    covered = dict.fromkeys(SIDECARS, (0.25,) * 4 + (0.0,))
    for t in range(1, 4):
        report(view, t, covered, noise)
        view.observe(NOW + t)
    for t in range(4, 30):  # idle
        for sidecar in SIDECARS:
            view.offer(RegretSummary(
                sidecar=sidecar, upstream="demo", epoch=t, sent_at=NOW + t, endpoints=PODS,
                requests=(0,) * 5, failures=(0,) * 5, latency_mean=(None,) * 5,
                latency_p50=(None,) * 5, latency_p99=(None,) * 5, in_flight=(0,) * 5,
                demand=0.0, weights=(0.2,) * 5, regret=((0.0,) * 5,) * 5))
        view.observe(NOW + t)
    assert set(view.models) == set(PODS)  # nothing forgotten while no request goes anywhere
    report(view, 30, covered, noise)
    plan = make_plan(view, NOW + 30, TOKENS, rng)
    assert PODS[4] in view.models
    assert plan.solution.marginal()[4] < 0.01


def test_regret_gap_is_the_largest_positive_off_diagonal_regret() -> None:
    view = UpstreamView("orders", freshness=5.0)
    view.offer(summary("sc-1"))
    view.offer(summary("sc-2", regret=((5.0, 0.0, 0.0), (0.0, 0.0, 0.0), (0.1, 0.0, 0.0))))
    assert view.regret_gap(NOW) == pytest.approx(0.29)  # the 5.0 on a diagonal is no regret
    assert UpstreamView("orders", freshness=5.0).regret_gap(NOW) == 0.0


def test_plan_moves_every_sidecar_off_the_bad_endpoint() -> None:
    view = UpstreamView("orders", freshness=5.0)
    for i in range(3):
        view.offer(summary(f"sc-{i}", demand=30.0 + 10 * i))
    plan = make_plan(view, NOW, 12, np.random.default_rng(1))
    assert sum(plan.tokens.values()) == 12
    assert sum(plan.configuration) == 12 and plan.configuration[2] == 0
    assert plan.solution.ce_gap <= 1e-6
    for sidecar, weights in plan.weights.items():
        assert weights[BAD] == 0.0
        assert math.fsum(weights.values()) == pytest.approx(1.0, abs=1e-12)
        # what the service publishes verifies at the sidecar
        rec = Recommendation(
            upstream="orders", sidecar=sidecar, epoch=7, issued_at=NOW, expires_at=NOW + 3,
            endpoints=plan.sidecar_endpoints[sidecar],
            weights=tuple(weights[e] for e in plan.sidecar_endpoints[sidecar]),
            status=plan.status, objective=plan.solution.objective, ce_gap=plan.solution.ce_gap,
            signer="sig-a", fence=3,
        )
        verified = verify_recommendation(sign_recommendation(rec, KEY), KEY, NOW + 1, "orders",
                                         sidecar, expected_endpoints=EPS)
        assert verified.weight_map()[BAD] == 0.0


def test_alike_endpoints_with_unmeasured_capacity_share_the_tokens() -> None:
    # latency flat in load: the fit cannot see a capacity; the plan must not herd onto one
    view = UpstreamView("orders", freshness=5.0)
    for t in range(6):
        for i in range(3):
            view.offer(summary(f"sc-{i}", sent_at=NOW + t, demand=20.0 + 5 * t,
                               latency_mean=(0.010, 0.010, 0.300)))
        view.observe(NOW + t)
    plan = make_plan(view, NOW + 5, 12, np.random.default_rng(2))
    first, second, bad = plan.solution.marginal()
    assert bad == 0.0
    assert min(first, second) >= 4.0  # 12 tokens split about evenly, not 12 / 0


def test_a_capacity_is_trusted_only_as_far_as_it_was_seen() -> None:
    # EPS[0] answered faster than the others but only ever carried ~3 req/s
    view = UpstreamView("orders", freshness=5.0)
    for t in range(6):
        view.offer(summary("sc-1", sent_at=NOW + t, demand=60.0, requests=(5, 50, 50),
                           latency_mean=(0.050, 0.080, 0.081), latency_p50=(0.05, 0.08, 0.08),
                           latency_p99=(0.06, 0.09, 0.09)))
        view.observe(NOW + t)
    seen = 60.0 * 5 / 105
    assert view.peak_load(EPS[0]) == pytest.approx(seen)
    # 2 x max(seen, even share 20) = 40 > seen + 1/0.05 (what its latency proves) = 22.9
    assert view.capacity_cap(EPS[0], 20.0, 2.0) == pytest.approx(40.0)
    plan = make_plan(view, NOW + 5, 30, np.random.default_rng(5))
    token_load = 60.0 / 30
    assert plan.solution.marginal()[0] * token_load < 40.0
    unlimited = make_plan(view, NOW + 5, 30, np.random.default_rng(5), capacity_headroom=1e9)
    assert unlimited.solution.marginal()[0] > plan.solution.marginal()[0]


def test_the_cap_never_contradicts_an_observation() -> None:
    # a 4 ms endpoint seen at ~23 req/s: its latency proves a capacity of at least 23 + 250
    view = UpstreamView("orders", freshness=5.0)
    view.offer(summary(demand=60.0, requests=(40, 40, 25),
                       latency_mean=(0.004, 0.004, 0.060), latency_p50=(0.004, 0.004, 0.06),
                       latency_p99=(0.005, 0.005, 0.07)))
    view.observe(NOW)
    seen = 60.0 * 40 / 105
    assert view.capacity_cap(EPS[0], 20.0, 2.0) == pytest.approx(seen + 250.0)
    plan = make_plan(view, NOW, 8, np.random.default_rng(0))
    # capped at 2 x 23 instead, the fast ones would look congested and the 60 ms endpoint
    # would get 2 of the 8 tokens
    assert plan.configuration[2] == 0


def test_a_queue_that_was_seen_caps_the_capacity_whatever_else_was_seen() -> None:
    # EPS[0], a one-server pod (10 ms at light load): a plan sent it ~96 req/s. In its first
    # epoch there the queue had not built yet (30 ms: "capacity >= 129" by load + 1/latency);
    # then it answered in 400 ms. The fit may still come out almost flat; the queue bounds mu.
    view = UpstreamView("orders", freshness=5.0)
    shares = [(0.010, 20), (0.012, 25), (0.030, 96), (0.400, 96), (0.380, 96)]
    for t, (latency, load) in enumerate(shares):
        view.offer(summary("sc-1", sent_at=NOW + t, demand=192.0, requests=(50, 25, 25),
                           latency_mean=(latency, 0.040, 0.041)))
        view.observe(NOW + t)
        view.observations[EPS[0]][-1] = replace(view.observations[EPS[0]][-1], load=load)
    bound = view.queueing_bound(EPS[0])
    assert bound == pytest.approx(96 + 1 / (0.400 - 0.010))  # the tightest queued observation
    assert view.capacity_cap(EPS[0], 64.0, 1.5) == pytest.approx(bound)  # 144 without it
    # flat endpoints, noise and all, are bounded by nothing
    assert view.queueing_bound(EPS[1]) == math.inf
    assert view.queueing_bound("never-seen") == math.inf
    # a queue seen over a handful of requests is not evidence
    few = UpstreamView("orders", freshness=5.0)
    for t, latency in enumerate((0.010, 0.400)):
        few.offer(summary("sc-1", sent_at=NOW + t, requests=(5, 50, 50),
                          latency_mean=(latency, 0.040, 0.041)))
        few.observe(NOW + t)
    assert few.queueing_bound(EPS[0]) == math.inf
    # nor is the noise of a big pod with 80 ms exponential service times: epoch means of 25
    # requests spread over 45..130 ms, more than twice the lowest, never twice the median
    noisy = UpstreamView("orders", freshness=5.0)
    rng = np.random.default_rng(7)
    for t in range(60):
        mean = float(np.mean(rng.exponential(0.080, 25))) + 0.005
        noisy.offer(summary("sc-1", sent_at=NOW + t, requests=(25, 25, 25),
                            latency_mean=(mean, 0.040, 0.041)))
        noisy.observe(NOW + t)
    means = [o.latency for o in noisy.observations[EPS[0]]]
    assert max(means) > 2 * min(means)
    assert noisy.queueing_bound(EPS[0]) == math.inf


def test_a_capped_curve_keeps_the_latency_it_was_seen_at() -> None:
    # a big pod seen flat at 42 ms under 50 req/s fits an almost infinite capacity
    flat = LatencyModel(d=0.042, mu=2e6)
    cap = capped(flat, 82.0, anchor=50.0)
    assert cap.mu == 82.0
    assert cap.latency(50.0) == pytest.approx(flat.latency(50.0))  # no invented queueing
    assert cap.latency(70.0) > flat.latency(70.0) + 0.020  # but no trust beyond what was seen
    # a capacity already below the cap is kept; d never goes negative
    assert capped(LatencyModel(d=0.01, mu=60.0), 82.0, anchor=50.0) == LatencyModel(0.01, 60.0)
    assert capped(LatencyModel(d=0.001, mu=500.0), 40.0, anchor=30.0).d == 0.0


def test_slow_but_flat_pods_are_not_priced_slower_than_they_were_seen() -> None:
    # one quick pod (a queue that climbs) and two big flat 40 ms pods, all seen at 20-30 req/s:
    # the cap must not turn the flat pods' unmeasured headroom into queueing they never showed,
    # or the plan would push the quick pod past the selfish split
    view = UpstreamView("orders", freshness=5.0)
    for t, quick in enumerate((0.010, 0.012, 0.015, 0.019, 0.025)):
        view.offer(summary("sc-1", sent_at=NOW + t, demand=75.0 + 5 * t,
                           requests=(20 + 4 * t, 30, 30),
                           latency_mean=(quick, 0.040, 0.040)))
        view.observe(NOW + t)
    plan = make_plan(view, NOW + 4, 16, np.random.default_rng(1))
    for j in (1, 2):
        seen = view.peak_load(EPS[j])
        assert plan.models[j].latency(seen) == pytest.approx(0.040, rel=0.05)


def test_plans_stay_put_through_noise_and_move_on_real_change() -> None:
    view = UpstreamView("orders", freshness=5.0)
    rng = np.random.default_rng(4)

    def report(t: int, latencies: tuple[float, float, float]) -> None:
        for i in range(3):
            view.offer(summary(f"sc-{i}", sent_at=NOW + t, demand=30.0, requests=(30, 30, 30),
                               latency_mean=latencies, latency_p50=latencies,
                               latency_p99=tuple(2 * x for x in latencies)))

    report(0, (0.010, 0.010, 0.010))
    first = make_plan(view, NOW, 12, rng)
    assert not first.kept_distribution and not first.kept_deal
    report(1, (0.0102, 0.0099, 0.0101))  # measurement noise
    second = make_plan(view, NOW + 1, 12, rng, previous=first)
    assert second.kept_distribution
    if second.configuration == first.configuration:
        assert second.kept_deal and second.weights == first.weights
    plan = second
    for t in range(2, 6):  # EPS[2] really slows down, epoch after epoch
        report(t, (0.010, 0.010, 0.400))
        plan = make_plan(view, NOW + t, 12, rng, previous=plan)
    assert plan.configuration[2] == 0
    assert all(w[BAD] == 0.0 for w in plan.weights.values())


def test_token_counts_stay_while_they_still_round_the_quotas() -> None:
    rates = {"a": 10.0, "b": 10.2, "c": 9.9}
    assert still_apportions({"a": 3, "b": 3, "c": 2}, rates, 8)  # quotas ~2.67, 2.72, 2.62
    assert not still_apportions({"a": 4, "b": 2, "c": 2}, rates, 8)  # 4 - 2.67 >= 1
    assert not still_apportions({"a": 3, "b": 3, "c": 2}, rates | {"d": 1.0}, 8)
    assert not still_apportions({"a": 4, "b": 4, "c": 0}, rates, 8)  # c has demand
    assert not still_apportions({"a": 3, "b": 3, "c": 3}, rates, 8)  # wrong total


def test_the_configuration_is_redrawn_only_at_refresh() -> None:
    view = UpstreamView("orders", freshness=5.0)
    for i in range(3):
        view.offer(summary(f"sc-{i}", latency_mean=(0.010, 0.010, 0.010),
                           latency_p50=(0.01, 0.01, 0.01), latency_p99=(0.02, 0.02, 0.02)))
    rng = np.random.default_rng(9)
    plan = make_plan(view, NOW, 12, rng)
    for _ in range(5):  # never refreshed: same configuration, same deal, same private shares
        again = make_plan(view, NOW, 12, rng, previous=plan, refresh=0.0)
        assert again.configuration == plan.configuration and again.weights == plan.weights
        plan = again
    assert in_support(plan.solution, plan.configuration)
    assert not in_support(plan.solution, (12, 0, 0)) or plan.configuration == (12, 0, 0)


def test_plan_needs_demand() -> None:
    view = UpstreamView("orders", freshness=5.0)
    with pytest.raises(NoDemand):
        make_plan(view, NOW, 8, np.random.default_rng(0))
    view.offer(summary(demand=0.0, requests=(0, 0, 0), latency_mean=(None,) * 3,
                       latency_p50=(None,) * 3, latency_p99=(None,) * 3))
    with pytest.raises(NoDemand):
        make_plan(view, NOW, 8, np.random.default_rng(0))


def test_more_sidecars_than_tokens_still_gives_each_a_token() -> None:
    view = UpstreamView("orders", freshness=5.0)
    for i in range(5):
        view.offer(summary(f"sc-{i}"))
    plan = make_plan(view, NOW, 2, np.random.default_rng(3))
    assert sorted(plan.tokens.values()) == [1, 1, 1, 1, 1]
    assert set(plan.weights) == {f"sc-{i}" for i in range(5)}


def test_sidecar_weights_fall_back_to_the_marginal_then_uniform() -> None:
    index = {e: i for i, e in enumerate(EPS)}
    marginal = np.array([2.0, 6.0, 0.0])
    assert sidecar_weights(EPS, {0: 0.25, 1: 0.75}, index, marginal) == [0.25, 0.75, 0.0]
    # its share lies on an endpoint it does not route to: the plan's overall mix instead
    assert sidecar_weights(EPS[1:], {0: 1.0}, index, marginal) == [1.0, 0.0]
    assert sidecar_weights(("http://other:1",), {0: 1.0}, index, marginal) == [1.0]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6).flatmap(lambda k: st.lists(
    st.lists(st.sampled_from([-0.5, -0.0, 0.0, 0.1, 0.25, 3.0]) | st.floats(-10, 10),
             min_size=k, max_size=k), min_size=k, max_size=k)))
def test_the_largest_regret_is_the_largest_positive_entry_off_the_diagonal(
        rows: list[list[float]]) -> None:
    from signaler.planner import _largest_regret

    off = [x for j, row in enumerate(rows) for i, x in enumerate(row) if i != j]
    assert _largest_regret(tuple(map(tuple, rows))) == max([0.0, *off])
