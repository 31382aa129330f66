"""sidecar.signaling: which recommendations the sidecar follows (signature, freshness,
epoch, fence, its own clock), its protocol ids, and the rule that Redis needs a mesh key.

No Redis here: the client talks to the in-memory signal store
(tests/integration/test_signaling_redis.py runs the same code against a real one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from dataclasses import replace

import pytest

from mesh.policies import RegretMatchingPolicy
from sidecar.config import ConfigError, ConfigSource
from sidecar.metrics import SidecarMetrics, SignalingMetrics
from sidecar.signaling import (
    SidecarSignaling,
    SignalingSettings,
    protocol_id,
    signaling_settings,
)
from sidecar.upstreams import UpstreamTable
from tests.signaling_samples import EPS, KEY, NOW, routed_group
from wire.memory_store import MemorySignalStore
from wire.recommendation import Recommendation, sign_recommendation
from wire.redis_store import RedisSignalStore


def signaling(table: UpstreamTable, metrics: SidecarMetrics,
              wall: float = NOW) -> SidecarSignaling:
    return SidecarSignaling(
        sidecar_id="sc-1", table=table, metrics=SignalingMetrics(metrics.registry),
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


def test_following_stopping_and_coming_back_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    # A helper's finding: sidecars logged nothing when the signaler died or came back; only
    # a gauge changed.
    table, metrics = routed_group()
    group = table.get("orders")
    assert group is not None
    sig = signaling(table, metrics)
    caplog.set_level(logging.INFO, logger="sidecar.signaling")
    group.tick(10.0)
    sig._export_following()  # not following yet at the start: nothing to say
    assert sig.consider(group, b"1-0", sign_recommendation(rec(expires_at=NOW + 2), KEY))
    group.tick(10.5)
    sig._export_following()
    sig._busy_since["orders"] = -math.inf  # its summaries report demand all along
    group.tick(12.5)  # the recommendation expired: the signaler said nothing since
    sig._export_following()
    sig._export_following()  # said once
    assert sig.consider(group, b"2-0", sign_recommendation(rec(epoch=51, expires_at=NOW + 5),
                                                            KEY))
    group.tick(13.0)
    sig._export_following()
    # its own lines: another logger's (the table's "endpoints:" line) shows when an earlier test
    # in the same worker left the "sidecar" logger at INFO
    said = [r.getMessage() for r in caplog.records if r.name == "sidecar.signaling"]
    assert said == [
        "signaling: upstream orders follows the signaler's plan",
        "signaling: upstream orders has no fresh recommendation (the signaler stopped, or "
        "cannot be heard): routing by local regret matching",
        "signaling: upstream orders follows the signaler's plan again",
    ]


def test_a_caller_idle_when_its_plan_expires_is_not_warned_about(
        caplog: pytest.LogCaptureFixture) -> None:
    """A stranger's finding: one request every 7 s made a WARNING blaming the signaler and
    an INFO line back at each of them. The signaler plans for the demand sidecars report:
    an idle caller's plan expires, which is no fault. Warned only once it has reported
    demand for the first recommendation's wait and two epochs more without a plan."""
    table, metrics = routed_group()
    group = table.get("orders")
    assert group is not None
    sig = signaling(table, metrics)
    caplog.set_level(logging.INFO, logger="sidecar.signaling")
    assert sig.consider(group, b"1-0", sign_recommendation(rec(expires_at=NOW + 2), KEY))
    group.tick(10.5)
    sig._export_following()
    group.tick(12.5)  # expired while idle
    sig._export_following()
    assert sig.consider(group, b"2-0", sign_recommendation(rec(epoch=51, expires_at=NOW + 5),
                                                            KEY))
    group.tick(13.0)
    sig._export_following()
    said = [r.getMessage() for r in caplog.records if r.name == "sidecar.signaling"]
    assert said == ["signaling: upstream orders follows the signaler's plan"]

    def unplanned() -> float | None:  # what the EquilibriumSidecarNotFollowing alert reads
        return metrics.registry.get_sample_value("equilibrium_signaling_unplanned",
                                                 {"upstream": "orders"})

    assert unplanned() == 0
    group.tick(16.0)  # expired again, now with traffic that just began: within the grace
    sig._busy_since["orders"] = sig.clock() - 1.0
    sig._export_following()
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 0
    assert unplanned() == 0
    sig._busy_since["orders"] = sig.clock() - 60.0  # busy for a minute: the signaler is gone
    sig._export_following()
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "signaling: upstream orders has no fresh recommendation (the signaler stopped, or "
        "cannot be heard): routing by local regret matching"]
    assert unplanned() == 1
    assert sig.consider(group, b"3-0", sign_recommendation(rec(epoch=52, expires_at=NOW + 9),
                                                            KEY))
    group.tick(16.5)
    sig._export_following()
    assert unplanned() == 0  # following again


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


async def test_a_wrong_typed_recommendation_key_stops_only_its_own_upstream() -> None:
    """Issue 14, finding 7: a string where one upstream's recommendation stream belongs is
    counted for that upstream and stops it following; the other upstream still follows, and
    the round itself succeeds (it is not taken for Redis down)."""
    from mesh.profiles import get_profile
    from wire.keys import recommendation_stream

    table = UpstreamTable("equilibrium", get_profile("balanced"))
    table.apply({"orders": EPS, "payments": EPS}, 0.0)
    metrics = SidecarMetrics()
    sig = signaling(table, metrics)
    store = sig.store
    assert isinstance(store, MemorySignalStore)
    store.set_value(recommendation_stream("orders", "sc-1"), "not a stream")
    token = await store.acquire_lease("payments", "sig-a", 60_000)
    await store.publish_recommendation("payments", "sc-1", "sig-a", token,
                                       sign_recommendation(rec(upstream="payments"), KEY))
    await sig.run_round()
    errors = metrics.registry.get_sample_value(
        "equilibrium_signaling_key_errors_total", {"upstream": "orders", "key": "recs"})
    assert errors == 1
    for name in ("orders", "payments"):  # both summaries were appended
        assert metrics.registry.get_sample_value(
            "equilibrium_signaling_summaries_published_total", {"upstream": name}) == 1, name
    for name, following in (("orders", False), ("payments", True)):
        group = table.get(name)
        assert group is not None
        group.tick(10.5)
        assert group.snapshot is not None and group.snapshot.following is following, name


async def test_a_redis_never_reached_is_logged_once_at_the_first_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A mistyped host, port or password: the sidecar never connects, so the warning that a
    # connection was lost never fires; the first failure must say so itself, once. The
    # store is the real Redis client, against a loopback port nothing listens on.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"redis://127.0.0.1:{port}"
    table, metrics = routed_group()
    client = SidecarSignaling(
        sidecar_id="sc-1", table=table,
        metrics=SignalingMetrics(metrics.registry),
        settings=SignalingSettings(redis_url=url, key=KEY, epoch=0.05, timeout=0.2,
                                   backoff_min=0.01, backoff_max=0.02),
        store=RedisSignalStore(url, 0.2), clock=time.monotonic, wall=time.time)
    caplog.set_level(logging.WARNING, logger="sidecar.signaling")
    task = asyncio.create_task(client.run())
    try:
        for _ in range(100):
            errors = sum(sample.value for family in metrics.registry.collect()
                         if family.name == "equilibrium_signaling_redis_errors"
                         for sample in family.samples if sample.name.endswith("_total"))
            if errors >= 3:
                break
            await asyncio.sleep(0.02)
        assert errors >= 3
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("signaling: cannot reach Redis")
    # nothing reached Redis, so nothing counts as published (it counted each one it tried)
    assert not [sample for family in metrics.registry.collect()
                if family.name == "equilibrium_signaling_summaries_published"
                for sample in family.samples if sample.name.endswith("_total")]
