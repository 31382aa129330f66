"""Forged control data on a real Redis: the attacks of issue 14 (findings 6, 7, 8) replayed.

In-process but real: the signaler service and the sidecar's signaling client run their own
code against a real server, and the attacker writes to that server with a plain Redis client,
as anyone holding Redis credentials could. Covered: forged phantom sidecars and far-future
summaries (unsigned, signed with another key, or signed with a clock far ahead) neither move
the plan nor outlive a signaler restart, and a sidecar that stops publishing is forgotten and
gets no more recommendations.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from signaler.service import SignalerConfig, SignalerService
from tests.redis_fixture import RedisHandle
from tests.signaling_samples import signed
from wire.keys import recommendation_stream, summary_stream
from wire.recommendation import verify_recommendation
from wire.redis_store import RedisSignalStore
from wire.summary import RegretSummary, encode_summary

KEY = b"integration-mesh-key-0123456789abcdef"
FORGER_KEY = b"a-key-that-is-not-the-mesh-key-42"
EPS = ("http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003")
UPSTREAM = "orders"
T0 = 1_764_183_600.0
PHANTOMS = 40


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sync_client(redis_server: RedisHandle) -> Iterator[redis.Redis]:
    client = redis_server.client()
    try:
        yield client
    finally:
        client.close()


def honest(sidecar: str, sent_at: float) -> RegretSummary:
    """What a real sidecar measured: endpoint 3 is slow (300 ms)."""
    return RegretSummary(
        sidecar=sidecar, upstream=UPSTREAM, epoch=int(sent_at), sent_at=sent_at, endpoints=EPS,
        requests=(40, 40, 20), failures=(0, 0, 0), latency_mean=(0.010, 0.012, 0.300),
        latency_p50=(0.009, 0.011, 0.25), latency_p99=(0.02, 0.03, 0.6), in_flight=(0, 0, 0),
        demand=50.0, weights=(0.4, 0.4, 0.2),
        regret=((0.0, 0.0, -0.29), (0.0, 0.0, -0.28), (0.29, 0.288, 0.0)),
    )


def phantom(i: int, sent_at: float) -> RegretSummary:
    """The attacker's story: endpoints 1 and 2 fail slowly, endpoint 3 is fast; huge demand."""
    return RegretSummary(
        sidecar=f"phantom-{i}", upstream=UPSTREAM, epoch=int(sent_at), sent_at=sent_at,
        endpoints=EPS, requests=(100, 100, 100), failures=(90, 90, 0),
        latency_mean=(3.0, 3.0, 0.001), latency_p50=(3.0, 3.0, 0.001),
        latency_p99=(3.0, 3.0, 0.001), in_flight=(0, 0, 0), demand=10_000.0,
        weights=(0.0, 0.0, 1.0), regret=((0.0, 0.0, 3.0), (0.0, 0.0, 3.0), (0.0, 0.0, 0.0)),
    )


def service(server: RedisHandle, clock: Clock, signer: str = "sig-a") -> SignalerService:
    config = SignalerConfig(redis_url=server.url, signer=signer, key=KEY, tokens=8, epoch=1.0,
                            upstreams=(UPSTREAM,), seed=7)
    return SignalerService(config, clock=clock,
                           store=RedisSignalStore(server.url, config.redis_timeout))


def rejected(svc: SignalerService, reason: str) -> float:
    return svc.metrics.registry.get_sample_value(
        "equilibrium_signaler_entries_rejected_total",
        {"upstream": UPSTREAM, "reason": reason}) or 0.0


def forge(client: redis.Redis, at: float) -> None:
    """Forty phantom sidecars, three ways: unsigned, signed with a key that is not the mesh
    key, and (as a sidecar with a broken clock would) signed but stamped a day ahead."""
    stream = summary_stream(UPSTREAM)
    for i in range(PHANTOMS):
        far = phantom(i, at + 86_400.0)
        client.xadd(stream, [encode_summary(far), signed(far, FORGER_KEY),
                             signed(far, KEY)][i % 3])


def slow_share(client: redis.Redis, clock: Clock, sidecar: str = "sc-real") -> float:
    newest = client.xrevrange(recommendation_stream(UPSTREAM, sidecar), count=1)
    assert newest, f"no recommendation for {sidecar}"
    rec = verify_recommendation(newest[0][1], KEY, clock.now, UPSTREAM, sidecar,
                                expected_endpoints=EPS)
    return rec.weight_map()[EPS[2]]


async def test_forged_phantom_sidecars_neither_move_the_plan_nor_survive_a_restart(
    redis_server: RedisHandle, sync_client: redis.Redis
) -> None:
    clock = Clock()
    stream = summary_stream(UPSTREAM)
    svc = service(redis_server, clock)
    try:
        await svc.run_epoch()  # leads; the group exists
        sync_client.xadd(stream, signed(honest("sc-real", clock.now), KEY))
        forge(sync_client, clock.now)
        clock.now += 1
        await svc.run_epoch()
        plan = svc.status[UPSTREAM].plan
        assert plan is not None and set(plan.weights) == {"sc-real"}
        assert slow_share(sync_client, clock) == 0.0  # the slow endpoint gets nothing
        assert rejected(svc, "unsigned") + rejected(svc, "bad-signature") == 27
        assert rejected(svc, "not-yet-valid") == 13
        assert svc.metrics.registry.get_sample_value(
            "equilibrium_signaler_sidecars", {"upstream": UPSTREAM}) == 1
    finally:
        await svc._release_all()  # a graceful stop hands the lease over at once
        await svc.close()

    # The signaler restarts and warms up from the newest entries of the stream: the forged
    # ones are still there, and still refused.
    restarted = service(redis_server, clock)
    try:
        clock.now += 1
        sync_client.xadd(stream, signed(honest("sc-real", clock.now), KEY))
        await restarted.run_epoch()
        view = restarted.views[UPSTREAM]
        assert sorted(view.latest) == ["sc-real"]
        assert slow_share(sync_client, clock) == 0.0
        for i in range(PHANTOMS):
            assert not sync_client.exists(recommendation_stream(UPSTREAM, f"phantom-{i}"))

        # The real sidecar stops publishing: after the freshness window it is forgotten and
        # its recommendation stream gets nothing more (nor does anyone else's).
        published = sync_client.xlen(recommendation_stream(UPSTREAM, "sc-real"))
        clock.now += restarted.config.freshness_epochs * restarted.config.epoch + 0.5
        await restarted.run_epoch()
        clock.now += 1
        await restarted.run_epoch()
        assert view.latest == {}
        assert sync_client.xlen(recommendation_stream(UPSTREAM, "sc-real")) == published
        assert restarted.metrics.registry.get_sample_value(
            "equilibrium_signaler_sidecars", {"upstream": UPSTREAM}) == 0
    finally:
        await restarted.close()


# --- finding 7: a key of the wrong type stays its own upstream's problem ----------------------


def key_errors(svc: SignalerService, upstream: str, role: str) -> float:
    return svc.metrics.registry.get_sample_value(
        "equilibrium_signaler_key_errors_total", {"upstream": upstream, "key": role}) or 0.0


async def test_a_wrong_typed_key_isolates_to_its_upstream_and_sidecar(
    redis_server: RedisHandle, sync_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A string where ``payments``' summary stream belongs, and another where one sidecar's
    recommendation stream of ``orders`` belongs: ``orders`` keeps its lease and every other
    sidecar its recommendations, the signaler stays ready, and the sidecar whose stream was
    clobbered falls back for that upstream only."""
    import asyncio
    import time

    from sidecar.metrics import SidecarMetrics, SignalingMetrics
    from sidecar.signaling import SidecarSignaling, SignalingSettings
    from sidecar.upstreams import UpstreamTable

    clock = Clock(time.time())
    config = SignalerConfig(redis_url=redis_server.url, signer="sig-a", key=KEY, tokens=8,
                            epoch=0.2, upstreams=(UPSTREAM, "payments"), seed=7)
    svc = SignalerService(config, store=RedisSignalStore(redis_server.url, config.redis_timeout))
    sync_client.set(summary_stream("payments"), "not a stream")
    sync_client.set(recommendation_stream(UPSTREAM, "sc-victim"), "not a stream")
    stop = asyncio.Event()
    task = asyncio.create_task(svc.run(stop))
    try:
        for _ in range(12):  # 2.4 s, 12 epochs
            for sidecar in ("sc-real", "sc-victim"):
                sync_client.xadd(summary_stream(UPSTREAM),
                                 signed(honest(sidecar, time.time()), KEY))
            await asyncio.sleep(0.2)
        assert svc.health.ready and svc.health.redis_ok
        assert svc.status[UPSTREAM].leader and svc.status["payments"].leader
        assert key_errors(svc, "payments", "summaries") >= 5
        assert key_errors(svc, UPSTREAM, "recs") >= 5
        clock.now = time.time()
        assert slow_share(sync_client, clock, "sc-real") == 0.0  # the other sidecar still served
        assert svc.metrics.registry.get_sample_value("equilibrium_signaler_redis_up") == 1
        assert (svc.metrics.registry.get_sample_value("equilibrium_signaler_redis_errors_total",
                                                      {"kind": "KeyTypeError"}) or 0) == 0
        reports = [r for r in caplog.records if "eq:{payments}:summaries" in r.getMessage()]
        assert len(reports) == 1  # counted every epoch, logged once a minute
    finally:
        stop.set()
        await task

    # The clobbered sidecar: its own upstream falls back, its other upstream keeps following.
    from mesh.profiles import get_profile

    table = UpstreamTable("equilibrium", get_profile("balanced"))
    table.apply({UPSTREAM: EPS, "payments": EPS}, 0.0)
    metrics = SidecarMetrics()
    client = SidecarSignaling(
        sidecar_id="sc-victim", table=table, metrics=SignalingMetrics(metrics.registry),
        settings=SignalingSettings(redis_url=redis_server.url, key=KEY, epoch=0.1),
        store=RedisSignalStore(redis_server.url, 0.25),
    )
    try:
        await client.run_round()  # must not raise: the round trip itself succeeded
        errors = {(s.labels["upstream"], s.labels["key"]): s.value
                  for f in metrics.registry.collect()
                  if f.name == "equilibrium_signaling_key_errors"
                  for s in f.samples if s.name.endswith("_total")}
        assert errors == {(UPSTREAM, "recs"): 1.0, ("payments", "summaries"): 1.0}
    finally:
        await client.store.close()


# --- finding 8: upstreams nobody (legitimate) publishes for are not served, and are forgotten --


def upstream_series(svc: SignalerService) -> set[str]:
    """The upstreams named by any metric series of the signaler."""
    import re

    return set(re.findall(r'upstream="([^"]+)"', svc.metrics.render().decode()))


async def test_five_hundred_forged_streams_cost_no_series_and_a_quiet_upstream_is_forgotten(
    redis_server: RedisHandle, sync_client: redis.Redis
) -> None:
    clock = Clock()
    config = SignalerConfig(redis_url=redis_server.url, signer="sig-a", key=KEY, tokens=8,
                            epoch=1.0, seed=7, discover_every=1.0, forget_after=4.0,
                            probe_every=30.0, probe_budget=100)
    svc = SignalerService(config, clock=clock,
                          store=RedisSignalStore(redis_server.url, config.redis_timeout))
    pipe = sync_client.pipeline(transaction=False)
    for i in range(500):  # the attack: 500 streams of junk under eq:
        forged = phantom(i, clock.now)
        pipe.xadd(summary_stream(f"forged-{i:03d}"),
                  encode_summary(RegretSummary(**{**{f: getattr(forged, f) for f in (
                      "sidecar", "epoch", "sent_at", "endpoints", "requests", "failures",
                      "latency_mean", "latency_p50", "latency_p99", "in_flight", "demand",
                      "weights", "regret")}, "upstream": f"forged-{i:03d}"})))
    pipe.execute()
    try:
        for epoch in range(7):  # honest traffic on one upstream, junk on 500
            sync_client.xadd(summary_stream(UPSTREAM), signed(honest("sc-real", clock.now), KEY))
            await svc.run_epoch()
            clock.now += 1
            # a bounded trickle of probes per round (the honest one waits its turn: 5 rounds)
            assert len(svc._roster.next_probe) <= (epoch + 1) * config.probe_budget
        assert svc.known == {UPSTREAM}
        assert upstream_series(svc) == {UPSTREAM}
        assert svc.metrics.registry.get_sample_value("equilibrium_signaler_upstreams") == 1
        assert not any(k.decode().startswith("eq:{forged-")
                       and k.decode().endswith((":leader", ":fence"))
                       for k in sync_client.scan_iter(match="eq:{forged-*", count=1000))
        assert sync_client.xlen(recommendation_stream(UPSTREAM, "sc-real")) > 0

        # Silence: after forget_after the upstream is forgotten, its series go, its lease too.
        for _ in range(6):
            clock.now += 1
            await svc.run_epoch()
        assert svc.known == set() and upstream_series(svc) == set()
        assert svc.metrics.registry.get_sample_value("equilibrium_signaler_upstreams") == 0
        assert sync_client.get(f"eq:{{{UPSTREAM}}}:leader") is None
        # ...and comes back when its sidecars speak again (after probe_every; the forged
        # candidates are due again too, so it may wait a few rounds of the probe budget)
        clock.now += config.probe_every
        for _ in range(7):
            sync_client.xadd(summary_stream(UPSTREAM), signed(honest("sc-real", clock.now), KEY))
            await svc.run_epoch()
            clock.now += 1
        assert svc.known == {UPSTREAM}
    finally:
        await svc.close()
