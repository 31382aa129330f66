"""The in-memory signal store on its own clock, and the signaling plane running through it.

What both stores share is checked in tests/integration/test_signal_store_contract.py; here,
what only a store on a clock passed in can show without waiting (lease expiry, ids in one
millisecond, exact trimming), and the sidecar and the signaler meeting through one store with
no network at all.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from mesh.policies import RegretMatchingPolicy
from mesh.policy import Outcome
from mesh.profiles import get_profile
from sidecar.metrics import SidecarMetrics, SignalingMetrics
from sidecar.signaling import SidecarSignaling, SignalingSettings
from sidecar.upstreams import UpstreamTable
from signaler.service import SignalerConfig, SignalerService
from wire.keys import RECOMMENDATION_MAXLEN, SUMMARY_MAXLEN, recommendation_stream, summary_stream
from wire.memory_store import MemorySignalStore
from wire.summary import RegretSummary, decode_summary, encode_summary

KEY = b"unit-test-mesh-key-0123456789abcdef"
T0 = 1_764_183_600.0
EPS = ("http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003")


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def summary(sidecar: str = "sc-1", **changes: object) -> RegretSummary:
    base = RegretSummary(
        sidecar=sidecar, upstream="orders", epoch=100, sent_at=T0, endpoints=EPS,
        requests=(40, 40, 20), failures=(0, 0, 0), latency_mean=(0.010, 0.012, 0.300),
        latency_p50=(0.009, 0.011, 0.250), latency_p99=(0.020, 0.030, 0.600),
        in_flight=(1, 1, 3), demand=50.0, weights=(0.4, 0.4, 0.2),
        regret=((0.0, -0.002, -0.29), (0.002, 0.0, -0.28), (0.29, 0.288, 0.0)),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


async def test_ids_follow_the_clock_and_stay_increasing_within_a_millisecond() -> None:
    clock = Clock()
    store = MemorySignalStore(clock)
    for _ in range(3):
        await store.exchange([("orders", encode_summary(summary()))], [])
    clock.now += 0.5
    await store.exchange([("orders", encode_summary(summary()))], [])
    clock.now -= 10  # a clock stepped back never makes ids go back
    await store.exchange([("orders", encode_summary(summary()))], [])
    ms = int(T0 * 1000)
    ids = [entry_id for entry_id, _ in store.entries(summary_stream("orders"))]
    assert ids == [f"{ms}-0", f"{ms}-1", f"{ms}-2", f"{ms + 500}-0", f"{ms + 500}-1"]


async def test_streams_are_trimmed_to_their_bound_and_trimmed_pending_entries_are_dropped() -> None:
    store = MemorySignalStore(Clock())
    await store.ensure_group("orders")
    await store.exchange([("orders", encode_summary(summary("sc-0")))], [])
    delivered = await store.read_summaries("orders", "sig-a", 10)
    assert store.pending("orders") == 1
    more = [("orders", encode_summary(summary(f"sc-{i}"))) for i in range(1, SUMMARY_MAXLEN + 1)]
    await store.exchange(more, [])
    entries = store.entries(summary_stream("orders"))
    assert len(entries) == SUMMARY_MAXLEN
    assert decode_summary(entries[0][1]).sidecar == "sc-1"  # sc-0 was trimmed away
    cursor, claimed = await store.claim_pending("orders", "sig-b", "0-0", 10)
    assert (cursor, claimed) == ("0-0", []) and delivered  # and dropped from the group
    assert store.pending("orders") == 0

    token = await store.acquire_lease("orders", "sig-a", 1000)
    for n in range(RECOMMENDATION_MAXLEN + 5):
        await store.publish_recommendation("orders", "sc-1", "sig-a", token, {"n": str(n)})
    assert len(store.entries(recommendation_stream("orders", "sc-1"))) == RECOMMENDATION_MAXLEN


async def test_the_lease_expires_on_the_clock_given() -> None:
    clock = Clock()
    store = MemorySignalStore(clock)
    a = await store.acquire_lease("orders", "sig-a", 3000)
    clock.now += 2.9
    assert await store.acquire_lease("orders", "sig-b", 3000) == 0
    assert await store.acquire_lease("orders", "sig-a", 3000) == a  # renewed from here
    clock.now += 2.9
    assert await store.acquire_lease("orders", "sig-b", 3000) == 0
    clock.now += 0.2
    assert await store.acquire_lease("orders", "sig-b", 3000) == a + 1
    assert await store.publish_recommendation("orders", "sc-1", "sig-a", a, {"n": "1"}) is None
    await store.close()  # nothing to release; the store still works
    assert await store.acquire_lease("orders", "sig-b", 3000) == a + 1


async def test_a_lost_group_is_created_again_by_the_next_read() -> None:
    store = MemorySignalStore(Clock())
    await store.exchange([("orders", encode_summary(summary()))], [])
    assert await store.upstreams() == {"orders"}
    assert [e.id for e in await store.read_summaries("orders", "sig-a", 10)] == [
        e.id for e in await store.newest_summaries("orders", 1)]


async def test_the_sidecar_follows_the_signaler_through_one_memory_store() -> None:
    """The whole signaling plane in one process: summaries out, a signed plan back, followed."""
    wall = Clock()
    store = MemorySignalStore(wall)
    table = UpstreamTable("equilibrium", get_profile("balanced"))
    table.apply({"orders": EPS}, 0.0)
    group = table.get("orders")
    assert group is not None
    policy = group.policy
    assert isinstance(policy, RegretMatchingPolicy)
    metrics = SidecarMetrics()
    monotonic = Clock(100.0)
    sidecar = SidecarSignaling(
        sidecar_id="sc-1", table=table, metrics=SignalingMetrics(metrics.registry),
        settings=SignalingSettings(redis_url="redis://unused:1", key=KEY, epoch=1.0),
        store=store, clock=monotonic, wall=wall,
    )
    signaler = SignalerService(
        SignalerConfig(redis_url="redis://unused:1", signer="sig-a", key=KEY, epoch=1.0,
                       tokens=8, upstreams=("orders",)),
        store=store, clock=wall, rng=np.random.default_rng(3),
    )
    for _ in range(3):
        for i in range(30):  # EPS[2] is slow
            endpoint = EPS[i % 3]
            policy.on_start(endpoint, monotonic.now)
            policy.on_outcome(Outcome(endpoint, 0.3 if endpoint == EPS[2] else 0.01, True,
                                      monotonic.now))
        group.tick(monotonic.now)
        await sidecar.run_round()
        await signaler.run_epoch()
        wall.now += 1.0
        monotonic.now += 1.0
    await sidecar.run_round()  # reads the newest recommendation and follows it
    group.tick(monotonic.now)
    assert group.snapshot is not None and group.snapshot.following
    accepted = metrics.registry.get_sample_value(
        "equilibrium_signaling_recommendations_accepted_total", {"upstream": "orders"})
    assert accepted is not None and accepted >= 1
    assert store.pending("orders") == 0
    plan = signaler.status["orders"].plan
    assert plan is not None and plan.weights["sc-1"][EPS[2]] == 0.0
