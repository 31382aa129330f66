"""Least privilege on a real Redis: the ACL users of ``wire/acl.py``, applied with
``ACL SETUSER`` exactly as generated (the same rules ``k8s/`` and ``compose.yaml`` pass to
``redis-server --user``).

A sidecar's credentials append summaries and read recommendations, and nothing else: no
recommendation written, no stream deleted, no lease taken, no server flushed. With the two
users the whole plane still works: the signaler discovers the upstream, leads it, consumes
the sidecar's signed summary and publishes a recommendation the sidecar reads.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from urllib.parse import quote, urlsplit

import pytest
import redis
from redis.exceptions import NoPermissionError, ResponseError

from signaler.service import SignalerConfig, SignalerService
from tests.redis_fixture import RedisHandle
from tests.signaling_samples import signed
from wire.acl import SIDECAR_USER, SIGNALER_USER, acl_rules
from wire.keys import fence_key, leader_key, recommendation_stream, summary_stream
from wire.recommendation import verify_recommendation
from wire.redis_store import RedisSignalStore
from wire.summary import RegretSummary

KEY = b"acl-test-mesh-key-0123456789abcdef"
EPS = ("http://127.0.0.1:9001", "http://127.0.0.1:9002")
UPSTREAM = "orders"


def url(server: RedisHandle, user: str, password: str) -> str:
    return f"redis://{quote(user)}:{quote(password)}@{server.host}:{server.port}/0"


@pytest.fixture
def users(redis_server: RedisHandle) -> Iterator[dict[str, str]]:
    """Both roles' users on the server, with fresh passwords: role -> URL."""
    admin = redis_server.client()
    passwords = {"sidecar": secrets.token_hex(16), "signaler": secrets.token_hex(16)}
    for role, user in (("sidecar", SIDECAR_USER), ("signaler", SIGNALER_USER)):
        admin.execute_command("ACL", "SETUSER", user, *acl_rules(role, passwords[role]))
    try:
        yield {"sidecar": url(redis_server, SIDECAR_USER, passwords["sidecar"]),
               "signaler": url(redis_server, SIGNALER_USER, passwords["signaler"])}
    finally:
        admin.close()


def summary(sent_at: float) -> RegretSummary:
    return RegretSummary(
        sidecar="sc-1", upstream=UPSTREAM, epoch=int(sent_at), sent_at=sent_at, endpoints=EPS,
        requests=(10, 10), failures=(0, 0), latency_mean=(0.01, 0.2), latency_p50=(0.01, 0.2),
        latency_p99=(0.02, 0.3), in_flight=(0, 0), demand=20.0, weights=(0.5, 0.5),
        regret=((0.0, -0.19), (0.19, 0.0)),
    )


def test_a_sidecars_credentials_append_and_read_and_nothing_more(
    users: dict[str, str],
) -> None:
    sidecar = redis.Redis.from_url(users["sidecar"])
    try:
        sidecar.xadd(summary_stream(UPSTREAM), signed(summary(time.time()), KEY))  # allowed
        assert sidecar.xrevrange(recommendation_stream(UPSTREAM, "sc-1"), count=1) == []
        forbidden = [
            ("write a recommendation",
             lambda: sidecar.xadd(recommendation_stream(UPSTREAM, "sc-1"), {"v": "1"})),
            ("delete a stream", lambda: sidecar.delete(summary_stream(UPSTREAM))),
            ("unlink a stream", lambda: sidecar.unlink(summary_stream(UPSTREAM))),
            ("flush the server", lambda: sidecar.flushall()),
            ("take the lease", lambda: sidecar.set(leader_key(UPSTREAM), "me 99")),
            ("move the fence", lambda: sidecar.incr(fence_key(UPSTREAM))),
            ("read the others' summaries",
             lambda: sidecar.xrange(summary_stream(UPSTREAM))),
            ("run a script", lambda: sidecar.eval("return 1", 0)),
            ("trim by XTRIM", lambda: sidecar.xtrim(summary_stream(UPSTREAM), maxlen=0)),
            ("write outside eq:", lambda: sidecar.xadd("other:summaries", {"a": "1"})),
            ("reconfigure", lambda: sidecar.config_set("appendonly", "no")),
            ("change users", lambda: sidecar.acl_setuser("x", enabled=True)),
        ]
        for what, attempt in forbidden:
            with pytest.raises((NoPermissionError, ResponseError), match=r"(?i)noperm|permission"):
                attempt()
                pytest.fail(f"a sidecar could {what}")
    finally:
        sidecar.close()


async def test_the_plane_works_with_the_two_least_privilege_users(
    users: dict[str, str], redis_server: RedisHandle
) -> None:
    sidecar = RedisSignalStore(users["sidecar"], 1.0)
    config = SignalerConfig(redis_url=users["signaler"], signer="sig-a", key=KEY, tokens=4,
                            epoch=1.0, discover_every=0.0)  # discovers: SCAN as eq-signaler
    signaler = SignalerService(config, store=RedisSignalStore(users["signaler"], 1.0))
    try:
        got = await sidecar.exchange([(UPSTREAM, signed(summary(time.time()), KEY))],
                                     [(UPSTREAM, "sc-1")])
        assert list(got) == [None] and got.append_errors == {}
        for _ in range(3):  # discover and probe, elect and take over, consume, plan, publish
            await signaler.run_epoch()
            await sidecar.exchange([(UPSTREAM, signed(summary(time.time()), KEY))], [])
        assert signaler.status[UPSTREAM].leader and signaler.status[UPSTREAM].published >= 1
        (entry,) = await sidecar.exchange([], [(UPSTREAM, "sc-1")])
        assert entry is not None and not isinstance(entry, Exception)
        rec = verify_recommendation(entry.fields, KEY, time.time(), UPSTREAM, "sc-1",
                                    expected_endpoints=EPS)
        assert rec.weight_map()[EPS[1]] < rec.weight_map()[EPS[0]]  # the slow one gets less
        await signaler._release_all()  # DEL inside the release script, as eq-signaler
        admin = redis_server.client()
        try:
            assert admin.get(leader_key(UPSTREAM)) is None
        finally:
            admin.close()
    finally:
        await sidecar.close()
        await signaler.close()


async def test_a_batch_of_recommendations_as_the_signaler_user_after_a_script_flush(
    users: dict[str, str], redis_server: RedisHandle
) -> None:
    """One pipelined round trip per epoch, as eq-signaler (who may not run SCRIPT EXISTS),
    also after Redis lost its scripts (a restart): loaded again and sent once more."""
    store = RedisSignalStore(users["signaler"], 1.0)
    admin = redis_server.client()
    try:
        token = await store.acquire_lease(UPSTREAM, "sig-a", 60_000)
        batch = [(f"sc-{i}", {"n": str(i)}) for i in range(20)]
        first = await store.publish_recommendations(UPSTREAM, "sig-a", token, batch)
        assert all(isinstance(entry_id, str) for entry_id in first)
        admin.script_flush()
        again = await store.publish_recommendations(UPSTREAM, "sig-a", token, batch)
        assert all(isinstance(entry_id, str) for entry_id in again)
        assert admin.xlen(recommendation_stream(UPSTREAM, "sc-7")) == 2
    finally:
        admin.close()
        await store.close()


async def test_a_signaler_given_the_sidecars_user_says_redis_refused_it_until_fixed(
    redis_server: RedisHandle, users: dict[str, str], caplog: pytest.LogCaptureFixture,
) -> None:
    """The stranger's finding: given the sidecar's credentials, the signaler logged "Redis
    unreachable" and "Redis reachable" by turns (the scan it may not run is not in every
    epoch) and read as ready between. It now says once that Redis refused it, and why,
    reads as not ready with that reason, and once the user may run what it needs (the
    ACL fixed live), says so once and is ready."""
    import asyncio
    import logging

    svc = SignalerService(
        # ten epochs between two scans (the review's point: with five, "served again" came
        # between every two scans)
        SignalerConfig(redis_url=users["sidecar"], signer="sig-acl", key=KEY, epoch=0.02,
                       redis_timeout=1.0, backoff_max=0.02, discover_every=0.2),
        store=RedisSignalStore(users["sidecar"], 1.0), clock=time.time)
    caplog.set_level(logging.INFO, logger="signaler.service")
    stop = asyncio.Event()
    task = asyncio.create_task(svc.run(stop))
    try:
        seen: set[str | None] = set()
        for _ in range(100):  # 2 s: several discoveries, and epochs without one between
            await asyncio.sleep(0.02)
            if svc.health.started:
                seen.add(svc.health.not_ready)
        assert seen == {"redis-refused-permissions"}
        admin = redis_server.client()  # the sidecar's user may now do what a signaler does
        try:
            password = urlsplit(users["sidecar"]).password
            assert password is not None
            admin.execute_command("ACL", "SETUSER", SIDECAR_USER,
                                  *acl_rules("signaler", password))
        finally:
            admin.close()
        for _ in range(200):
            if svc.health.ready:
                break
            await asyncio.sleep(0.02)
        assert svc.health.ready
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    lines = [r.getMessage() for r in caplog.records]
    refused = [m for m in lines if "Redis refused it (permissions" in m]
    assert len(refused) == 1, lines
    assert "ACL" in refused[0]
    assert not [m for m in lines if "Redis unreachable" in m or "Redis reachable" in m], lines
    assert len([m for m in lines if "Redis serves it again" in m]) == 1


async def test_a_signaler_without_the_password_says_redis_wants_one(
    redis_server: RedisHandle, users: dict[str, str], caplog: pytest.LogCaptureFixture,
) -> None:
    import asyncio
    import logging

    bare = f"redis://{redis_server.host}:{redis_server.port}/0"
    svc = SignalerService(
        SignalerConfig(redis_url=bare, signer="sig-noauth", key=KEY, epoch=0.05,
                       redis_timeout=1.0, backoff_max=0.05, discover_every=0.2),
        store=RedisSignalStore(bare, 1.0), clock=time.time)
    caplog.set_level(logging.WARNING, logger="signaler.service")
    stop = asyncio.Event()
    task = asyncio.create_task(svc.run(stop))
    try:
        await asyncio.sleep(0.5)
        assert svc.health.not_ready == "redis-refused-authentication"
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    [line] = [r.getMessage() for r in caplog.records]
    assert "Redis refused it (authentication" in line
