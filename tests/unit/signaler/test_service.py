"""signaler.service: summary entries applied or counted by reason (forged, unsigned and
badly-timed ones too), and a plan that cannot be solved counted without publishing.

No Redis here: the service talks to the in-memory signal store
(tests/integration/test_signaling_redis.py runs the same code against a real one).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import pytest

from signaler.latency_model import LatencyModel
from signaler.service import SignalerConfig, SignalerService
from tests.signaling_samples import EPS, KEY, NOW, signed, summary, with_body
from wire.memory_store import MemorySignalStore
from wire.redis_store import RedisSignalStore
from wire.summary import encode_summary

OTHER_KEY = b"another-mesh-key-fedcba9876543210"


def service() -> SignalerService:
    return SignalerService(SignalerConfig(redis_url="redis://127.0.0.1:1", signer="sig-a",
                                          key=KEY, epoch=1.0),
                           store=MemorySignalStore(lambda: NOW), clock=lambda: NOW)


def rejected(svc: SignalerService, reason: str) -> float:
    value = svc.metrics.registry.get_sample_value(
        "equilibrium_signaler_entries_rejected_total", {"upstream": "orders", "reason": reason})
    return value or 0.0


V1 = encode_summary(summary(version=1))
"""The fields of a summary in version 1 (a field per value), still read."""


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({b"v": b"1", b"type": b"summary"}, "malformed"),
        ({b"v": b"2", b"type": b"summary"}, "malformed"),
        (signed(with_body('"demand":50.0', '"demand":NaN')), "malformed"),
        (signed(with_body('"demand":50.0', '"demand":1e400')), "malformed"),
        (signed(with_body('"requests":[40,', '"requests":[1e30,')), "malformed"),
        (signed(with_body('"regret":[[', '"regret":[[0,0,0],[')), "malformed"),
        (signed(with_body('"failures":[0,', '"failures":[41,')), "malformed"),
        (signed(with_body(',"demand"', ',"epoch":7,"demand"')), "malformed"),
        (signed(with_body('"regret"', '"regret" ')), "malformed"),
        (signed(with_body('"demand":50.0', '"demand":"50"')), "malformed"),
        (signed({**V1, "demand": "nan"}), "malformed"),
        (signed({**V1, "latency_mean": "[0.01, NaN, 0.3]"}), "malformed"),
        (signed({**V1, "demand": "1e400"}), "malformed"),
        (signed({**V1, "requests": "[1e30, 1, 1]"}), "malformed"),
        (signed({**V1, "regret": "[[0,0,0],[0,0,0]]"}), "malformed"),
        (signed({**V1, "v": "3"}), "version"),
        (signed({**encode_summary(summary()), "v": "3"}), "version"),
        (signed({**V1, "endpoints": "x" * 300_000}), "oversized"),
        (signed({**encode_summary(summary()), "body": "x" * 300_000}), "oversized"),
        (signed(summary(upstream="payments")), "wrong-upstream"),
        (signed(summary(upstream="payments", version=1)), "wrong-upstream"),
        (None, "deleted"),
        ({b"\xff": b"1"}, "malformed"),
        # forged control data (issue 14, finding 6)
        (encode_summary(summary()), "unsigned"),
        (V1, "unsigned"),
        ({**signed(summary()), "sig": ""}, "unsigned"),
        (signed(summary(), OTHER_KEY), "bad-signature"),
        (signed(summary(version=1), OTHER_KEY), "bad-signature"),
        ({**signed(summary()), "body": with_body('"demand":50.0', '"demand":5000.0')["body"]},
         "bad-signature"),
        ({**signed(summary(version=1)), "demand": "5000.0"}, "bad-signature"),
        ({**signed(summary(version=1)), "v": "2"}, "malformed"),
        ({**signed(summary()), "sig": "not a mac"}, "bad-signature"),
        (signed(summary(sent_at=NOW + 3600, epoch=10**9)), "not-yet-valid"),
        (signed(summary(sent_at=NOW + 5.5)), "not-yet-valid"),
        (signed(summary(sent_at=NOW - 6)), "expired"),
        (signed(summary(sent_at=NOW - 6, version=1)), "expired"),
    ],
)
def test_bad_entries_are_counted_by_reason_and_never_raise(fields: object, reason: str) -> None:
    svc = service()
    assert svc.apply_entry("orders", fields) is False
    assert rejected(svc, reason) == 1
    assert "orders" not in svc.views or not svc.views["orders"].latest
    assert svc.apply_entry("orders", signed(summary())) is True
    assert svc.views["orders"].latest["sc-1"] == summary()


def test_a_summary_is_read_in_either_encoding() -> None:
    """Sidecars not yet upgraded write version 1; the signaler keeps what either says."""
    svc = service()
    assert svc.apply_entry("orders", signed(summary("sc-1", version=1)))
    assert svc.apply_entry("orders", signed(summary("sc-2")))
    latest = svc.views["orders"].latest
    assert latest["sc-1"] == summary("sc-1", version=1)
    assert latest["sc-2"] == summary("sc-2")
    assert latest["sc-1"].regret == latest["sc-2"].regret


async def test_a_plan_that_cannot_be_solved_is_counted_and_publishes_nothing() -> None:
    svc = service()
    svc._set_leader("orders", 3)
    svc.clock = lambda: NOW
    assert svc.apply_entry("orders", signed(summary()))
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


def _against_a_dead_redis(discover_every: float) -> SignalerService:
    """A signaler whose store is the real Redis client, against a loopback port nothing
    listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"redis://127.0.0.1:{port}"
    return SignalerService(
        SignalerConfig(redis_url=url, signer="sig-a", key=KEY, epoch=0.05, redis_timeout=0.2,
                       backoff_max=0.05, discover_every=discover_every),
        store=RedisSignalStore(url, 0.2), clock=time.time)


async def test_readiness_stays_down_while_redis_is_down_between_discoveries() -> None:
    # A fresh mesh: no upstream configured, none discovered yet. The epochs between two
    # discoveries have no key to touch; they used to count as "Redis reachable", so /readyz
    # flipped to ready against a Redis that does not answer. The store is the real Redis
    # client, against a loopback port nothing listens on.
    svc = _against_a_dead_redis(discover_every=10.0)
    stop = asyncio.Event()
    task = asyncio.create_task(svc.run(stop))
    seen: set[str | None] = set()
    try:
        for _ in range(40):  # 1 s: one discovery, then about twenty epochs without one
            await asyncio.sleep(0.025)
            if svc.health.started:
                seen.add(svc.health.not_ready)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert seen == {"redis-unreachable"}
    assert svc.metrics.registry.get_sample_value("equilibrium_signaler_redis_up") == 0
    epochs = svc.metrics.registry.get_sample_value("equilibrium_signaler_epochs_total")
    assert epochs is not None and epochs >= 5


async def test_a_redis_unreachable_from_the_start_is_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    # A signaler whose Redis never answered used to log nothing at all: the failure was
    # logged only on a change from reachable, and "started" was set before the first epoch.
    svc = _against_a_dead_redis(discover_every=0.05)
    stop = asyncio.Event()
    caplog.set_level(logging.WARNING, logger="signaler.service")
    task = asyncio.create_task(svc.run(stop))
    try:
        await asyncio.sleep(0.6)  # several failed epochs
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    told = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
    assert len(told) == 1, [r.getMessage() for r in caplog.records]
    failures = svc.metrics.registry.get_sample_value(
        "equilibrium_signaler_redis_errors_total", {"kind": "ConnectionError"})
    assert failures is not None and failures >= 2


async def test_an_epoch_with_nothing_to_serve_is_ready_when_the_store_answers() -> None:
    svc = SignalerService(SignalerConfig(redis_url="redis://127.0.0.1:1", signer="sig-a",
                                         key=KEY, epoch=0.05, discover_every=10.0),
                          store=MemorySignalStore(time.time), clock=time.time)
    stop = asyncio.Event()
    task = asyncio.create_task(svc.run(stop))
    try:
        for _ in range(100):
            if svc.health.ready:
                break
            await asyncio.sleep(0.01)
        assert svc.health.ready
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_a_stream_of_summaries_none_valid_is_counted_and_said(
        caplog: pytest.LogCaptureFixture) -> None:
    """A stranger's finding: with a mesh key that differs from the sidecars', the signaler
    never served their upstream and said nothing (its probe dropped what failed to verify),
    and no alert could fire. The probe counts it by the newest entry's reason, and a
    WARNING names the usual cause, once a minute."""
    svc = service()
    store = svc.store
    assert isinstance(store, MemorySignalStore)
    await store.exchange([("orders", signed(summary(), OTHER_KEY))] * 3, [])
    with caplog.at_level(logging.WARNING, logger="signaler.service"):
        await svc._probe("orders", NOW)
        await svc._probe("orders", NOW + 1.0)  # within the minute: counted, not said again
    assert "orders" not in svc._roster.active
    assert svc.metrics.registry.get_sample_value(
        "equilibrium_signaler_probes_rejected_total", {"reason": "bad-signature"}) == 2
    [line] = [r.getMessage() for r in caplog.records if "rejected summaries" in r.getMessage()]
    assert "on orders: bad-signature" in line and "mesh key" in line, line
