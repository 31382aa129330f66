"""One contract, two signal stores: the in-memory store behaves as the Redis one does.

Every test here runs against :class:`wire.memory_store.MemorySignalStore` and against
:class:`wire.redis_store.RedisSignalStore` on a real Redis (testcontainers, else a local
redis-server; one server for the module, a fresh upstream name per test). The last test feeds
the same summaries to the signaler through each store and checks that it plans and publishes
the same recommendations.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import numpy as np
import pytest
import redis.asyncio as aioredis

from signaler.service import SignalerConfig, SignalerService
from tests.redis_fixture import RedisHandle
from wire.keys import (
    RECOMMENDATION_TTL_MS,
    fence_key,
    recommendation_stream,
    summary_stream,
)
from wire.memory_store import MemorySignalStore
from wire.recommendation import verify_recommendation
from wire.redis_store import RedisSignalStore
from wire.store import KeyTypeError, SignalStore, StoreError, StreamEntry
from wire.summary import RegretSummary, decode_summary, encode_summary, sign_summary

KEY = b"contract-mesh-key-0123456789abcdef"
EPS = ("http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003")
T0 = 1_764_183_600.0
_names = itertools.count()


def fresh_upstream() -> str:
    return f"contract-{time.monotonic_ns()}-{next(_names)}"


def summary(upstream: str, sidecar: str, sent_at: float = T0, **changes: object) -> RegretSummary:
    base = RegretSummary(
        sidecar=sidecar, upstream=upstream, epoch=int(sent_at), sent_at=sent_at, endpoints=EPS,
        requests=(40, 40, 20), failures=(0, 0, 0), latency_mean=(0.010, 0.012, 0.300),
        latency_p50=(0.009, 0.011, 0.25), latency_p99=(0.02, 0.03, 0.6), in_flight=(0, 0, 0),
        demand=50.0, weights=(0.4, 0.4, 0.2),
        regret=((0.0, 0.0, -0.29), (0.0, 0.0, -0.28), (0.29, 0.288, 0.0)),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def make_store(kind: str, request: pytest.FixtureRequest,
               clock: Callable[[], float] = time.time) -> SignalStore:
    if kind == "memory":
        return MemorySignalStore(clock)
    server: RedisHandle = request.getfixturevalue("redis_server_session")
    return RedisSignalStore(server.url, 2.0)


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[SignalStore]:
    made = make_store(request.param, request)
    try:
        yield made
    finally:
        await made.close()


async def publish(store: SignalStore, upstream: str, *sidecars: str) -> None:
    for sidecar in sidecars:
        await store.exchange([(upstream, encode_summary(summary(upstream, sidecar)))], [])


def sidecars_of(entries: list[StreamEntry]) -> list[str]:
    out = []
    for entry in entries:
        assert entry.fields is not None
        out.append(decode_summary(entry.fields).sidecar)
    return out


def ids_increase(entries: list[StreamEntry]) -> bool:
    keys = [tuple(int(p) for p in e.id.split("-")) for e in entries]
    return keys == sorted(keys) and len(set(keys)) == len(keys)


# ------------------------------------------------------------------ the sidecar's exchange


async def test_exchange_appends_summaries_and_reads_the_newest_recommendation(
    store: SignalStore,
) -> None:
    upstream = fresh_upstream()
    fields = encode_summary(summary(upstream, "sc-1"))
    assert await store.exchange([(upstream, fields)], [(upstream, "sc-1")]) == [None]
    newest = await store.newest_summaries(upstream, 10)
    assert len(newest) == 1 and newest[0].fields is not None
    assert newest[0].fields == {k.encode(): v.encode() for k, v in fields.items()}  # bytes back
    assert decode_summary(newest[0].fields) == summary(upstream, "sc-1")

    token = await store.acquire_lease(upstream, "sig-a", 60_000)
    first = await store.publish_recommendation(upstream, "sc-1", "sig-a", token, {"n": "1"})
    second = await store.publish_recommendation(upstream, "sc-1", "sig-a", token, {"n": "2"})
    assert first is not None and second is not None
    got = await store.exchange([], [(upstream, "sc-2"), (upstream, "sc-1")])
    assert got[0] is None
    assert got[1] == StreamEntry(second, {b"n": b"2"})


async def test_a_summary_stream_with_a_last_id_from_the_future_is_repaired(
    store: SignalStore,
) -> None:
    """Only a stream whose last id lies a century past the reader's clock is deleted (a
    planted id: at the largest, every sidecar's append fails); one of today's is left."""
    upstream = fresh_upstream()
    now = time.time()
    assert not await store.repair_summaries(upstream, now)  # none: nothing to do
    await publish(store, upstream, "sc-1")
    assert not await store.repair_summaries(upstream, now)
    assert len(await store.newest_summaries(upstream, 10)) == 1
    key = summary_stream(upstream)
    if isinstance(store, MemorySignalStore):  # its appends are numbered by its clock only
        store._streams[key].last_id = (2**64 - 1, 2**64 - 1)
    else:
        assert isinstance(store, RedisSignalStore)
        client = aioredis.Redis.from_url(store.url)
        try:
            await client.execute_command("XADD", key, "MAXLEN", "0",
                                         "18446744073709551615-18446744073709551615", "v", "2")
        finally:
            await client.aclose()
    assert await store.repair_summaries(upstream, now)
    assert await store.newest_summaries(upstream, 10) == []
    await publish(store, upstream, "sc-2")  # appends start it again
    assert sidecars_of(await store.newest_summaries(upstream, 10)) == ["sc-2"]
    assert not await store.repair_summaries(upstream, now)


async def test_a_batch_of_recommendations_is_fenced_like_one(store: SignalStore) -> None:
    upstream = fresh_upstream()
    token = await store.acquire_lease(upstream, "sig-a", 60_000)
    sidecars = [f"sc-{i}" for i in range(50)]
    ids = await store.publish_recommendations(
        upstream, "sig-a", token, [(s, {"n": s}) for s in sidecars])
    assert len(ids) == 50 and all(isinstance(i, str) for i in ids)
    got = await store.exchange([], [(upstream, s) for s in sidecars])
    assert [entry.fields for entry in got] == [{b"n": s.encode()} for s in sidecars]
    # another holder, or a stale token, publishes nothing
    assert await store.publish_recommendations(
        upstream, "sig-b", token, [("sc-0", {"n": "x"})]) == [None]
    assert await store.publish_recommendations(
        upstream, "sig-a", token + 1, [("sc-0", {"n": "x"})]) == [None]
    assert await store.publish_recommendations(upstream, "sig-a", token, []) == []
    newest = await store.exchange([], [(upstream, "sc-0")])
    assert newest[0] is not None and newest[0].fields == {b"n": b"sc-0"}


async def test_recommendation_streams_stay_short_and_keep_the_newest(store: SignalStore) -> None:
    upstream = fresh_upstream()
    token = await store.acquire_lease(upstream, "sig-a", 60_000)
    for n in range(300):
        assert await store.publish_recommendation(upstream, "sc-1", "sig-a", token,
                                                  {"n": str(n)})
    newest = await store.exchange([], [(upstream, "sc-1")])
    assert newest[0] is not None and newest[0].fields == {b"n": b"299"}


async def test_a_recommendation_stream_expires_unless_recommended_again(
        request: pytest.FixtureRequest) -> None:
    """A stranger's finding: each sidecar's recommendation stream stayed in Redis for good
    after the sidecar was gone (one per pod of every rollout, which the signaler's SCAN
    walks). Each append, single or batched, sets its time to live again."""
    store = make_store("redis", request)
    server: RedisHandle = request.getfixturevalue("redis_server_session")
    client = aioredis.from_url(server.url)
    try:
        upstream = fresh_upstream()
        token = await store.acquire_lease(upstream, "sig-a", 60_000)
        assert await store.publish_recommendation(upstream, "sc-1", "sig-a", token, {"n": "1"})
        assert await store.publish_recommendations(
            upstream, "sig-a", token, [("sc-2", {"n": "2"}), ("sc-3", {"n": "3"})])
        await store.publish_recommendations(  # different fields: one script call each
            upstream, "sig-a", token, [("sc-4", {"n": "4"}), ("sc-5", {"m": "5"})])
        for sidecar in ("sc-1", "sc-2", "sc-3", "sc-4", "sc-5"):
            ttl = await client.pttl(recommendation_stream(upstream, sidecar))
            assert 0 < ttl <= RECOMMENDATION_TTL_MS, (sidecar, ttl)
        # fenced off: nothing appended, no stream made
        assert await store.publish_recommendations(
            upstream, "sig-b", token, [("sc-6", {"n": "6"})]) == [None]
        assert await client.exists(recommendation_stream(upstream, "sc-6")) == 0
    finally:
        await client.aclose()
        await store.close()


# ------------------------------------------------------------------ the consumer group


async def test_the_group_hands_out_each_entry_once_and_keeps_it_pending_until_acked(
    store: SignalStore,
) -> None:
    upstream = fresh_upstream()
    await store.ensure_group(upstream)
    await store.ensure_group(upstream)  # idempotent
    assert await store.read_summaries(upstream, "sig-a", 10) == []
    await publish(store, upstream, "sc-0", "sc-1", "sc-2", "sc-3", "sc-4")
    first = await store.read_summaries(upstream, "sig-a", 3)
    assert sidecars_of(first) == ["sc-0", "sc-1", "sc-2"] and ids_increase(first)
    rest = await store.read_summaries(upstream, "sig-a", 10)
    assert sidecars_of(rest) == ["sc-3", "sc-4"]
    assert await store.read_summaries(upstream, "sig-a", 10) == []
    await store.ack(upstream, [e.id for e in first])
    await store.ack(upstream, [])
    # sig-a crashed before acking the rest: sig-b takes them over, in batches
    cursor, claimed = await store.claim_pending(upstream, "sig-b", "0-0", 1)
    assert sidecars_of(claimed) == ["sc-3"] and cursor == rest[1].id
    cursor, claimed = await store.claim_pending(upstream, "sig-b", cursor, 1)
    assert sidecars_of(claimed) == ["sc-4"] and cursor == "0-0"
    # claimed entries stay pending (now sig-b's) until acked
    cursor, again = await store.claim_pending(upstream, "sig-c", "0-0", 10)
    assert [e.id for e in again] == [e.id for e in rest] and cursor == "0-0"
    await store.ack(upstream, [e.id for e in again])
    assert await store.claim_pending(upstream, "sig-c", "0-0", 10) == ("0-0", [])
    # the warm-up read sees acknowledged entries too, newest first
    assert sidecars_of(await store.newest_summaries(upstream, 2)) == ["sc-4", "sc-3"]
    assert len(await store.newest_summaries(upstream, 100)) == 5


async def test_reading_without_a_group_creates_it_from_the_start(store: SignalStore) -> None:
    upstream = fresh_upstream()
    await publish(store, upstream, "sc-0", "sc-1")
    assert sidecars_of(await store.read_summaries(upstream, "sig-a", 10)) == ["sc-0", "sc-1"]
    never = fresh_upstream()
    assert await store.read_summaries(never, "sig-a", 10) == []
    with pytest.raises(StoreError, match="NOGROUP"):  # claims follow ensure_group
        await store.claim_pending(fresh_upstream(), "sig-a", "0-0", 10)
    assert await store.newest_summaries(fresh_upstream(), 10) == []
    await store.ack(fresh_upstream(), ["1-0"])  # nothing to acknowledge: no error


async def test_ping_answers_and_touches_no_key(store: SignalStore) -> None:
    before = await store.upstreams()
    await store.ping()
    assert await store.upstreams() == before


async def test_upstreams_are_discovered_from_their_summary_streams(store: SignalStore) -> None:
    a, b = fresh_upstream(), fresh_upstream()
    await publish(store, a, "sc-1")
    await store.ensure_group(b)  # an empty stream counts too
    token = await store.acquire_lease(a, "sig-a", 60_000)
    await store.publish_recommendation(a, "sc-1", "sig-a", token, {"n": "1"})
    found = await store.upstreams()
    assert {a, b} <= found  # and nothing from the recommendation streams or the lease
    assert all(":" not in name for name in found)


# ------------------------------------------------------------------ the lease and the fence


async def test_the_lease_is_renewed_by_its_holder_and_fences_everyone_else(
    store: SignalStore,
) -> None:
    upstream = fresh_upstream()
    await store.seed_fence(upstream, 1000)
    await store.seed_fence(upstream, 5)  # exists: unchanged
    a = await store.acquire_lease(upstream, "sig-a", 60_000)
    assert a == 1001
    assert await store.acquire_lease(upstream, "sig-b", 60_000) == 0  # b stands by
    assert await store.acquire_lease(upstream, "sig-a", 60_000) == a  # a renews
    assert await store.publish_recommendation(upstream, "sc-1", "sig-b", a, {"n": "1"}) is None
    assert await store.publish_recommendation(upstream, "sc-1", "sig-a", a + 1, {"n": "1"}) is None
    assert await store.publish_recommendation(upstream, "sc-1", "sig-a", a, {"n": "1"})
    assert not await store.release_lease(upstream, "sig-b", a)  # not b's
    assert not await store.release_lease(upstream, "sig-a", a - 1)  # not under that token
    assert await store.release_lease(upstream, "sig-a", a)
    assert await store.publish_recommendation(upstream, "sc-1", "sig-a", a, {"n": "2"}) is None
    b = await store.acquire_lease(upstream, "sig-b", 60_000)
    assert b == a + 1  # every new leader's token is above every earlier one
    newest = await store.exchange([], [(upstream, "sc-1")])
    assert newest[0] is not None and newest[0].fields == {b"n": b"1"}


async def test_an_unrenewed_lease_expires_and_the_next_holder_gets_a_larger_token(
    store: SignalStore,
) -> None:
    upstream = fresh_upstream()
    a = await store.acquire_lease(upstream, "sig-a", 150)
    assert a >= 1
    assert await store.acquire_lease(upstream, "sig-b", 150) == 0
    await asyncio.sleep(0.3)
    b = await store.acquire_lease(upstream, "sig-b", 60_000)
    assert b > a
    assert await store.acquire_lease(upstream, "sig-a", 60_000) == 0
    assert await store.publish_recommendation(upstream, "sc-1", "sig-a", a, {"n": "1"}) is None


def plant(store: SignalStore, request: pytest.FixtureRequest, key: str, value: str) -> None:
    """``SET key value`` in the store, whatever the key held (a stray write, an attack)."""
    if isinstance(store, MemorySignalStore):
        store.set_value(key, value)
        return
    server: RedisHandle = request.getfixturevalue("redis_server_session")
    client = server.client()
    try:
        client.set(key, value)
    finally:
        client.close()


async def test_a_wrong_typed_key_fails_only_what_touches_it(
    store: SignalStore, request: pytest.FixtureRequest
) -> None:
    clobbered, clean, counter = fresh_upstream(), fresh_upstream(), fresh_upstream()
    plant(store, request, summary_stream(clobbered), "not a stream")
    plant(store, request, recommendation_stream(clean, "sc-1"), "not a stream")
    plant(store, request, fence_key(counter), "not a number")
    fields = encode_summary(summary(clean, "sc-1"))
    got = await store.exchange(
        [(clobbered, fields), (clean, fields)],
        [(clobbered, "sc-1"), (clean, "sc-1"), (clean, "sc-2")])
    assert list(got.append_errors) == [clobbered]
    assert got.append_errors[clobbered].role == "summaries"
    assert got[0] is None and got[2] is None
    assert isinstance(got[1], KeyTypeError) and (got[1].upstream, got[1].role) == (clean, "recs")
    assert len(await store.newest_summaries(clean, 10)) == 1  # the other append went through
    for call in (store.ensure_group(clobbered), store.read_summaries(clobbered, "sig-a", 10),
                 store.newest_summaries(clobbered, 10)):
        with pytest.raises(KeyTypeError) as caught:
            await call
        assert caught.value.kind == "WRONGTYPE" and caught.value.upstream == clobbered
    with pytest.raises(KeyTypeError) as bad_fence:
        await store.acquire_lease(counter, "sig-a", 60_000)
    assert (bad_fence.value.kind, bad_fence.value.role) == ("NOTINTEGER", "fence")
    token = await store.acquire_lease(clean, "sig-a", 60_000)
    assert await store.lease_holder(clean) == "sig-a"
    with pytest.raises(KeyTypeError) as bad_recs:
        await store.publish_recommendation(clean, "sc-1", "sig-a", token, {"n": "1"})
    assert bad_recs.value.role == "recs"
    assert await store.publish_recommendation(clean, "sc-2", "sig-a", token, {"n": "1"})
    # in one batch, the bad stream is that sidecar's problem only
    batch = await store.publish_recommendations(
        clean, "sig-a", token, [("sc-2", {"n": "2"}), ("sc-1", {"n": "2"}), ("sc-3", {"n": "2"})])
    assert isinstance(batch[1], KeyTypeError) and batch[1].role == "recs"
    assert isinstance(batch[0], str) and isinstance(batch[2], str)
    assert await store.lease_holder(counter) is None
    assert clobbered in await store.upstreams()  # SCAN finds a key whatever its type


async def test_values_only_redis_can_hold_fail_only_their_upstream(
    redis_server_session: RedisHandle,
) -> None:
    # What a writer to Redis without the mesh key can plant beyond a wrong type: a stream at
    # its largest id (XADD * fails on it forever), a fence INCR would overflow, and a fence
    # past 2^53 (no longer an exact token for Lua). Each fails its own key, not the round.
    store = RedisSignalStore(redis_server_session.url, 2.0)
    client = redis_server_session.client()
    try:
        full, clean, overflow, huge, big = (fresh_upstream() for _ in range(5))
        top = "18446744073709551615-18446744073709551615"
        client.xadd(summary_stream(full), {"a": "b"}, id=top)
        client.xadd(recommendation_stream(clean, "sc-1"), {"a": "b"}, id=top)
        client.set(fence_key(overflow), 2**63 - 1)
        client.set(fence_key(huge), 2**60)
        client.set(fence_key(big), 10**14)  # within 2^53: a token like any other
        fields = encode_summary(summary(clean, "sc-1"))
        got = await store.exchange([(full, fields), (clean, fields)], [(clean, "sc-2")])
        assert list(got.append_errors) == [full]
        assert (got.append_errors[full].kind, got.append_errors[full].role) == (
            "EXHAUSTED", "summaries")
        assert len(await store.newest_summaries(clean, 10)) == 1 and got[0] is None
        token = await store.acquire_lease(clean, "sig-a", 60_000)
        batch = await store.publish_recommendations(
            clean, "sig-a", token, [("sc-2", {"n": "1"}), ("sc-1", {"n": "1"})])
        assert isinstance(batch[0], str)
        assert isinstance(batch[1], KeyTypeError) and batch[1].kind == "EXHAUSTED"
        for upstream in (overflow, huge):
            with pytest.raises(KeyTypeError) as caught:
                await store.acquire_lease(upstream, "sig-a", 60_000)
            assert (caught.value.kind, caught.value.role) == ("NOTINTEGER", "fence")
        token = await store.acquire_lease(big, "sig-a", 60_000)
        assert token == 10**14 + 1
        assert await store.acquire_lease(big, "sig-a", 60_000) == token  # renewed: it matches
        assert await store.publish_recommendation(big, "sc-1", "sig-a", token, {"n": "1"})
    finally:
        client.close()
        await store.close()


# ------------------------------------------------------------------ the signaler on either store


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_the_signaler_plans_the_same_through_either_store(
    request: pytest.FixtureRequest,
) -> None:
    upstream = fresh_upstream()
    results = {}
    for kind in ("memory", "redis"):
        clock = Clock()
        store = make_store(kind, request, clock)
        config = SignalerConfig(redis_url="redis://unused:1", signer="sig-a", key=KEY,
                                epoch=1.0, tokens=12, upstreams=(upstream,), seed=7)
        service = SignalerService(config, store=store, clock=clock,
                                  rng=np.random.default_rng(7))
        try:
            for step in range(3):
                for i in range(3):
                    await store.exchange([(upstream, sign_summary(summary(
                        upstream, f"sc-{i}", sent_at=clock.now, demand=30.0 + 10 * i + step),
                        KEY))], [])
                await service.run_epoch()
                clock.now += 1.0
            plan = service.status[upstream].plan
            assert plan is not None
            got = await store.exchange([], [(upstream, f"sc-{i}") for i in range(3)])
            recs = []
            for i, entry in enumerate(got):
                assert entry is not None and entry.fields is not None
                recs.append(verify_recommendation(entry.fields, KEY, clock.now, upstream,
                                                  f"sc-{i}", expected_endpoints=EPS))
            results[kind] = (plan.configuration, plan.weights, plan.tokens,
                             service.status[upstream].published, recs)
        finally:
            await store.close()
    assert results["memory"] == results["redis"]
