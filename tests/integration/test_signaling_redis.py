"""The signaling plane against a real Redis (testcontainers, else a local redis-server).

In-process but real: the signaler service and the sidecar's signaling client run their own
code against a real server; only the sidecars' HTTP side is left out (the end-to-end test in
test_ce_end_to_end.py has it). Covers: consuming with XREADGROUP/XACK, reclaiming a crashed
consumer's pending entries with XAUTOCLAIM, bad entries counted and skipped, the lease and its
fencing between two replicas, and the sidecar rejecting forged or unsigned recommendations
and falling back when Redis goes away.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
import redis

from sidecar.metrics import SidecarMetrics, SignalingMetrics
from sidecar.signaling import SidecarSignaling, SignalingSettings
from sidecar.upstreams import UpstreamTable
from signaler.service import SignalerConfig, SignalerService
from tests.redis_fixture import RedisHandle
from tests.signaling_samples import signed, with_body
from wire.keys import SIGNALER_GROUP, leader_key, recommendation_stream, summary_stream
from wire.recommendation import Recommendation, sign_recommendation, verify_recommendation
from wire.redis_store import RedisSignalStore
from wire.summary import RegretSummary, decode_summary, encode_summary

KEY = b"integration-mesh-key-0123456789abcdef"
EPS = ("http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003")
UPSTREAM = "orders"
T0 = 1_764_183_600.0


class Clock:
    """A settable unix clock shared by the services of one test."""

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


def summary(sidecar: str, sent_at: float = T0, **changes: object) -> RegretSummary:
    base = RegretSummary(
        sidecar=sidecar, upstream=UPSTREAM, epoch=int(sent_at), sent_at=sent_at, endpoints=EPS,
        requests=(40, 40, 20), failures=(0, 0, 0), latency_mean=(0.010, 0.012, 0.300),
        latency_p50=(0.009, 0.011, 0.25), latency_p99=(0.02, 0.03, 0.6), in_flight=(0, 0, 0),
        demand=50.0, weights=(0.4, 0.4, 0.2),
        regret=((0.0, 0.0, -0.29), (0.0, 0.0, -0.28), (0.29, 0.288, 0.0)),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def make_service(server: RedisHandle, signer: str, clock: Clock, **kw: object) -> SignalerService:
    settings: dict[str, object] = {"epoch": 1.0, **kw}
    config = SignalerConfig(redis_url=server.url, signer=signer, key=KEY, tokens=8,
                            upstreams=(UPSTREAM,), **settings)  # type: ignore[arg-type]
    return SignalerService(config, clock=clock,
                           store=RedisSignalStore(server.url, config.redis_timeout))


def sample(svc: SignalerService, name: str, **labels: str) -> float:
    return svc.metrics.registry.get_sample_value(name, labels) or 0.0


def pending(client: redis.Redis) -> int:
    return int(client.xpending(summary_stream(UPSTREAM), SIGNALER_GROUP)["pending"])


async def test_summaries_are_consumed_acknowledged_and_answered(
    redis_server: RedisHandle, sync_client: redis.Redis
) -> None:
    clock = Clock()
    svc = make_service(redis_server, "sig-a", clock)
    stream = summary_stream(UPSTREAM)
    try:
        await svc.run_epoch()  # leads, creates the group; no summaries yet: nothing published
        for i in range(3):
            sync_client.xadd(stream, signed(summary(f"sc-{i}"), KEY))
        # junk on the same stream: never crashes, counted by reason, acknowledged
        old = encode_summary(summary("sc-9", version=1))  # sidecars not yet upgraded
        sync_client.xadd(stream, {"v": "1", "type": "summary"})
        sync_client.xadd(stream, signed({**old, "demand": "nan"}, KEY))
        sync_client.xadd(stream, signed({**old, "weights": "[1e999,0,0]"}, KEY))
        nan = with_body('"demand":50.0', '"demand":NaN', summary("sc-9"))
        sync_client.xadd(stream, signed(nan, KEY))
        sync_client.xadd(stream, signed({**encode_summary(summary("sc-9")), "v": "7"}, KEY))
        clock.now += 1
        await svc.run_epoch()
        assert pending(sync_client) == 0
        assert sample(svc, "equilibrium_signaler_summaries_consumed_total",
                      upstream=UPSTREAM) == 3
        assert sample(svc, "equilibrium_signaler_entries_rejected_total", upstream=UPSTREAM,
                      reason="malformed") == 4
        assert sample(svc, "equilibrium_signaler_entries_rejected_total", upstream=UPSTREAM,
                      reason="version") == 1
        fence = int(sample(svc, "equilibrium_signaler_fence", upstream=UPSTREAM))
        assert fence > 0
        for i in range(3):
            entries = sync_client.xrevrange(recommendation_stream(UPSTREAM, f"sc-{i}"), count=1)
            assert entries, f"no recommendation for sc-{i}"
            rec = verify_recommendation(entries[0][1], KEY, clock.now, UPSTREAM, f"sc-{i}",
                                        expected_endpoints=EPS)
            assert rec.fence == fence and rec.signer == "sig-a"
            assert rec.weight_map()[EPS[2]] == 0.0  # nothing to the slow endpoint
        assert not sync_client.exists(recommendation_stream(UPSTREAM, "sc-9"))
    finally:
        await svc.close()


async def test_a_summary_stream_planted_with_the_largest_id_is_repaired(
    redis_server: RedisHandle, sync_client: redis.Redis
) -> None:
    """A stranger's finding: with a sidecar's credentials, ``XADD <stream> MAXLEN 0
    18446744073709551615-18446744073709551615 ...`` made every sidecar's append of that
    upstream's summaries fail for good (EXHAUSTED), and nothing repaired it. The signaler
    deletes a summary stream whose last id lies in the future; the next summaries start it
    again and are planned with. (The signaler's clock is the real one here: Redis numbers
    the entries it appends by its own.)"""
    clock = Clock(time.time())
    svc = make_service(redis_server, "sig-a", clock)
    stream = summary_stream(UPSTREAM)
    try:
        await svc.run_epoch()
        sync_client.execute_command("XADD", stream, "MAXLEN", "0",
                                    "18446744073709551615-18446744073709551615", "v", "2")
        with pytest.raises(redis.ResponseError, match="exhausted"):
            sync_client.xadd(stream, signed(summary("sc-1", clock.now), KEY))
        clock.now += svc.config.discover_every + 1  # looked at once per discover_every
        await svc.run_epoch()
        assert sample(svc, "equilibrium_signaler_streams_repaired_total") == 1
        clock.now += 1
        sync_client.xadd(stream, signed(summary("sc-1", clock.now), KEY))  # the next summary
        await svc.run_epoch()
        assert sample(svc, "equilibrium_signaler_summaries_consumed_total",
                      upstream=UPSTREAM) == 1
        assert sync_client.xrevrange(recommendation_stream(UPSTREAM, "sc-1"), count=1)
        # a stream of today's ids is left alone
        clock.now += svc.config.discover_every + 1
        await svc.run_epoch()
        assert sample(svc, "equilibrium_signaler_streams_repaired_total") == 1
        assert sync_client.exists(stream)
    finally:
        await svc.close()


async def test_a_restarted_signaler_reclaims_what_was_left_pending(
    redis_server: RedisHandle, sync_client: redis.Redis
) -> None:
    clock = Clock()
    first = make_service(redis_server, "sig-a", clock)
    stream = summary_stream(UPSTREAM)
    try:
        await first.run_epoch()
    finally:
        await first.close()
    for i in range(5):
        sync_client.xadd(stream, signed(summary(f"sc-{i}"), KEY))
    # sig-a read them and crashed before XACK: they stay pending for it
    read = sync_client.xreadgroup(SIGNALER_GROUP, "sig-a", {stream: ">"})
    assert len(read[0][1]) == 5 and pending(sync_client) == 5
    sync_client.xadd(stream, signed(summary("sc-5"), KEY))  # and one more arrives

    # sig-a's lease expires (a restarted process is another instance: it waits for that)
    sync_client.delete(leader_key(UPSTREAM))
    restarted = make_service(redis_server, "sig-a", clock)
    try:
        clock.now += 1
        await restarted.run_epoch()
        assert pending(sync_client) == 0
        assert sample(restarted, "equilibrium_signaler_entries_reclaimed_total",
                      upstream=UPSTREAM) == 5
        assert sorted(restarted.views[UPSTREAM].latest) == [f"sc-{i}" for i in range(6)]
        assert sample(restarted, "equilibrium_signaler_recommendations_published_total",
                      upstream=UPSTREAM) == 6
    finally:
        await restarted.close()


async def test_the_standby_takes_over_and_fences_the_old_leader(
    redis_server: RedisHandle, sync_client: redis.Redis
) -> None:
    clock = Clock()
    # lease of 1.5 epochs of 0.2 s: 300 ms
    a = make_service(redis_server, "sig-a", clock, lease_epochs=1.5, epoch=0.2)
    b = make_service(redis_server, "sig-b", clock, lease_epochs=1.5, epoch=0.2)
    stream = summary_stream(UPSTREAM)
    try:
        sync_client.xadd(stream, signed(summary("sc-0"), KEY))
        await a.run_epoch()
        await b.run_epoch()
        assert a.status[UPSTREAM].leader and not b.status[UPSTREAM].leader
        old_fence = a.status[UPSTREAM].fence
        assert old_fence is not None
        # a stops renewing (a long pause): its lease expires and b is elected
        await asyncio.sleep(0.45)
        sync_client.xadd(stream, signed(summary("sc-0", sent_at=T0 + 1), KEY))
        clock.now += 1
        await b.run_epoch()
        assert b.status[UPSTREAM].leader
        new_fence = b.status[UPSTREAM].fence
        assert new_fence is not None and new_fence > old_fence
        rec_stream = recommendation_stream(UPSTREAM, "sc-0")
        newest = sync_client.xrevrange(rec_stream, count=1)[0][1]
        assert verify_recommendation(newest, KEY, clock.now, UPSTREAM, "sc-0").signer == "sig-b"
        # the deposed leader wakes up and tries to publish its old plan: refused by the script
        before = sync_client.xlen(rec_stream)
        plan = a.status[UPSTREAM].plan
        assert plan is not None
        await a._publish(UPSTREAM, plan, clock.now)
        assert sync_client.xlen(rec_stream) == before
        assert sample(a, "equilibrium_signaler_publish_fenced_total", upstream=UPSTREAM) == 1
        assert not a.status[UPSTREAM].leader
        await a.run_epoch()  # and on its next epoch it stands by
        assert not a.status[UPSTREAM].leader and b.status[UPSTREAM].leader
    finally:
        await a.close()
        await b.close()


def routed_table() -> tuple[UpstreamTable, SidecarMetrics]:
    from mesh.profiles import get_profile

    table = UpstreamTable("equilibrium", get_profile("balanced"))
    table.apply({UPSTREAM: EPS}, 0.0)
    return table, SidecarMetrics()


def rec(**changes: object) -> Recommendation:
    import time

    now = time.time()
    base = Recommendation(
        upstream=UPSTREAM, sidecar="sc-1", epoch=10, issued_at=now, expires_at=now + 30,
        endpoints=EPS, weights=(0.9, 0.1, 0.0), status="optimal", objective=1.0, ce_gap=0.0,
        signer="sig-a", fence=10,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def rejected(metrics: SidecarMetrics, reason: str) -> float:
    return metrics.registry.get_sample_value(
        "equilibrium_signaling_recommendations_rejected_total",
        {"upstream": UPSTREAM, "reason": reason}) or 0.0


async def test_the_sidecar_publishes_summaries_and_ignores_forged_signals(
    redis_server: RedisHandle, sync_client: redis.Redis
) -> None:
    table, metrics = routed_table()
    group = table.get(UPSTREAM)
    assert group is not None
    client = SidecarSignaling(
        sidecar_id="sc-1", table=table, metrics=SignalingMetrics(metrics.registry),
        settings=SignalingSettings(redis_url=redis_server.url, key=KEY, epoch=0.1),
        store=RedisSignalStore(redis_server.url, 0.25),
    )
    stream = recommendation_stream(UPSTREAM, "sc-1")
    try:
        forged = sign_recommendation(rec(), b"someone-elses-key-0123456789abcdef")
        unsigned = sign_recommendation(rec(), KEY)
        del unsigned["sig"]
        for fields, reason in [(forged, "bad-signature"), (unsigned, "unsigned"),
                               ({"v": "1", "type": "recommendation"}, "malformed")]:
            sync_client.xadd(stream, fields)
            await client.run_round()
            assert rejected(metrics, reason) == 1
        group.tick(1.0)
        assert group.snapshot is not None and not group.snapshot.following
        summaries = sync_client.xrange(summary_stream(UPSTREAM))
        assert len(summaries) == 3  # one per round, trimmed streams (MAXLEN ~)
        assert decode_summary(summaries[-1][1]).sidecar == "sc-1"

        sync_client.xadd(stream, sign_recommendation(rec(), KEY))
        await client.run_round()
        group.tick(1.5)
        assert group.snapshot.following

        # Redis goes away: the next round fails fast and the sidecar stops following at once
        task = asyncio.create_task(client.run())
        await asyncio.sleep(0.3)
        assert client.connected
        redis_server.kill()
        for _ in range(50):
            if not client.connected:
                break
            await asyncio.sleep(0.1)
        assert not client.connected
        group.tick(2.0)
        assert not group.snapshot.following
        assert metrics.registry.get_sample_value("equilibrium_signaling_fallbacks_total") == 1
        # back: it reconnects by itself and follows a fresh recommendation again
        redis_server.start()
        fresh = redis_server.client()
        try:
            fresh.xadd(stream, sign_recommendation(rec(epoch=11, fence=11), KEY))
        finally:
            fresh.close()
        for _ in range(100):
            group.tick(3.0)
            if client.connected and group.snapshot.following:
                break
            await asyncio.sleep(0.1)
        assert client.connected and group.snapshot.following
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await client.store.close()
