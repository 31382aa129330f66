"""The shipped alerts and dashboard (k8s/observability/) are consistent, complete and ask only
for metrics and labels the code exports.

Against the metric classes themselves (sidecar/metrics.py, signaler/metrics.py); the
integration test tests/integration/test_observability.py checks the names against a real
``/metrics`` scrape and runs promtool.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from sidecar.metrics import H2Metrics, InboundMetrics, SidecarMetrics, SignalingMetrics
from signaler.metrics import SignalerMetrics
from tests.observability_queries import (
    DASHBOARD,
    PROMETHEUS_RULE,
    REPO,
    RULES,
    all_queries,
    dashboard,
    load_generator,
    recorded_labels,
    rule_groups,
    rules,
    undefined_labels,
)

RUNBOOK = "docs/operations.md#alerts-and-dashboard"
SEVERITIES = {"critical", "warning", "info"}


def exported_labels() -> dict[str, set[str]]:
    """Every series name the sidecar and the signaler export -> its label names."""
    sidecar = SidecarMetrics()
    owners: list[Any] = [sidecar, sidecar.outbound, SignalingMetrics(sidecar.registry),
                         InboundMetrics(sidecar.registry), H2Metrics(sidecar.registry),
                         sidecar.caller, SignalerMetrics()]
    out: dict[str, set[str]] = {}
    for owner in owners:
        # dir(), not vars(): a holder compiled by mypyc (make compile) has no __dict__
        for metric in (getattr(owner, name) for name in dir(owner)):
            if not isinstance(metric, MetricWrapperBase):
                continue
            name, labels, kind = metric._name, set(metric._labelnames), metric._type
            if kind == "counter":
                out[f"{name}_total"] = labels
            elif kind == "histogram":
                out |= {f"{name}_bucket": labels | {"le"}, f"{name}_sum": labels,
                        f"{name}_count": labels}
            else:
                out[name] = labels
    return out


def test_metric_classes_are_read() -> None:
    labels = exported_labels()
    assert labels["equilibrium_requests_total"] == {"upstream", "endpoint", "code"}
    assert labels["equilibrium_signaler_solve_seconds_bucket"] == {"upstream", "le"}
    assert labels["equilibrium_inbound_punished_callers"] == set()


def test_every_query_uses_exported_metrics_and_labels() -> None:
    assert undefined_labels(all_queries(), exported_labels()) == []


def test_undefined_labels_catches_a_wrong_name_and_label() -> None:
    from tests.observability_queries import Query

    bad = [Query("x", 'sum by (reason) (rate(equilibrium_requests_total{code="500"}[5m]))'),
           Query("y", 'equilibrium_route_weight{reason="x"}'),
           Query("z", "rate(equilibrium_request_total[5m])")]
    problems = undefined_labels(bad, exported_labels())
    assert len(problems) == 3, problems


def test_prometheus_rule_holds_exactly_the_plain_rules() -> None:
    plain = yaml.safe_load(RULES.read_text())
    operator = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert operator["apiVersion"] == "monitoring.coreos.com/v1"
    assert operator["kind"] == "PrometheusRule"
    assert operator["spec"]["groups"] == plain["groups"]
    generator = load_generator()
    assert PROMETHEUS_RULE.read_text() == generator.render(RULES.read_text()), (
        "run python k8s/observability/generate.py")


def test_dashboard_file_is_what_the_generator_renders() -> None:
    assert DASHBOARD.read_text() == load_generator().render_dashboard(), (
        "run python k8s/observability/generate.py")


def test_rule_names_are_unique_and_recordings_defined_before_use() -> None:
    names = [r.get("record") or r["alert"] for r in rules()]
    assert len(names) == len(set(names))
    defined: set[str] = set()
    for group in rule_groups():
        for rule in group["rules"]:
            used = set(re.findall(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b", str(rule["expr"])))
            assert used <= defined, (rule, used - defined)
            if "record" in rule:
                assert re.fullmatch(r"[a-z_]+:equilibrium_[a-z0-9_]+:[a-z0-9_]+",
                                    rule["record"]), rule["record"]
                defined.add(rule["record"])
    assert "namespace_upstream:equilibrium_request_duration_seconds:p99_5m" in recorded_labels()


def test_every_alert_has_severity_summary_and_runbook() -> None:
    alerts = [r for r in rules() if "alert" in r]
    assert len(alerts) >= 15
    for alert in alerts:
        assert alert["labels"]["severity"] in SEVERITIES, alert["alert"]
        assert alert["annotations"]["summary"].strip(), alert["alert"]
        assert RUNBOOK in alert["annotations"]["description"], alert["alert"]
        if "for" in alert:
            assert re.fullmatch(r"\d+[smh]", alert["for"]), alert["alert"]


def test_docs_table_lists_every_alert() -> None:
    docs = (REPO / "docs" / "operations.md").read_text()
    section = docs.split("## Alerts and dashboard", 1)[1].split("\n## ", 1)[0]
    for alert in (r["alert"] for r in rules() if "alert" in r):
        assert f"`{alert}`" in section, alert


def test_dashboard_panels_have_a_datasource_and_targets() -> None:
    board = dashboard()
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    assert board["schemaVersion"] >= 36  # Grafana 9+
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len(panels) >= 20
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == panel["datasource"]
    for variable in board["templating"]["list"]:
        assert variable["datasource"]["uid"] == "${DS_PROMETHEUS}"
    assert {v["name"] for v in board["templating"]["list"]} == {"namespace", "upstream"}


@pytest.mark.parametrize("wanted", [
    "equilibrium_route_weight", "equilibrium_request_duration_seconds_bucket",
    "equilibrium_regret", "equilibrium_nash_gap", "equilibrium_flapping",
    "equilibrium_signaling_following", "equilibrium_signaler_solve_seconds_bucket",
    "equilibrium_signaler_ce_gap_seconds", "equilibrium_signaler_recommendations_published_total",
    "equilibrium_signaling_recommendations_rejected_total",
    "equilibrium_inbound_punished_callers", "equilibrium_inbound_caller_reputation",
    "equilibrium_inbound_concurrency_limit", "equilibrium_inbound_clearing_price",
])
def test_dashboard_shows(wanted: str) -> None:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    assert any(wanted in e for e in exprs), wanted


def test_panels_do_not_overlap() -> None:
    cells: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, panel["title"]
        cells |= mine


def test_scrape_targets_match_the_injected_sidecar_and_the_signaler() -> None:
    """The PodMonitors and the vanilla scrape jobs name the ports the pods really declare."""
    from injector.config import InjectorConfig
    from injector.podspec import PodMeshSettings, sidecar_container

    sidecar = sidecar_container(InjectorConfig(), PodMeshSettings(strategy="balanced",
                                                                  app_port=8080))
    sidecar_port = sidecar["ports"][0]["name"]
    signaler = next(d for d in yaml.safe_load_all((REPO / "k8s/base/signaler.yaml").read_text())
                    if d and d["kind"] in ("Deployment", "StatefulSet"))
    pod = signaler["spec"]["template"]
    signaler_ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    signaler_app = pod["metadata"]["labels"]["app.kubernetes.io/name"]

    monitors = {m["metadata"]["name"]: m for m in yaml.safe_load_all(
        (REPO / "k8s/observability/podmonitors.yaml").read_text())}
    assert [e["port"] for e in monitors["equilibrium-sidecars"]["spec"]["podMetricsEndpoints"]] \
        == [sidecar_port]
    signaler_monitor = monitors["equilibrium-signaler"]["spec"]
    assert signaler_monitor["selector"]["matchLabels"] == {"app.kubernetes.io/name": signaler_app}
    assert {e["port"] for e in signaler_monitor["podMetricsEndpoints"]} <= signaler_ports

    jobs = {j["job_name"]: j for j in yaml.safe_load(
        (REPO / "k8s/observability/prometheus.yml").read_text())["scrape_configs"]}
    keeps = {name: next(c["regex"] for c in job["relabel_configs"] if c.get("action") == "keep")
             for name, job in jobs.items()}
    assert "admin" in signaler_ports
    # the controller and the injector, as k8s/install.yaml deploys them
    deployed = {d["metadata"]["name"]: d["spec"]["template"] for d in yaml.safe_load_all(
        (REPO / "k8s/install.yaml").read_text()) if d and d["kind"] == "Deployment"}
    expected = {"equilibrium-sidecars": sidecar_port,
                "equilibrium-signaler": f"{signaler_app};admin"}
    for name, port in (("equilibrium-controller", "metrics"), ("equilibrium-injector", "https")):
        template = deployed[name]
        app = template["metadata"]["labels"]["app.kubernetes.io/name"]
        ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        assert port in ports
        expected[name] = f"{app};{port}"
        monitor = monitors[name]["spec"]
        assert monitor["selector"]["matchLabels"] == {"app.kubernetes.io/name": app}
        assert [e["port"] for e in monitor["podMetricsEndpoints"]] == [port]
    assert keeps == expected
    injector = monitors["equilibrium-injector"]["spec"]["podMetricsEndpoints"][0]
    assert injector["scheme"] == "https" and jobs["equilibrium-injector"]["scheme"] == "https"
    assert injector["tlsConfig"]["ca"]["secret"]["name"] in {
        v["secret"]["secretName"] for v in deployed["equilibrium-injector"]["spec"]["volumes"]}
