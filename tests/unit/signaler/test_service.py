"""signaler.service: summary entries applied or counted by reason (forged, unsigned and
badly-timed ones too), and a plan that cannot be solved counted without publishing.

No Redis here: the service talks to the in-memory signal store
(tests/integration/test_signaling_redis.py runs the same code against a real one).
"""

from __future__ import annotations

import pytest

from signaler.latency_model import LatencyModel
from signaler.service import SignalerConfig, SignalerService
from tests.signaling_samples import EPS, KEY, NOW, signed, summary
from wire.memory_store import MemorySignalStore
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


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({b"v": b"1", b"type": b"summary"}, "malformed"),
        (signed({**encode_summary(summary()), "demand": "nan"}), "malformed"),
        (signed({**encode_summary(summary()), "latency_mean": "[0.01, NaN, 0.3]"}), "malformed"),
        (signed({**encode_summary(summary()), "demand": "1e400"}), "malformed"),
        (signed({**encode_summary(summary()), "requests": "[1e30, 1, 1]"}), "malformed"),
        (signed({**encode_summary(summary()), "regret": "[[0,0,0],[0,0,0]]"}), "malformed"),
        (signed({**encode_summary(summary()), "v": "2"}), "version"),
        (signed({**encode_summary(summary()), "endpoints": "x" * 300_000}), "oversized"),
        (signed(summary(upstream="payments")), "wrong-upstream"),
        (None, "deleted"),
        ({b"\xff": b"1"}, "malformed"),
        # forged control data (issue 14, finding 6)
        (encode_summary(summary()), "unsigned"),
        ({**signed(summary()), "sig": ""}, "unsigned"),
        (signed(summary(), OTHER_KEY), "bad-signature"),
        ({**signed(summary()), "demand": "5000.0"}, "bad-signature"),
        ({**signed(summary()), "sig": "not a mac"}, "bad-signature"),
        (signed(summary(sent_at=NOW + 3600, epoch=10**9)), "not-yet-valid"),
        (signed(summary(sent_at=NOW + 5.5)), "not-yet-valid"),
        (signed(summary(sent_at=NOW - 6)), "expired"),
    ],
)
def test_bad_entries_are_counted_by_reason_and_never_raise(fields: object, reason: str) -> None:
    svc = service()
    assert svc.apply_entry("orders", fields) is False
    assert rejected(svc, reason) == 1
    assert "orders" not in svc.views or not svc.views["orders"].latest
    assert svc.apply_entry("orders", signed(summary())) is True
    assert svc.views["orders"].latest["sc-1"] == summary()


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
