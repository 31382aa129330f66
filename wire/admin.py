"""The admin listeners' HTTP answers, as the sidecar and the signaler both serve them.

Owns the paths and the JSON of the probes, so that one orchestrator config and one runbook fit
both services (docs/operations.md, first paragraph)::

    GET /healthz      200 {"status": "alive"}
    GET /readyz       200 {"status": "ready"}, or 503 {"status": WHY}
    GET /metrics      Prometheus text (the service's own registry)
    GET /debug/state  JSON (the service's own shape), non-finite numbers as null

``WHY`` is the service's own word: the sidecar says ``starting`` or ``draining``, the signaler
``starting``, ``redis-unreachable`` or ``stopping``. Pure: the aiohttp apps are the services'
(:mod:`sidecar.admin`, :mod:`signaler.admin`), which cannot share code with each other (they
are independent layers) and which this package must not serve for (no aiohttp below them).
"""

from __future__ import annotations

import math
from typing import Any

METRICS_PATH = "/metrics"
HEALTHZ_PATH = "/healthz"
READYZ_PATH = "/readyz"
DEBUG_STATE_PATH = "/debug/state"

Answer = tuple[int, dict[str, str]]
"""An HTTP status and its JSON body."""


def liveness() -> Answer:
    """``/healthz``: the process answers, so it is alive."""
    return 200, {"status": "alive"}


def readiness(not_ready: str | None) -> Answer:
    """``/readyz``: 200 when ready (``not_ready`` None), else 503 saying why."""
    if not_ready is None:
        return 200, {"status": "ready"}
    return 503, {"status": not_ready}


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, infinities: not JSON) replaced by None,
    through dicts, lists and tuples."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
