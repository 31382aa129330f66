"""tests/support.py: the child environment, the bounded wait, the metric reader."""

from __future__ import annotations

import os

import pytest

from tests.support import REPO_ROOT, child_env, eventually, metric_value, samples

EXPOSITION = """\
# HELP equilibrium_requests_total Requests.
# TYPE equilibrium_requests_total counter
equilibrium_requests_total{upstream="a",outcome="ok"} 3.0
equilibrium_requests_total{upstream="a",outcome="error"} 1.0
equilibrium_requests_total{upstream="b",outcome="ok"} 5.0
# HELP equilibrium_latency_seconds Latency.
# TYPE equilibrium_latency_seconds histogram
equilibrium_latency_seconds_bucket{upstream="a",le="0.1"} 2.0
equilibrium_latency_seconds_bucket{upstream="a",le="+Inf"} 4.0
equilibrium_latency_seconds_sum{upstream="a"} 0.75
equilibrium_latency_seconds_count{upstream="a"} 4.0
# HELP equilibrium_up Up.
# TYPE equilibrium_up gauge
equilibrium_up{path="a \\"quoted\\" one, with {braces}"} 1.0
"""


def test_metric_value_sums_the_samples_whose_labels_match() -> None:
    assert metric_value(EXPOSITION, "equilibrium_requests_total") == 9.0
    assert metric_value(EXPOSITION, "equilibrium_requests_total", upstream="a") == 4.0
    assert metric_value(EXPOSITION, "equilibrium_requests_total", upstream="a",
                        outcome="ok") == 3.0
    assert metric_value(EXPOSITION, "equilibrium_requests_total", upstream="c") == 0.0
    assert metric_value(EXPOSITION, "equilibrium_latency_seconds_count", upstream="a") == 4.0
    assert metric_value(EXPOSITION, "equilibrium_latency_seconds_bucket", le="+Inf") == 4.0
    assert metric_value(EXPOSITION, "equilibrium_up",
                        path='a "quoted" one, with {braces}') == 1.0
    assert metric_value("", "equilibrium_up") == 0.0


def test_samples_yields_name_labels_and_value() -> None:
    first = next(samples(EXPOSITION))
    assert first == ("equilibrium_requests_total", {"upstream": "a", "outcome": "ok"}, 3.0)


def test_child_env_drops_our_settings_and_proxies_and_puts_the_checkout_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EQUILIBRIUM_MESH_SECRET", "secret")
    monkeypatch.setenv("EQUILIBRIUM_REDIS_SERVER", "/opt/redis-server")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    monkeypatch.setenv("no_proxy", "example")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/elsewhere", str(REPO_ROOT)]))
    monkeypatch.setenv("HOME_OF_TEST", "kept")
    env = child_env({"A": "1"}, B="2")
    assert "EQUILIBRIUM_MESH_SECRET" not in env
    assert env["EQUILIBRIUM_REDIS_SERVER"] == "/opt/redis-server"
    assert "HTTPS_PROXY" not in env and "no_proxy" not in env
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO_ROOT), "/elsewhere"]
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["HOME_OF_TEST"] == "kept" and env["A"] == "1" and env["B"] == "2"
    assert child_env(EQUILIBRIUM_MESH_SECRET="given")["EQUILIBRIUM_MESH_SECRET"] == "given"


async def test_eventually_returns_the_first_truthy_value() -> None:
    calls = iter([0, None, 7])
    assert await eventually(lambda: next(calls), "a value", timeout=5, interval=0.001) == 7


async def test_eventually_fails_with_what_and_the_context() -> None:
    with pytest.raises(AssertionError, match=r"not within 0.05s: ready \(last: False\)\nlogs"):
        await eventually(lambda: False, "ready", timeout=0.05, interval=0.01,
                         context=lambda: "logs")
