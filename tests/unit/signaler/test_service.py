"""The signaling plane's pure parts: the signaler's view and plan, entry handling, leadership
bookkeeping, the sidecar's summary builder and recommendation checks, and the start-up rules.

No Redis here: the services talk to the in-memory signal store
(tests/integration/test_signaling_redis.py runs the same code against a real one).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from mesh.policies import RegretMatchingPolicy
from mesh.policy import Outcome
from mesh.profiles import get_profile
from mesh.summary import SummaryBuilder
from sidecar.config import ConfigError, ConfigSource
from sidecar.metrics import SidecarMetrics
from sidecar.signaling import (
    SidecarSignaling,
    SignalingSettings,
    protocol_id,
    signaling_settings,
)
from sidecar.upstreams import UpstreamTable
from signaler.cli import UsageError, build_config
from signaler.latency_model import LatencyModel
from signaler.leader import Leadership
from signaler.planner import (
    NoDemand,
    UpstreamView,
    capped,
    in_support,
    make_plan,
    sidecar_weights,
    still_apportions,
)
from signaler.service import SignalerConfig, SignalerService
from wire.memory_store import MemorySignalStore
from wire.recommendation import Recommendation, sign_recommendation, verify_recommendation
from wire.summary import RegretSummary, decode_summary, encode_summary

KEY = b"unit-test-mesh-key-0123456789abcdef"
NOW = 1_764_183_600.0
EPS = ("http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003")
BAD = EPS[2]


def summary(sidecar: str = "sc-1", **changes: object) -> RegretSummary:
    base = RegretSummary(
        sidecar=sidecar,
        upstream="orders",
        epoch=100,
        sent_at=NOW,
        endpoints=EPS,
        requests=(40, 40, 20),
        failures=(0, 0, 0),
        latency_mean=(0.010, 0.012, 0.300),
        latency_p50=(0.009, 0.011, 0.250),
        latency_p99=(0.020, 0.030, 0.600),
        in_flight=(1, 1, 3),
        demand=50.0,
        weights=(0.4, 0.4, 0.2),
        regret=((0.0, -0.002, -0.29), (0.002, 0.0, -0.28), (0.29, 0.288, 0.0)),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the signaler's view


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


# ------------------------------------------------------------------ entries and leadership


def service() -> SignalerService:
    return SignalerService(SignalerConfig(redis_url="redis://127.0.0.1:1", signer="sig-a",
                                          key=KEY, epoch=1.0),
                           store=MemorySignalStore(lambda: NOW))


def rejected(svc: SignalerService, reason: str) -> float:
    value = svc.metrics.registry.get_sample_value(
        "equilibrium_signaler_entries_rejected_total", {"upstream": "orders", "reason": reason})
    return value or 0.0


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({b"v": b"1", b"type": b"summary"}, "malformed"),
        ({**encode_summary(summary()), "demand": "nan"}, "malformed"),
        ({**encode_summary(summary()), "latency_mean": "[0.01, NaN, 0.3]"}, "malformed"),
        ({**encode_summary(summary()), "demand": "1e400"}, "malformed"),
        ({**encode_summary(summary()), "requests": "[1e30, 1, 1]"}, "malformed"),
        ({**encode_summary(summary()), "regret": "[[0,0,0],[0,0,0]]"}, "malformed"),
        ({**encode_summary(summary()), "v": "2"}, "version"),
        ({**encode_summary(summary()), "endpoints": "x" * 300_000}, "oversized"),
        (encode_summary(summary(upstream="payments")), "wrong-upstream"),
        (None, "deleted"),
        ({b"\xff": b"1"}, "malformed"),
    ],
)
def test_bad_entries_are_counted_by_reason_and_never_raise(fields: object, reason: str) -> None:
    svc = service()
    assert svc.apply_entry("orders", fields) is False
    assert rejected(svc, reason) == 1
    assert "orders" not in svc.views or not svc.views["orders"].latest
    assert svc.apply_entry("orders", encode_summary(summary())) is True
    assert svc.views["orders"].latest["sc-1"] == summary()


async def test_a_plan_that_cannot_be_solved_is_counted_and_publishes_nothing() -> None:
    svc = service()
    svc._set_leader("orders", 3)
    svc.clock = lambda: NOW
    assert svc.apply_entry("orders", encode_summary(summary()))
    view = svc.views["orders"]
    view.observe(NOW)
    for endpoint in EPS:  # every endpoint measured as failing: no capacity to plan onto
        view.models[endpoint] = LatencyModel(d=1.0, mu=1e-6)
    await svc._plan_and_publish("orders")  # must not raise (and must not touch Redis)
    assert svc.metrics.registry.get_sample_value(
        "equilibrium_signaler_solver_failures_total",
        {"upstream": "orders", "error": "NoCapacityError"}) == 1
    assert svc.status["orders"].plan is None
    assert "failing" in (svc.status["orders"].last_error or "")


def test_leadership_transitions() -> None:
    lead = Leadership("sig-a")
    assert lead.update("orders", 0) == "standby"
    assert lead.update("orders", 7) == "elected"
    assert lead.update("orders", 7) == "renewed"
    assert lead.update("orders", 9) == "elected"  # re-elected under a new token
    assert lead.token("orders") == 9
    assert lead.update("orders", 0) == "deposed"
    assert lead.token("orders") is None


# ------------------------------------------------------------------ the sidecar side


def routed_group(upstream: str = "orders") -> tuple[UpstreamTable, SidecarMetrics]:
    table = UpstreamTable("equilibrium", get_profile("balanced"))
    table.apply({upstream: EPS}, 0.0)
    return table, SidecarMetrics()


def test_summary_builder_reports_each_epochs_movement() -> None:
    table, _ = routed_group()
    group = table.get("orders")
    assert group is not None
    builder = SummaryBuilder()
    policy = group.policy
    assert isinstance(policy, RegretMatchingPolicy)
    now = 1.0
    for i in range(30):
        endpoint = EPS[i % 3]
        latency = 0.3 if endpoint == BAD else 0.01
        policy.on_start(endpoint, now)
        # the bad endpoint fails half of the time with no answer at all
        policy.on_outcome(Outcome(endpoint, latency, endpoint != BAD or i % 2 == 0, now))
    group.tick(now)
    report = builder.build(group.snapshot, policy.take_epoch(), now, NOW, 1.0)
    assert report is not None
    first = RegretSummary(sidecar="sc-1", upstream="orders", **asdict(report))
    assert first.requests == (10, 10, 10) and first.failures == (0, 0, 5)
    assert first.latency_mean[0] == pytest.approx(0.01)
    assert first.latency_p50[2] <= first.latency_p99[2]
    assert first.demand == pytest.approx(30.0)  # first epoch: counted over one epoch
    assert decode_summary(encode_summary(first)) == first
    # nothing happened since: zero requests, no latency, the same weights
    group.tick(now + 1)
    again = builder.build(group.snapshot, policy.take_epoch(), now + 1, NOW + 1, 1.0)
    assert again is not None and again.requests == (0, 0, 0)
    assert again.latency_mean == (None, None, None) and again.demand == 0.0
    assert again.epoch == first.epoch + 1


def signaling(table: UpstreamTable, metrics: SidecarMetrics,
              wall: float = NOW) -> SidecarSignaling:
    return SidecarSignaling(
        sidecar_id="sc-1", table=table, registry=metrics.registry,
        settings=SignalingSettings(redis_url="redis://127.0.0.1:1", key=KEY, epoch=1.0),
        store=MemorySignalStore(lambda: wall), clock=lambda: 10.0, wall=lambda: wall,
    )


def rec(**changes: object) -> Recommendation:
    base = Recommendation(
        upstream="orders", sidecar="sc-1", epoch=50, issued_at=NOW - 0.1, expires_at=NOW + 3,
        endpoints=EPS, weights=(0.7, 0.3, 0.0), status="optimal", objective=1.5, ce_gap=0.0,
        signer="sig-a", fence=5,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_sidecar_follows_only_fresh_validly_signed_recommendations() -> None:
    table, metrics = routed_group()
    group = table.get("orders")
    assert group is not None
    sig = signaling(table, metrics)
    unsigned = sign_recommendation(rec(), KEY)
    del unsigned["sig"]
    nan_weights = {**sign_recommendation(rec(), KEY), "weights": "[NaN, 0.3, 0.0]"}
    cases = [
        (b"1-0", sign_recommendation(rec(), b"forged-key-0123456789abcdefgh"), "bad-signature"),
        (b"2-0", unsigned, "unsigned"),
        (b"3-0", nan_weights, "bad-signature"),
        (b"4-0", sign_recommendation(rec(sidecar="sc-2"), KEY), "wrong-sidecar"),
        (b"5-0", sign_recommendation(rec(expires_at=NOW - 1, issued_at=NOW - 4), KEY),
         "expired"),
        (b"6-0", sign_recommendation(rec(endpoints=EPS[:2], weights=(0.5, 0.5)), KEY),
         "endpoint-mismatch"),
        (b"7-0", {"garbage": "x"}, "malformed"),
    ]
    for entry_id, fields, _ in cases:
        assert sig.consider(group, entry_id, fields) is False
    for _, _, reason in cases:
        value = metrics.registry.get_sample_value(
            "equilibrium_signaling_recommendations_rejected_total",
            {"upstream": "orders", "reason": reason})
        assert value is not None and value >= 1, reason
    group.tick(10.0)
    assert group.snapshot is not None and not group.snapshot.following

    assert sig.consider(group, b"8-0", sign_recommendation(rec(), KEY)) is True
    assert sig.consider(group, b"8-0", sign_recommendation(rec(), KEY)) is False  # seen
    group.tick(10.5)
    assert group.snapshot is not None and group.snapshot.following
    # an older epoch, or a deposed leader's lower fence, is refused afterwards
    assert sig.consider(group, b"9-0", sign_recommendation(rec(epoch=49), KEY)) is False
    assert sig.consider(group, b"10-0", sign_recommendation(rec(epoch=51, fence=4), KEY)) is False
    for reason in ("stale", "fenced"):
        assert metrics.registry.get_sample_value(
            "equilibrium_signaling_recommendations_rejected_total",
            {"upstream": "orders", "reason": reason}) == 1
    assert sig.consider(group, b"11-0", sign_recommendation(rec(epoch=51, fence=6), KEY))


def test_recommendation_expiry_is_translated_to_the_sidecar_clock() -> None:
    table, metrics = routed_group()
    group = table.get("orders")
    assert group is not None
    sig = signaling(table, metrics)
    assert sig.consider(group, b"1-0", sign_recommendation(rec(expires_at=NOW + 2), KEY))
    policy = group.policy
    assert isinstance(policy, RegretMatchingPolicy)
    group.tick(11.9)  # sidecar clock 10 = NOW: still valid 1.9 s later
    assert group.snapshot is not None and group.snapshot.following
    group.tick(12.1)  # past NOW + 2 on the sidecar's own clock
    assert not group.snapshot.following


def test_protocol_ids_are_sanitised() -> None:
    assert protocol_id("pod-a") == "pod-a"
    assert protocol_id("pod a/b:c") == "pod-a-b-c"
    assert protocol_id("-x") == "s-x"
    assert len(protocol_id("a" * 300)) == 128


def test_redis_without_a_mesh_key_refuses_to_start() -> None:
    config = ConfigSource.from_sources(
        {"redis": "redis://127.0.0.1:6379/0", "signaling_epoch": "0.5"}, env={}
    ).load()
    assert config.redis == "redis://127.0.0.1:6379/0" and config.signaling_epoch == 0.5
    with pytest.raises(ConfigError, match="mesh key"):
        signaling_settings(config, None)
    assert signaling_settings(config, KEY) is not None
    plain = ConfigSource.from_sources({}, env={"EQUILIBRIUM_REDIS_URL": "redis://h:1"}).load()
    assert plain.redis == "redis://h:1"
    assert signaling_settings(replace(plain, redis=None), None) is None
    with pytest.raises(ConfigError, match="redis://"):
        ConfigSource.from_sources({"redis": "http://nope"}, env={}).load()


def test_signaler_cli_requires_a_key_and_a_redis_url(tmp_path: object) -> None:
    def args(**kw: object) -> argparse.Namespace:
        base = {"redis": "redis://127.0.0.1:1", "epoch": "0.5", "id": "sig-a",
                "admin": "127.0.0.1:0", "tokens": "8", "upstreams": None,
                "mesh_secret_file": None, "lease_epochs": "3", "seed": None}
        return argparse.Namespace(**{**base, **kw})

    key_file = Path(str(tmp_path)) / "mesh.key"
    key_file.write_bytes(KEY + b"\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("EQUILIBRIUM_MESH_SECRET", raising=False)
        with pytest.raises(UsageError, match="mesh key: none given"):
            build_config(args())
        assert build_config(args(mesh_secret_file=str(key_file)))[0].key == KEY
        with pytest.raises(UsageError, match="cannot read"):
            build_config(args(mesh_secret_file=str(key_file) + ".missing"))
        mp.setenv("EQUILIBRIUM_MESH_SECRET", "short")
        with pytest.raises(UsageError, match="at least 16"):
            build_config(args())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EQUILIBRIUM_MESH_SECRET", KEY.decode())
        config, admin = build_config(args())
        assert config.key == KEY and config.epoch == 0.5 and admin == ("127.0.0.1", 0)
        for bad, message in [({"redis": None}, "required"), ({"redis": "http://x"}, "redis"),
                             ({"epoch": "0"}, "--epoch"), ({"tokens": "x"}, "--tokens"),
                             ({"id": "bad id"}, "--id"), ({"admin": "nope"}, "--admin")]:
            with pytest.raises(UsageError, match=message):
                build_config(args(**bad))



def test_a_config_reload_keeps_the_signaling_settings(tmp_path: Path) -> None:
    from sidecar.runner import SidecarRunner

    config_file = tmp_path / "sidecar.yaml"
    config_file.write_text(
        f"redis: redis://127.0.0.1:1/0\nsignaling_epoch: 0.5\nupstreams:\n  orders: [{EPS[0]}]\n"
    )
    source = ConfigSource.from_sources({"config": str(config_file)}, env={})
    runner = SidecarRunner(source, source.load(), mesh_key=KEY)
    config_file.write_text(
        f"redis: redis://127.0.0.1:1/0\nsignaling_epoch: 0.5\nupstreams:\n"
        f"  orders: [{EPS[0]}, {EPS[1]}]\n"
    )
    assert runner.reload()
    assert runner.config.upstreams["orders"] == EPS[:2]  # applied live
    assert runner.config.redis == "redis://127.0.0.1:1/0"  # kept (restart-only)
    assert runner.config.signaling_epoch == 0.5
