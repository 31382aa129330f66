"""The shipped alerts and dashboard (k8s/observability/) against the real system and promtool.

1. Every metric name the rules' expressions and the dashboard's targets use is exported: a real
   sidecar (outbound, ``--inbound`` in front of an app, ``--redis`` on the real-Redis fixture)
   and a real signaler run, requests flow through the outbound listener to two endpoints (one
   of them the sidecar's own inbound listener, so the inbound series appear too) until the
   sidecar follows the signaler's plan; both ``/metrics`` are scraped and parsed with
   prometheus_client's text parser, histogram and counter sample names resolved; every label a
   selector matches on exists on the scraped series. Then a real Prometheus (Debian's
   ``prometheus``) loads rules.yml and scrapes both processes every second: every recording
   rule yields a value, the endpoints' shares add up to 1, the failed ratio is 0 (not empty),
   the sidecar follows; every alert evaluates without error; every dashboard query is valid
   PromQL there and every panel but the failure-only ones shows data.
2. ``promtool check rules`` accepts the plain rules file, the PrometheusRule's groups and the
   dashboard's expressions; ``promtool test rules`` runs k8s/observability/rules_test.yml
   (alerts that fire and alerts that stay silent), and fails when an expectation is wrong.

promtool and prometheus come with Debian's ``prometheus`` package; without it these tests fail in CI
(EQUILIBRIUM_REQUIRE_PROMTOOL=1) and are skipped with the reason elsewhere.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.environment import require
from tests.integration.procs import (
    LOOPBACK,
    EquilibriumProcess,
    SidecarProcess,
    async_start_sidecar,
    backends,
    free_port,
    http_get,
    start_equilibrium,
)
from tests.observability_queries import (
    OBSERVABILITY,
    PROMETHEUS_RULE,
    RULES,
    RULES_TEST,
    TARGET_LABELS,
    all_queries,
    dashboard,
    dashboard_queries,
    rule_queries,
)
from tests.redis_fixture import RedisHandle

UPSTREAM = "svc"
EPOCH = "0.5"
MAX_REQUESTS = 800  # the load loop's bounds: whichever comes first
MAX_SECONDS = 25.0

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
            "gauge": ("",), "untyped": ("",), "info": ("_info",)}


def exported(text: str) -> dict[str, set[str] | None]:
    """Series name -> label names of its samples (None: declared, no sample yet)."""
    out: dict[str, set[str] | None] = {}
    for family in text_string_to_metric_families(text):
        for suffix in SUFFIXES.get(family.type, ("",)):
            out.setdefault(family.name + suffix, None)
        for sample in family.samples:
            labels = out.get(sample.name) or set()
            out[sample.name] = labels | set(sample.labels)
    return out


def following(sidecar: SidecarProcess) -> bool:
    upstream = sidecar.state()["upstreams"].get(UPSTREAM, {})
    return bool(upstream.get("following"))


async def drive_until_following(sidecar: SidecarProcess) -> int:
    """GETs through the outbound listener until the sidecar follows a plan (bounded)."""
    sent = 0
    deadline = time.monotonic() + MAX_SECONDS
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while sent < MAX_REQUESTS and time.monotonic() < deadline:
            for _ in range(10):
                async with session.get(f"{sidecar.outbound_url}/work",
                                       headers={"Host": UPSTREAM}) as resp:
                    await resp.read()
                    assert resp.status == 200, (resp.status, await resp.text())
                sent += 1
            if sent >= 40 and await asyncio.to_thread(following, sidecar):
                return sent
            await asyncio.sleep(0.05)
    raise AssertionError(f"the sidecar did not follow the signaler after {sent} requests:\n"
                         f"{sidecar.output()[-2000:]}")


QUIET_PANELS = {"Retries, rescues, exhausted budget, sidecar errors",
                "Callers backing off (outbound)", "gRPC calls per second by status"}
"""Panels with no series while nothing fails and nobody is punished (counters never touched),
and the gRPC panel (this load is HTTP/1.1; rules_test.yml covers the gRPC rule)."""
RECORDED_PRESENT = (
    "namespace_upstream:equilibrium_requests:rate5m",
    "namespace_upstream_endpoint:equilibrium_requests:rate5m",
    "namespace_upstream:equilibrium_requests_failed:ratio_rate5m",
    "namespace_upstream_endpoint:equilibrium_requests:share5m",
    "namespace_upstream:equilibrium_request_duration_seconds:p50_5m",
    "namespace_upstream:equilibrium_request_duration_seconds:p99_5m",
    "namespace_upstream_endpoint:equilibrium_route_weight:avg",
    "namespace_upstream:equilibrium_signaling_following:ratio",
    "namespace_upstream:equilibrium_signaler_solve_seconds:p99_10m",
    "namespace_upstream:equilibrium_signaler_recommendations_published:rate5m",
)


async def trickle(sidecar: SidecarProcess, stop: asyncio.Event) -> None:
    """A light load (about 25 requests/s, bounded in time) while Prometheus scrapes."""
    deadline = time.monotonic() + MAX_SECONDS
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while not stop.is_set() and time.monotonic() < deadline:
            for _ in range(5):
                async with session.get(f"{sidecar.outbound_url}/work",
                                       headers={"Host": UPSTREAM}) as resp:
                    await resp.read()
            await asyncio.sleep(0.2)


def prometheus_binary() -> str:
    require("prometheus")
    path = shutil.which("prometheus")
    assert path is not None
    return path


async def rule_health(session: aiohttp.ClientSession, prometheus: str) -> dict[str, str]:
    """Each loaded rule's health once every rule has been evaluated (bounded wait): ``ok``,
    or ``err: <the evaluation error>``."""
    deadline = time.monotonic() + 10.0
    while True:
        async with session.get(f"{prometheus}/api/v1/rules") as resp:
            body = await resp.json()
        health = {rule["name"]: rule["health"] + (f": {rule['lastError']}"
                                                  if rule.get("lastError") else "")
                  for group in body["data"]["groups"] for rule in group["rules"]}
        if "unknown" not in health.values() or time.monotonic() > deadline:
            return health
        await asyncio.sleep(0.5)


async def panels_with_data(session: aiohttp.ClientSession, prometheus: str) -> set[str]:
    """The dashboard panels of which at least one target returns a series now."""
    shown: set[str] = set()
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = (target["expr"].replace("$__rate_interval", "1m")
                    .replace("$namespace", ".*").replace("$upstream", ".*"))
            async with session.get(f"{prometheus}/api/v1/query", params={"query": expr}) as resp:
                body = await resp.json()
            assert body["status"] == "success", (panel["title"], expr, body)
            if body["data"]["result"]:
                shown.add(panel["title"])
    return shown


async def recorded(
    sidecar: SidecarProcess, signaler_admin: str, tmp_path: Path
) -> tuple[dict[str, list[dict[str, object]]], set[str]]:
    """Run a real Prometheus with rules.yml scraping both processes every second. Once every
    recording rule has a value (bounded wait): those values, and the dashboard panels that
    show data."""
    binary = prometheus_binary()
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "equilibrium", "static_configs": [
            {"targets": [f"{LOOPBACK}:{sidecar.admin_port}"],
             "labels": {"namespace": "shop", "pod": "obs-0"}},
            {"targets": [signaler_admin],
             "labels": {"namespace": "equilibrium-system", "pod": "obs-signaler"}},
        ]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address={LOOPBACK}:{port}",
         "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    stop = asyncio.Event()
    load = asyncio.create_task(trickle(sidecar, stop))
    results: dict[str, list[dict[str, object]]] = {}
    try:
        deadline = time.monotonic() + MAX_SECONDS
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while time.monotonic() < deadline and len(results) < len(RECORDED_PRESENT):
                assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
                for name in RECORDED_PRESENT:
                    if name in results:
                        continue
                    try:
                        async with session.get(f"http://{LOOPBACK}:{port}/api/v1/query",
                                               params={"query": name}) as resp:
                            body = await resp.json() if resp.status == 200 else {}
                    except (aiohttp.ClientError, TimeoutError):
                        break  # not listening yet
                    found = body.get("data", {}).get("result", [])
                    if found:
                        results[name] = found
                await asyncio.sleep(0.5)
            panels = await panels_with_data(session, f"http://{LOOPBACK}:{port}")
            health = await rule_health(session, f"http://{LOOPBACK}:{port}")
    finally:
        stop.set()
        await load
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait, 5)
        log.close()
    missing = sorted(set(RECORDED_PRESENT) - set(results))
    assert not missing, f"no value for {missing}:\n{(tmp_path / 'prometheus.log').read_text()}"
    errors = {name: state for name, state in health.items() if state != "ok"}
    assert not errors, errors  # every rule evaluated on the real series, none failed
    assert len(health) == len(rule_queries())
    return results, panels


@pytest.mark.slow
async def test_rules_and_dashboard_use_real_metrics_and_record_real_values(
    redis_server: RedisHandle, tmp_path: Path,
) -> None:
    prometheus_binary()  # before starting anything
    env = {"EQUILIBRIUM_MESH_SECRET": secrets.token_hex(32)}
    inbound = f"{LOOPBACK}:{free_port()}"
    signaler_admin = f"{LOOPBACK}:{free_port()}"
    procs: list[EquilibriumProcess] = []
    async with backends(2, prefix="pod", latency=0.002) as (app, other):
        started = await asyncio.gather(
            async_start_sidecar(
                {UPSTREAM: [f"http://{inbound}", other.url]}, sidecar_id="obs-0", env=env,
                extra_args=["--inbound", inbound, "--app", app.url, "--redis", redis_server.url,
                            "--signaling-epoch", EPOCH]),
            asyncio.to_thread(
                start_equilibrium, "signaler", "--redis", redis_server.url, "--epoch", EPOCH,
                "--id", "obs-signaler", "--admin", signaler_admin, "--tokens", "8",
                env=env, ready_url=f"http://{signaler_admin}/readyz", timeout=60),
            return_exceptions=True)
        procs = [p for p in started if isinstance(p, EquilibriumProcess)]
        try:
            for result in started:
                if isinstance(result, BaseException):
                    raise result
            sidecar = started[0]
            assert isinstance(sidecar, SidecarProcess)
            await drive_until_following(sidecar)
            status, body = await asyncio.to_thread(http_get, f"http://{signaler_admin}/metrics")
            assert status == 200
            series = exported(sidecar.metrics_text()) | exported(body.decode())
            values, shown = await recorded(sidecar, signaler_admin, tmp_path)
        finally:
            await asyncio.gather(*(asyncio.to_thread(p.stop, 5.0) for p in procs))
            for proc in procs:
                proc.cleanup()

    # every panel shows data, except those that only show failures and punishments
    blank = {p["title"] for p in dashboard()["panels"] if p["type"] != "row"} - shown
    assert blank <= QUIET_PANELS, blank
    # the recording rules evaluate on the real series: the shares of the two endpoints of svc
    # add up to 1, nothing failed, the sidecar follows the signaler
    shares = {r["metric"]["endpoint"]: float(r["value"][1])  # type: ignore[index]
              for r in values["namespace_upstream_endpoint:equilibrium_requests:share5m"]}
    assert set(shares) == {f"http://{inbound}", other.url}, shares
    assert abs(sum(shares.values()) - 1.0) < 1e-6, shares
    failed = values["namespace_upstream:equilibrium_requests_failed:ratio_rate5m"]
    assert [float(r["value"][1]) for r in failed] == [0.0]  # type: ignore[index]
    follow = values["namespace_upstream:equilibrium_signaling_following:ratio"]
    assert [(r["metric"], float(r["value"][1])) for r in follow] == [  # type: ignore[index]
        ({"__name__": "namespace_upstream:equilibrium_signaling_following:ratio",
          "namespace": "shop", "upstream": UPSTREAM}, 1.0)]

    # labelled series of every part of the system appeared
    for name in ("equilibrium_requests_total", "equilibrium_request_duration_seconds_bucket",
                 "equilibrium_route_weight", "equilibrium_signaling_following",
                 "equilibrium_inbound_requests_total", "equilibrium_inbound_caller_reputation",
                 "equilibrium_signaler_solve_seconds_bucket", "equilibrium_signaler_leader",
                 "equilibrium_signaler_recommendations_published_total"):
        assert series.get(name), f"no sample of {name}"
    missing = [f"{q.where}: {name}" for q in all_queries() for name in sorted(q.metric_names())
               if name not in series]
    assert missing == [], missing
    wrong_labels = [
        f"{q.where}: {name} has no label {sorted(labels - sampled - TARGET_LABELS)}"
        for q in all_queries() for name, labels in q.matched_labels().items()
        if (sampled := series.get(name)) is not None and not labels - TARGET_LABELS <= sampled
    ]
    assert wrong_labels == [], wrong_labels


# ---------------------------------------------------------------------- promtool


def promtool() -> str:
    require("promtool")
    path = shutil.which("promtool")
    assert path is not None
    return path


def run_promtool(*args: str, cwd: Path = OBSERVABILITY) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, check=False)


def test_promtool_accepts_the_rules_files(tmp_path: Path) -> None:
    plain = run_promtool("check", "rules", str(RULES))
    assert plain.returncode == 0, plain.stdout + plain.stderr
    groups = yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]
    extracted = tmp_path / "from-prometheusrule.yml"
    extracted.write_text(yaml.safe_dump(groups))
    operator = run_promtool("check", "rules", str(extracted))
    assert operator.returncode == 0, operator.stdout + operator.stderr
    count = sum(len(g["rules"]) for g in groups["groups"])
    assert f"SUCCESS: {count} rules found" in operator.stdout


def test_promtool_accepts_the_dashboard_queries(tmp_path: Path) -> None:
    rules = [{"record": f"dashboard:query_{i}:check",
              "expr": q.expr.replace("$__rate_interval", "5m").replace("$namespace", ".*")
              .replace("$upstream", ".*")}
             for i, q in enumerate(dashboard_queries()) if not q.where.startswith("variable")]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    result = run_promtool("test", "rules", RULES_TEST.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_fail_on_a_wrong_expectation(tmp_path: Path) -> None:
    """The unit tests prove the expressions: expecting the following sidecar to alert fails."""
    shutil.copy(RULES, tmp_path / RULES.name)
    spec = yaml.safe_load(RULES_TEST.read_text())
    fired = spec["tests"][0]["alert_rule_test"][1]["exp_alerts"][0]
    assert fired["exp_labels"]["pod"] == "web-a"
    fired["exp_labels"]["pod"] = "web-b"
    (tmp_path / "wrong_test.yml").write_text(yaml.safe_dump(spec))
    result = run_promtool("test", "rules", "wrong_test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "EquilibriumSidecarNotFollowing" in result.stdout + result.stderr


@pytest.mark.parametrize("alert", ["EquilibriumSidecarNotFollowing",
                                   "EquilibriumRecommendationsForged",
                                   "EquilibriumEndpointStarved",
                                   "EquilibriumSignalerSolveNearEpoch",
                                   "EquilibriumSignalerRejectsSummaries"])
def test_rules_test_makes_alerts_fire(alert: str) -> None:
    spec = yaml.safe_load(RULES_TEST.read_text())
    fired = {case["alertname"] for test in spec["tests"] for case in test.get("alert_rule_test", [])
             if case["exp_alerts"]}
    silent = {case["alertname"] for test in spec["tests"]
              for case in test.get("alert_rule_test", []) if not case["exp_alerts"]}
    assert alert in fired
    assert {"EquilibriumRecommendationsRejected", "EquilibriumUpstreamHighErrorRatio"} <= silent


def test_promtool_accepts_the_example_configuration(tmp_path: Path) -> None:
    """k8s/observability/prometheus.yml: its rule file and its relabelling. Debian's promtool
    is built without Kubernetes discovery, so the discovery blocks become static targets."""
    config = yaml.safe_load((OBSERVABILITY / "prometheus.yml").read_text())
    assert config["rule_files"] == [RULES.name]
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs")[0]["role"] == "pod"
        job["static_configs"] = [{"targets": [f"{LOOPBACK}:9"]}]
        kept = [c for c in job["relabel_configs"] if c.get("action") == "keep"]
        assert kept, job["job_name"]
        assert {c.get("target_label") for c in job["relabel_configs"]} >= {"namespace", "pod"}
    shutil.copy(RULES, tmp_path / RULES.name)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = run_promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
