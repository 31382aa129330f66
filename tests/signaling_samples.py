"""Hand-made signaling values the unit tests of the signaler and the sidecar's signaling share:
the test mesh key, a clock reading, three endpoints (the third one bad), a summary a sidecar
could send about them, an upstream table that routes them, and three asymmetric latency
models for the planning code."""

from __future__ import annotations

from dataclasses import replace

from mesh.profiles import get_profile
from sidecar.metrics import SidecarMetrics
from sidecar.upstreams import UpstreamTable
from signaler.latency_model import LatencyModel
from wire.signing import mac
from wire.summary import (
    SUMMARY_FIELDS,
    RegretSummary,
    canonical_summary_bytes,
    encode_summary,
    sign_summary,
)

KEY = b"unit-test-mesh-key-0123456789abcdef"
NOW = 1_764_183_600.0
EPS = ("http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003")
BAD = EPS[2]

# Asymmetric M/M/1 endpoints: fast-but-far, slow-but-near, small.
ASYMMETRIC = (
    LatencyModel(d=0.010, mu=10.0),
    LatencyModel(d=0.020, mu=6.0),
    LatencyModel(d=0.005, mu=4.0),
)


def summary(sidecar: str = "sc-1", **changes: object) -> RegretSummary:
    base = RegretSummary(
        sidecar=sidecar,
        upstream="orders",
        epoch=100,
        sent_at=NOW,
        endpoints=EPS,
        requests=(40, 40, 20),
        failures=(0, 0, 0),
        latency_mean=(0.010, 0.012, 0.300),
        latency_p50=(0.009, 0.011, 0.250),
        latency_p99=(0.020, 0.030, 0.600),
        in_flight=(1, 1, 3),
        demand=50.0,
        weights=(0.4, 0.4, 0.2),
        regret=((0.0, -0.002, -0.29), (0.002, 0.0, -0.28), (0.29, 0.288, 0.0)),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def signed(value: RegretSummary | dict[str, str], key: bytes = KEY) -> dict[str, str]:
    """A summary's XADD fields signed with ``key``; a field map (perhaps with values no
    summary may have) is signed as it stands, so that a reader's checks past the signature
    are reached."""
    if isinstance(value, RegretSummary):
        return sign_summary(value, key)
    fields = {k: v for k, v in value.items() if k != "sig"}
    if all(name in fields for name in SUMMARY_FIELDS) or (
            fields.get("v") == "2" and "body" in fields):
        fields["sig"] = mac(key, canonical_summary_bytes(fields))
    return fields


def with_body(old: str, new: str, value: RegretSummary | None = None) -> dict[str, str]:
    """The unsigned version-2 fields of ``value`` (default :func:`summary`) with ``old``
    replaced by ``new`` in the body's text (which must hold ``old``)."""
    fields = encode_summary(value or summary())
    assert old in fields["body"], (old, fields["body"])
    return {**fields, "body": fields["body"].replace(old, new)}


def routed_group(upstream: str = "orders") -> tuple[UpstreamTable, SidecarMetrics]:
    table = UpstreamTable("equilibrium", get_profile("balanced"))
    table.apply({upstream: EPS}, 0.0)
    return table, SidecarMetrics()
