"""sidecar.policing_config: the ``policing:`` settings and the ``--app`` URL."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import ConfigError, ConfigSource
from sidecar.policing_config import PolicingSettings, parse_app_url, parse_policing


def test_defaults_are_the_mesh_defaults() -> None:
    settings = parse_policing(None)
    assert settings == PolicingSettings()
    assert settings.mode == "equilibrium" and settings.capacity is None
    assert settings.reputation.ladder.base_punishment == 10.0


def test_sections_override_only_what_they_name() -> None:
    settings = parse_policing({
        "mode": "token-bucket", "capacity": 250, "max-wait": "1.5", "default_bid": 2,
        "token_bucket": {"rate": 40, "burst": 80},
        "ladder": {"base_punishment": 2, "max_level": 3},
        "reputation": {"rate_tolerance": 2},
        "concurrency": {"initial_limit": 8},
        "auction": {"budget_cap": 10, "max_queue": 50},
    })
    assert settings.mode == "token-bucket" and settings.capacity == 250.0
    assert settings.max_wait == 1.5 and settings.default_bid == 2.0
    assert (settings.token_bucket_rate, settings.token_bucket_burst) == (40.0, 80.0)
    ladder = settings.reputation.ladder
    assert (ladder.base_punishment, ladder.max_level, ladder.probation) == (2.0, 3, 30.0)
    assert isinstance(ladder.max_level, int)
    assert settings.reputation.rate_tolerance == 2.0
    assert settings.concurrency.initial_limit == 8.0
    assert settings.auction.max_queue == 50 and settings.auction.budget_cap == 10.0


@pytest.mark.parametrize(("raw", "message"), [
    ("fast", "expected a mapping"),
    ({"mode": "strict"}, "unknown 'strict'"),
    ({"bogus": 1}, "unknown key 'bogus'"),
    ({"ladder": {"base_punishmnt": 1}}, "unknown key 'base_punishmnt'"),
    ({"ladder": {"trigger_threshold": 0.9, "forgive_threshold": 0.5}}, "policing.ladder"),
    ({"ladder": {"max_level": 2.5}}, "expected an integer"),
    ({"reputation": {"capacity": 5}}, "unknown key 'capacity'"),
    ({"reputation": {"rate_tau": True}}, "expected a number"),
    ({"concurrency": {"initial_limit": -1}}, ">= 0"),
    ({"auction": {"budget_rate": "nan"}}, "finite"),
    ({"auction": {"budget_rate": "\u0663"}}, "finite decimal"),  # float('٣') is 3.0
    ({"auction": {"budget_rate": 10**5000}}, "finite"),  # float() overflows
    ({"capacity": 0}, "policing.capacity"),
    ({"max_wait": 0}, "policing.max_wait"),
    ({"default_bid": 2e6}, "at most"),
    ({"token_bucket": {"rate": 5, "size": 3}}, "unknown key(s)"),
    ({"token_bucket": 5}, "expected {rate: N, burst: N}"),
    ({"max_caller_labels": 0}, ">= 1"),
])
def test_bad_settings_are_rejected_with_the_key(raw: object, message: str) -> None:
    with pytest.raises(ValueError, match=None) as excinfo:
        parse_policing(raw)
    assert message in str(excinfo.value)


@pytest.mark.parametrize(("url", "normal"), [
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
    ("http://localhost/", "http://localhost:80"),
    ("https://[::1]:8443", "https://[::1]:8443"),
])
def test_app_url_is_normalised(url: str, normal: str) -> None:
    assert parse_app_url(url) == normal


@pytest.mark.parametrize("url", ["ftp://x:1", "http://", "http://a:1/path", "http://a:99999",
                                 "localhost:8080"])
def test_bad_app_url_is_rejected(url: str) -> None:
    with pytest.raises(ValueError, match="app"):
        parse_app_url(url)


def test_config_layers_carry_the_inbound_settings(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("inbound: 127.0.0.1:0\napp: http://127.0.0.1:9\n"
                    "mesh_secret_file: /run/key\npolicing: {mode: 'off'}\n")
    config = ConfigSource.from_sources({"config": str(path)}, env={}).load()
    assert config.inbound is not None and config.app == "http://127.0.0.1:9"
    assert str(config.mesh_secret_file) == "/run/key" and config.policing.mode == "off"
    env = ConfigSource.from_sources({}, env={"EQUILIBRIUM_INBOUND": "127.0.0.1:0"})
    with pytest.raises(ConfigError, match="inbound and app go together"):
        env.load()
    bad = ConfigSource.from_sources({"app": "gopher://x"}, env={})
    with pytest.raises(ConfigError, match="command line: app"):
        bad.load()


@pytest.mark.parametrize("written", ["off", "Off", "no", "false"])
def test_an_unquoted_off_is_the_off_mode(tmp_path: Path, written: str) -> None:
    # The stranger's finding: `mode: off`, as the docs write it, is a YAML boolean, and was
    # refused as "unknown 'False'"
    path = tmp_path / "c.yaml"
    path.write_text(f"policing:\n  mode: {written}\n")
    assert ConfigSource.from_sources({"config": str(path)}, env={}).load().policing.mode == "off"
    path.write_text("policing:\n  mode: on\n")
    with pytest.raises(ConfigError, match="reads as a YAML boolean"):
        ConfigSource.from_sources({"config": str(path)}, env={}).load()


def test_the_inbound_defences_are_settings() -> None:
    settings = parse_policing({"upload_timeout": 5, "upload_buffer": 1024, "header_timeout": 2,
                               "keepalive_timeout": 0, "max_connections": 10,
                               "max_connections_per_source": 3, "websocket_max_message": 4096,
                               "websocket_max_per_caller": 1})
    assert (settings.upload_timeout, settings.upload_buffer) == (5.0, 1024)
    assert (settings.header_timeout, settings.keepalive_timeout) == (2.0, 0.0)
    assert (settings.max_connections, settings.max_connections_per_source) == (10, 3)
    assert (settings.websocket_max_message, settings.websocket_max_per_caller) == (4096, 1)
    for bad in ({"upload_timeout": 0}, {"max_connections": 0}, {"websocket_max_message": 1.5}):
        with pytest.raises(ValueError):
            parse_policing(bad)
    assert parse_policing({"upload_memory": 0}).upload_memory == 0  # 0: nothing buffered


def test_declared_long_requests_are_paths_and_event_streams() -> None:
    settings = parse_policing({"long_paths": ["/watch", "/pkg.Svc/Watch"]})
    assert settings.long_paths == ("/watch", "/pkg.Svc/Watch")
    assert not settings.long_event_stream  # off unless asked: any caller may send the header
    assert parse_policing({"long_event_stream": True}).long_event_stream
    for bad in ({"long_paths": "/watch"}, {"long_paths": ["watch"]}, {"long_paths": [5]},
                {"long_paths": ["/a b"]}, {"long_paths": ["/x"] * 65},
                {"long_event_stream": "yes"}):
        with pytest.raises(ValueError, match="long_"):
            parse_policing(bad)


def test_declared_long_matches_whole_segments_gets_for_event_streams_and_no_dot_paths() -> None:
    from prometheus_client import CollectorRegistry

    from sidecar.inbound_policing import InboundPolicing
    from sidecar.metrics import InboundMetrics

    policing = InboundPolicing(
        settings=parse_policing({"long_paths": ["/watch", "/pkg.Svc/Watch"],
                                 "long_event_stream": True}),
        metrics=InboundMetrics(CollectorRegistry()), mesh_key=None)
    sse = "text/html, text/event-stream"
    assert policing.declared_long("GET", "/watch", None)
    assert policing.declared_long("GET", "/watch/pods?rv=5", None)
    assert policing.declared_long("POST", "/pkg.Svc/Watch", None)
    assert not policing.declared_long("GET", "/watchdog/expensive", None)
    assert not policing.declared_long("GET", "/watch/../api/report", None)
    # percent-encoded dot segments too (a review's finding: yarl and apps decode them)
    assert not policing.declared_long("GET", "/watch/%2e%2e/api/report", None)
    assert not policing.declared_long("GET", "/watch/%2E%2E/%2e%2E/admin", None)
    assert not policing.declared_long("GET", "/api/report?x=/watch", None)
    assert policing.declared_long("GET", "/feed", sse)
    assert not policing.declared_long("POST", "/feed", sse)  # a body: not an event stream
    off = InboundPolicing(settings=parse_policing({}), metrics=InboundMetrics(
        CollectorRegistry()), mesh_key=None)
    assert not off.declared_long("GET", "/feed", sse) and not off.declared_long(
        "GET", "/watch", None)
