"""``equilibrium bench --scenario soak`` end to end, shortened: one minute at 120 req/s.

Real processes throughout (fleet, seven sidecars, an embedded redis-server killed and started
again twice, the signaler, four load processes). At this rate the pods are far from congested,
so the rogue is not punished and no cooperative request may fail: the run must pass, with two
Redis restarts the signaler came back from, and a resource sample series for every process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.concurrency import ConcurrencyParams
from tests.support import child_env

DURATION = 60
INTERVAL = 2


@pytest.mark.slow
def test_a_short_soak_survives_two_redis_restarts_and_reports_every_process(
    tmp_path: Path,
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "equilibrium", "bench", "--scenario", "soak",
         "--duration", str(DURATION), "--rate", "120", "--soak-sample-interval", str(INTERVAL),
         "--soak-redis-down", "2", "--out", "results"],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=280)
    doc = json.loads((tmp_path / "results" / "soak.json").read_text())
    data = doc["data"]
    assert proc.returncode == 0, (data["verdict"], proc.stderr[-3000:])
    assert data["verdict"] == {"passed": True, "reasons": []}

    # Redis was killed twice, at 1/3 and 2/3, and the signaler was ready again each time
    kills = data["redis_restarts"]
    assert [k["kill"] for k in kills] == [1, 2]
    for k, at in zip(kills, (DURATION / 3, 2 * DURATION / 3), strict=True):
        assert at - 1 <= k["killed_at_s"] <= at + 3
        assert k["restarted_at_s"] >= k["killed_at_s"] + 2
        assert k["signaler_ready_after_s"] is not None

    # a sample series for every process, the judged ones with their growth
    processes = data["processes"]
    expected = {"pod-0-in", "pod-1-in", "pod-2-in", "coop-1", "coop-2", "coop-3", "rogue",
                "signaler", "fleet"}
    assert set(processes) == expected
    for name, p in processes.items():
        assert p["exited_at_s"] is None, name
        assert len(p["samples"]) >= DURATION / INTERVAL - 3, name
        assert all(rss > 10_000 and fds > 0 for _, rss, fds in p["samples"]), name
        if name != "fleet":
            assert p["judged"]
            assert abs(data["growth"][name]["rss_growth"]) < 0.10, name
            assert sum(ok for _, ok in p["ready"]) >= len(p["ready"]) // 2, name

    # every request accounted for: cooperative ones all succeeded, per-second bins present
    callers = data["callers"]
    assert set(callers) == {"coop-1", "coop-2", "coop-3", "rogue"}
    for name, c in callers.items():
        planned = c["totals"]["planned"]
        assert planned == int(c["rate_rps"] * DURATION)
        assert sum(b["n"] for b in c["bins"]) == planned, name
        assert len(c["bins"]) >= DURATION - 2, name
        if c["cooperative"]:
            assert c["failed"] == {} and c["shed"] == {}, name
            assert sum(b["ok"] for b in c["bins"]) == planned, name

    # the inbound sidecars' admission gauges were sampled with their resources
    for name in ("pod-0-in", "pod-1-in", "pod-2-in"):
        gauges = processes[name]["inbound_gauges"]
        assert len(gauges) >= DURATION / INTERVAL - 3, name
        # never below the configured floor, except while the minimum-RTT probe pins the
        # limit to probe_limit (mesh.concurrency, Envoy's gradient controller does the same)
        assert all(g["concurrency_limit"] >= 8
                   or g["concurrency_limit"] == ConcurrencyParams().probe_limit
                   for _, g in gauges), name

    # what each inbound sidecar did with each caller's requests: all three saw traffic
    outcomes = data["inbound_outcomes_by_caller"]
    assert set(outcomes) == {"pod-0-in", "pod-1-in", "pod-2-in"}
    admitted = sum(o.get("admitted", 0) for per in outcomes.values() for o in per.values())
    assert admitted >= 0.9 * sum(c["totals"]["planned"] for c in callers.values())

    # the machine's CPU pressure was sampled with them (where the kernel reports it), so a
    # failure can be told apart from a machine that was saturated
    if Path("/proc/pressure/cpu").exists():
        pressure = data["cpu_pressure_some_avg10"]
        assert len(pressure) >= DURATION / INTERVAL - 3
        assert all(0.0 <= v <= 100.0 for _, v in pressure)

    md = (tmp_path / "results" / "soak.md").read_text()
    assert "CPU pressure (%)" in md
    for title in ("memory and open files per process", "requests per caller",
                  "soak over time", "Redis kills"):
        assert title in md
    assert (tmp_path / "results" / "soak.png").stat().st_size > 10_000
