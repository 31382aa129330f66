"""``equilibrium bench --scenario grpc-slow-pod`` end to end: grpcio pods and clients, real
sidecars, the bench's JSON read back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import child_env


@pytest.mark.slow
def test_grpc_slow_pod_equilibrium_sends_less_to_the_bad_pod_than_round_robin(
    tmp_path: Path,
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "equilibrium", "bench", "--scenario", "grpc-slow-pod",
         "--duration", "6", "--rate", "50", "--policies", "pick-first,round-robin,equilibrium",
         "--out", "results"],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "results" / "grpc-slow-pod.json").read_text())
    policies = doc["data"]["policies"]
    assert list(policies) == ["pick-first", "round-robin", "equilibrium"]
    rr, eq = policies["round-robin"], policies["equilibrium"]
    for m in policies.values():
        # every call answered: 2 channels × 50 calls/s × 6 s, none failed
        assert m["requests"] == 2 * 50 * 6
        assert m["errors"] == 0, m["error_codes"]
        assert sum(m["pod_totals"].values()) == m["requests"]
        assert m["latency"]["p50"] <= m["latency"]["p99"] <= m["latency"]["p99.9"]
    # one channel per client, yet the sidecar spreads its calls over all five pods
    assert all(n > 0 for n in rr["pod_totals"].values()) and len(rr["pod_totals"]) == 5
    assert 0.15 < rr["bad_share"] < 0.25
    assert eq["bad_share"] < rr["bad_share"]
    assert eq["bad_share_steady"] < rr["bad_share_steady"]
    # pick_first without a sidecar: each client stays on one pod
    assert len([n for n in policies["pick-first"]["pod_totals"].values() if n]) <= 2
    md = (tmp_path / "results" / "grpc-slow-pod.md").read_text()
    assert "| equilibrium |" in md and "| pick-first |" in md
