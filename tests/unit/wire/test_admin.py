"""The admin probes' answers (wire/admin.py) and what the sidecar's and the signaler's health
objects make of their state."""

from __future__ import annotations

import json
import math

from sidecar.admin import Readiness
from signaler.admin import SignalerHealth
from wire.admin import json_safe, liveness, readiness


def test_probe_answers() -> None:
    assert liveness() == (200, {"status": "alive"})
    assert readiness(None) == (200, {"status": "ready"})
    assert readiness("draining") == (503, {"status": "draining"})


def test_json_safe_turns_non_finite_numbers_into_null_at_any_depth() -> None:
    state = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": (2, "x"), "e": None}
    safe = json_safe(state)
    assert safe == {"a": None, "b": [1.0, None, {"c": None}], "d": [2, "x"], "e": None}
    json.dumps(safe, allow_nan=False)  # valid JSON


def test_the_sidecar_is_ready_once_started_until_it_drains() -> None:
    health = Readiness()
    assert health.not_ready == "starting" and not health.ready
    health.started = True
    assert health.not_ready is None and health.ready
    health.draining = True
    assert health.not_ready == "draining" and not health.ready


def test_the_signaler_is_ready_once_an_epoch_reached_redis_until_it_stops() -> None:
    health = SignalerHealth()
    assert health.not_ready == "starting"
    health.started = True
    assert health.not_ready == "redis-unreachable"
    health.redis_ok = True
    assert health.not_ready is None and health.ready
    health.stopping = True
    assert health.not_ready == "stopping" and not health.ready
