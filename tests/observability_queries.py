"""What the shipped observability files (k8s/observability/) ask Prometheus for.

Reads the plain rules file, the PrometheusRule and the Grafana dashboard, and pulls out of
their PromQL the metric names, the labels each selector matches on and the labels each
aggregation groups by, so tests can check them against the metrics the code really exports
(``tests/unit/k8s/test_observability.py`` against the metric classes,
``tests/integration/test_observability.py`` against a real ``/metrics`` scrape). A pattern
reader, not a PromQL parser: it covers the constructs these files use.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
OBSERVABILITY = REPO / "k8s" / "observability"
RULES = OBSERVABILITY / "rules.yml"
PROMETHEUS_RULE = OBSERVABILITY / "prometheus-rules.yaml"
DASHBOARD = OBSERVABILITY / "grafana-dashboard.json"
RULES_TEST = OBSERVABILITY / "rules_test.yml"

TARGET_LABELS = frozenset({"namespace", "pod", "instance", "job"})
"""Labels Prometheus attaches to every scraped series (PodMonitor / kubernetes_sd relabelling)."""

_NAME = re.compile(r"(?<![\w:$])(equilibrium_[a-z0-9_]+)(?![\w:])")
_SELECTOR = re.compile(r"(?<![\w:$])(equilibrium_[a-z0-9_]+)\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|ignoring|on|without)\s*\(([^)]*)\)")
_RECORDED = re.compile(r"\b([a-z_]+:[a-z0-9_]+:[a-z0-9_]+)\b")


@dataclass(frozen=True)
class Query:
    """One PromQL expression and where it comes from (for failure messages)."""

    where: str
    expr: str

    def metric_names(self) -> set[str]:
        return set(_NAME.findall(self.expr))

    def matched_labels(self) -> dict[str, set[str]]:
        """Metric name -> the label names its selectors match on."""
        out: dict[str, set[str]] = {}
        for name, body in _SELECTOR.findall(self.expr):
            out.setdefault(name, set()).update(_MATCHER.findall(body))
        return out

    def grouping_labels(self) -> set[str]:
        """Labels named in by / ignoring / on / without clauses."""
        return {label.strip() for group in _GROUPING.findall(self.expr)
                for label in group.split(",") if label.strip()}

    def recorded_names(self) -> set[str]:
        return set(_RECORDED.findall(self.expr))


def rule_groups() -> list[dict[str, Any]]:
    return list(yaml.safe_load(RULES.read_text())["groups"])


def rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def rule_queries() -> list[Query]:
    return [Query(rule.get("record") or rule["alert"], str(rule["expr"])) for rule in rules()]


def dashboard_queries() -> list[Query]:
    board = dashboard()
    queries = [Query(f"panel {p['title']!r} {t['refId']}", t["expr"])
               for p in board["panels"] for t in p.get("targets", [])]
    queries += [Query(f"variable {v['name']}", v["query"]) for v in board["templating"]["list"]]
    return queries


def all_queries() -> list[Query]:
    return rule_queries() + dashboard_queries()


def recorded_labels() -> dict[str, set[str]]:
    """Recording rule name -> the labels its series carry (its outermost ``by``)."""
    out: dict[str, set[str]] = {}
    for rule in rules():
        if "record" in rule:
            query = Query(rule["record"], str(rule["expr"]))
            labels = query.grouping_labels() - {"le"}
            for name in query.recorded_names():
                labels |= out.get(name, set())
            out[rule["record"]] = labels
    return out


def load_generator() -> ModuleType:
    """``k8s/observability/generate.py`` as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("observability_generate",
                                                  OBSERVABILITY / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def undefined_labels(queries: list[Query], labels_of: dict[str, set[str]]) -> list[str]:
    """Every label a query matches on or groups by that none of its metrics carries.

    ``labels_of`` maps an exported series name (``..._total``, ``..._bucket`` ...) to its
    label names; names missing from it are reported too.
    """
    recorded = recorded_labels()
    problems: list[str] = []
    for query in queries:
        known = set(TARGET_LABELS)
        for name in query.metric_names():
            if name not in labels_of:
                problems.append(f"{query.where}: no metric {name}")
                continue
            known |= labels_of[name]
        for name in query.recorded_names():
            known |= recorded.get(name, set())
        for name, matched in query.matched_labels().items():
            extra = matched - labels_of.get(name, set()) - TARGET_LABELS
            if extra:
                problems.append(f"{query.where}: {name} has no label {sorted(extra)}")
        extra = query.grouping_labels() - known
        if extra:
            problems.append(f"{query.where}: groups by unknown labels {sorted(extra)}")
    return problems
