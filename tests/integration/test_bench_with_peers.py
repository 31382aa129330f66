"""``equilibrium bench`` with real peers: HAProxy and nginx started by the harness as contenders.

Runs the two scenarios that have peers, briefly, through the command line, and checks what
each peer did (forwarded every request, CPU measured, the bad pod avoided by least-connections
balancing) and that the one-core maximum ran for each proxy. Orderings and measured-at-all
only: performance itself is the benchmark's business (docs/benchmarks.md), not a test's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import child_env

pytestmark = [pytest.mark.slow, pytest.mark.needs("haproxy", "nginx", "wrk")]

PEERS = ["haproxy-leastconn", "haproxy-random2", "nginx-least-conn", "nginx-random-two"]


def _bench(args: list[str], cwd: Path) -> dict:  # type: ignore[type-arg]
    proc = subprocess.run([sys.executable, "-m", "equilibrium", "bench", *args, "--out", "r"],
                          cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    scenario = args[args.index("--scenario") + 1]
    return json.loads((cwd / "r" / f"{scenario}.json").read_text())  # type: ignore[no-any-return]


def test_slow_pod_runs_haproxy_and_nginx_as_contenders(tmp_path: Path) -> None:
    doc = _bench(["--scenario", "slow-pod", "--policies", "round-robin", "--duration", "4",
                  "--peers", "auto"], tmp_path)
    assert doc["parameters"]["peers"] == PEERS
    assert "--peers auto" in doc["command"]
    rr = doc["data"]["policies"]["round-robin"]
    found = doc["data"]["peers"]
    assert list(found) == PEERS
    for name, m in found.items():
        # every request of both clients went through the peer and was answered by a pod
        assert m["requests"] == 2 * 100 * 4, name
        assert m["errors"] == 0, name
        # least connections (or the less loaded of two) keeps off the pod that holds requests
        # for 500 ms: less than the fifth round robin sends it
        assert m["bad_share"] < rr["bad_share"], name
    ratios = next(t for t in doc["tables"] if "ratio to haproxy-leastconn" in t["title"])
    assert [row[0] for row in ratios["rows"]] == ["round-robin", *PEERS]
    assert ratios["rows"][1][1:4] == ["1.00×", "1.00×", "1.00×"]


def test_proxy_overhead_measures_each_proxy_cpu_and_one_core_maximum(tmp_path: Path) -> None:
    doc = _bench(["--scenario", "proxy-overhead", "--duration", "1.5", "--rate", "200",
                  "--overhead-rounds", "1", "--overhead-warmup", "0.1",
                  "--overhead-warmup-segment", "0", "--overhead-max-duration", "2"], tmp_path)
    data = doc["data"]
    modes = ["direct", "proxied", "haproxy-leastconn", "nginx-least-conn"]
    assert list(data["errors"]) == modes and set(data["errors"].values()) == {0}
    # one schedule for all: 1.5 s at 200 req/s, less the first 0.1 s of each segment
    assert [data["latency"][m]["count"] for m in modes] == [280] * 4
    per_request = data["proxy_cpu_per_request_s"]
    assert set(per_request) == {"proxied", "haproxy-leastconn", "nginx-least-conn"}
    assert all(cpu > 0 for cpu in per_request.values()), per_request
    one_core = data["one_core"]
    assert list(one_core) == ["sidecar", "haproxy-leastconn", "nginx-least-conn"]
    for name, r in one_core.items():
        assert r["requests"] > 0 and r["errors"] == 0, (name, r)
        assert r["cpu_per_request_s"] > 0 and r["p50_s"] <= r["p99_s"], (name, r)
    # HAProxy, written in C for this, sustains more on one core than the Python sidecar
    assert one_core["haproxy-leastconn"]["requests_per_s"] > one_core["sidecar"]["requests_per_s"]
    table = next(t for t in doc["tables"] if t["title"].startswith("one core"))
    assert table["rows"][1][2] == "1.00×"
    targets = next(t for t in doc["tables"] if t["title"].startswith("targets (issue 11)"))
    assert [row[0].split(" ")[0] for row in targets["rows"]] == ["CPU", "added", "one"]
    assert all(row[2] in ("met", "missed") for row in targets["rows"])


@pytest.mark.needs("h2load")
def test_h2_overhead_measures_cpu_per_grpc_call_of_the_sidecar_and_haproxy(
        tmp_path: Path) -> None:
    doc = _bench(["--scenario", "h2-overhead", "--duration", "2", "--rate", "150",
                  "--h2-rounds", "1", "--h2-warmup-calls", "50"], tmp_path)
    modes = doc["data"]["modes"]
    # where the sidecar runs on libnghttp2, the same sidecar on pure-Python h2 runs beside it
    pure = doc["parameters"]["sidecar_h2_engine"] == "nghttp2"
    assert list(modes) == ["direct", "sidecar", *(["sidecar-h2"] if pure else []),
                           "haproxy-h2"]
    for name, m in modes.items():  # every call answered, through each path
        assert (m["calls"], m["failed"], m["non_2xx"]) == (300, 0, 0), name
    assert modes["sidecar"]["cpu_s"] > 0 and modes["haproxy-h2"]["cpu_s"] > 0
    ratio = doc["data"]["cpu_ratio_to_haproxy"]
    target = next(t for t in doc["tables"] if t["title"].startswith("target"))
    assert target["rows"][0][1] == f"{ratio:.2f}×"
    assert len(target["rows"]) == (2 if pure else 1)


def test_herding_runs_one_haproxy_per_client_on_a_uniform_fixed_fleet(tmp_path: Path) -> None:
    doc = _bench(["--scenario", "herding", "--herding-fleet", "uniform", "--herding-service",
                  "fixed", "--herding-big-rate", "25", "--clients", "2", "--rate", "20",
                  "--policies", "equilibrium", "--duration", "4", "--herding-warmup", "1",
                  "--peers", "auto"], tmp_path)
    assert "--peers auto" in doc["command"]
    assert doc["parameters"]["peers"] == "haproxy-leastconn (one per client)"
    assert "fixed service" in doc["parameters"]["pods"]
    policies = doc["data"]["policies"]
    assert list(policies) == ["equilibrium", "haproxy-leastconn"]
    for m in policies.values():
        assert m["errors"] == 0
        assert sum(m["steady_shares"].values()) == pytest.approx(1.0)
        assert set(m["steady_shares"]) == {"pod-0", "pod-1", "pod-2"}  # no small pod
        # two clients, each with its own balancer: both callers' requests were recorded
        assert len(m["by_caller_pod"]) == 2
        # a fixed 40 ms service: nothing answers faster
        assert m["latency"]["p50"] >= 0.040
    titles = [t["title"] for t in doc["tables"]]
    assert any("ratio to haproxy-leastconn" in t for t in titles)
    assert any("target (issue 12)" in t for t in titles)
