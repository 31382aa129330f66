"""sidecar.config: precedence flags > env > file > defaults, clear rejection with the setting
named, the listen address forms, and the Kubernetes settings (discovery, transparent, the API).

On ``ConfigSource`` directly; tests/integration/test_sidecar_config.py checks that the real
command honours them and exits 2 with a message on bad input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import (
    ConfigError,
    ConfigSource,
    ListenAddress,
    SidecarConfig,
    parse_listen,
    parse_namespaces,
)
from sidecar.runner import effective_profile
from sidecar.upstreams import UpstreamTable


def kube_config(flags: dict[str, Any], env: dict[str, str]) -> SidecarConfig:
    """The config the command line builds from these Kubernetes flags and environment."""
    return ConfigSource.from_sources(flags, env=env).load()


def test_kube_flags_and_environment(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t")
    off = kube_config({}, {})
    assert not off.transparent and off.discovery is None
    on = kube_config({}, {
        "EQUILIBRIUM_TRANSPARENT": "1", "EQUILIBRIUM_DISCOVERY": "true",
        "EQUILIBRIUM_KUBE_API": "http://127.0.0.1:1", "EQUILIBRIUM_KUBE_TOKEN_FILE": str(token),
    })
    assert on.transparent and on.discovery is not None
    assert on.discovery.credentials.token_file == token
    assert on.discovery.namespaces is None  # the pod's namespace is unknown here: cluster-wide
    scoped = kube_config({"discovery": True, "kube_api": "http://127.0.0.1:1"},
                         {"POD_NAMESPACE": "shop"})
    assert scoped.discovery is not None
    assert scoped.discovery.namespaces == ("shop",)  # default: the pod's own namespace
    # a flag wins over the environment; a switch's variable off is off
    flagged = kube_config({"discovery": True, "kube_api": "http://127.0.0.1:1"},
                          {"EQUILIBRIUM_KUBE_API": "http://other:1",
                           "EQUILIBRIUM_TRANSPARENT": "no"})
    assert flagged.discovery is not None and not flagged.transparent
    assert flagged.discovery.credentials.api_url == "http://127.0.0.1:1"
    assert kube_config({"transparent": True}, {"EQUILIBRIUM_TRANSPARENT": "0"}).transparent


def test_discovery_namespaces() -> None:
    assert parse_namespaces("", "shop") == ("shop",)
    assert parse_namespaces("", None) is None
    assert parse_namespaces("*", "shop") is None
    assert parse_namespaces("a, b,a", "shop") == ("a", "b")
    with pytest.raises(ConfigError, match="not a namespace"):
        parse_namespaces("Bad_NS", None)


@pytest.mark.parametrize(
    ("kw", "env", "message"),
    [
        ({"kube_api": "http://127.0.0.1:1"}, {}, "need --discovery"),
        ({"discovery_namespaces": "*"}, {}, "need --discovery"),
        ({"discovery": True}, {}, "KUBERNETES_SERVICE_HOST"),
        ({"discovery": True, "kube_api": "ftp://x"}, {}, "http"),
        ({"discovery": True, "kube_api": "http://127.0.0.1:1",
          "kube_token_file": "/nonexistent/token"}, {}, "does not exist"),
    ],
)
def test_bad_kube_settings_are_config_errors(kw: dict[str, Any], env: dict[str, str],
                                             message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        kube_config(kw, env)


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "id: from-file\nstrategy: conservative\npolicy: peak-ewma\ndrain-timeout: 7\n"
        "upstreams:\n  a: [http://10.0.0.1:80]\n  b: http://10.0.0.2,http://10.0.0.3:81\n"
    )
    only_file = ConfigSource.from_sources({"config": str(path)}, env={}).load()
    assert only_file.id == "from-file" and only_file.strategy == "conservative"
    assert only_file.policy == "peak-ewma" and only_file.drain_timeout == 7.0
    assert dict(only_file.upstreams) == {
        "a": ("http://10.0.0.1:80",),
        "b": ("http://10.0.0.2:80", "http://10.0.0.3:81"),
    }
    assert only_file.outbound == ListenAddress("127.0.0.1", 15001)  # default

    env = {
        "EQUILIBRIUM_ID": "from-env",
        "EQUILIBRIUM_UPSTREAMS": "c=http://10.0.0.9:90;d=http://10.0.0.8",
        "EQUILIBRIUM_OUTBOUND": "0.0.0.0:16001",
    }
    with_env = ConfigSource.from_sources({"config": str(path)}, env=env).load()
    assert with_env.id == "from-env" and with_env.strategy == "conservative"
    assert set(with_env.upstreams) == {"c", "d"}  # a layer's upstreams replace, not merge
    assert with_env.outbound == ListenAddress("0.0.0.0", 16001)

    flags = {
        "config": str(path), "id": "from-flag", "upstreams": ["e=http://127.0.0.1:1"],
        "strategy": "aggressive-learning",
    }
    with_flags = ConfigSource.from_sources(flags, env=env).load()
    assert (with_flags.id, with_flags.strategy) == ("from-flag", "aggressive-learning")
    assert dict(with_flags.upstreams) == {"e": ("http://127.0.0.1:1",)}
    assert with_flags.sources["upstreams"] == "command line"
    assert with_flags.sources["policy"].startswith("config file")


def test_config_file_path_may_come_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"upstreams": {"Users": ["http://[::1]:8080"]}}))
    config = ConfigSource.from_sources({}, env={"EQUILIBRIUM_CONFIG": str(path)}).load()
    assert dict(config.upstreams) == {"users": ("http://[::1]:8080",)}


@pytest.mark.parametrize(
    ("flags", "env", "file_text", "message"),
    [
        ({"upstreams": ["users"]}, {}, None, "NAME=URL"),
        ({"upstreams": ["users=ftp://x"]}, {}, None, "http://"),
        ({"upstreams": ["users=http://x/path"]}, {}, None, "scheme://host[:port] only"),
        ({"upstreams": ["a=http://x", "a=http://y"]}, {}, None, "given twice"),
        ({"strategy": "reckless"}, {}, None, "balanced"),
        ({"policy": "fastest"}, {}, None, "round-robin"),
        ({"outbound": "localhost"}, {}, None, "HOST:PORT"),
        ({"admin": "127.0.0.1:70000"}, {}, None, "out of range"),
        ({"outbound": "::1:15001"}, {}, None, "brackets"),
        ({"discovery_namespaces": "*"}, {}, None, "need --discovery"),
        ({}, {"EQUILIBRIUM_DISCOVERY": "1"}, None, "KUBERNETES_SERVICE_HOST"),
        ({}, {"EQUILIBRIUM_DRAIN_TIMEOUT": "soon"}, None, "environment: drain_timeout"),
        ({}, {"EQUILIBRIUM_DRAIN_TIMEOUT": "\u0663"}, None, "finite decimal"),
        ({}, {}, "drain_timeout: " + "9" * 5000 + "\n", "a number is too long"),
        ({}, {}, "drain_timeout: 1" + "0" * 400 + "\n", "finite number"),
        ({}, {}, "drain_timeout: " + "[" * 5000 + "\n", "nested too deeply"),
        ({}, {}, "listen: 1\n", "unknown key 'listen'"),
        ({}, {}, "- just\n- a list\n", "top level must be a mapping"),
        ({}, {}, "upstreams: {a: [1]}\n", "is not a string"),
        ({}, {}, "upstreams: [\n", "not valid YAML/JSON"),
        ({"source_address": "pod.local"}, {}, None, "source_address: expected one IP address"),
        ({}, {"EQUILIBRIUM_SOURCE_ADDRESS": "0.0.0.0"}, None, "expected one IP address"),
        ({}, {}, "source_address: '[::1]'\n", "expected one IP address"),
        ({}, {}, "source_address: 10.0.0.5:80\n", "expected one IP address"),
        ({}, {"EQUILIBRIUM_RETRY_BUDGET_RATIO": "-0.1"}, None, "retry_budget_ratio: must be"),
        ({"retry_budget_ratio": "11"}, {}, None, "retry_budget_ratio: at most 10"),
        ({}, {}, "retry_budget_min_per_s: lots\n", "retry_budget_min_per_s: expected"),
        # a stranger's findings: each started, and could never work
        ({"upstreams": ["users=http://127.0.0.1:0"]}, {}, None, "port 0 cannot be connected"),
        ({}, {}, "upstreams: {a: ['http://x:0']}\n", "port 0 cannot be connected"),
        ({"outbound": "127.0.0.1:15401", "admin": "127.0.0.1:15401"}, {}, None,
         "admin 127.0.0.1:15401 and outbound 127.0.0.1:15401 are on one port"),
        ({"outbound": "0.0.0.0:15401", "admin": "127.0.0.1:15401"}, {}, None, "on one port"),
        ({"inbound": "[::]:15000", "app": "http://127.0.0.1:8080"}, {}, None,
         "inbound [::]:15000 and admin 127.0.0.1:15000 are on one port"),
    ],
)
def test_bad_settings_are_rejected_with_the_setting_named(
    tmp_path: Path, flags: dict, env: dict, file_text: str | None, message: str
) -> None:
    if file_text is not None:
        path = tmp_path / "bad.yaml"
        path.write_text(file_text)
        flags = {**flags, "config": str(path)}
    with pytest.raises(ConfigError) as info:
        ConfigSource.from_sources(flags, env=env).load()
    assert message in str(info.value)


def test_the_source_address_comes_from_any_layer_normalised(tmp_path: Path) -> None:
    assert ConfigSource.from_sources({}, env={}).load().source_address is None
    path = tmp_path / "c.yaml"
    path.write_text("source_address: 10.0.0.5\n")
    from_file = ConfigSource.from_sources({"config": str(path)}, env={}).load()
    assert from_file.source_address == "10.0.0.5"
    flags = {"config": str(path), "source_address": " fd00:0::5 "}
    assert ConfigSource.from_sources(flags, env={}).load().source_address == "fd00::5"


def test_the_retry_budget_overrides_the_profile_from_any_layer(tmp_path: Path) -> None:
    default = effective_profile(ConfigSource.from_sources({}, env={}).load())
    assert (default.retry_budget_ratio, default.retry_budget_min_per_s) == (0.2, 10.0)
    path = tmp_path / "c.yaml"
    path.write_text("retry_budget_ratio: 0.05\nretry_budget_min_per_s: 1\n")
    env = {"EQUILIBRIUM_RETRY_BUDGET_MIN_PER_S": "0"}
    config = ConfigSource.from_sources({"config": str(path)}, env=env).load()
    profile = effective_profile(config)
    assert (profile.retry_budget_ratio, profile.retry_budget_min_per_s) == (0.05, 0.0)
    assert config.sources["retry_budget_min_per_s"] == "environment"
    table = UpstreamTable(config.policy, profile)
    table.apply({"svc": ("http://127.0.0.1:1",)}, now=0.0)
    group = table.get("svc")
    assert group is not None
    budget = group.budget
    assert (budget.ratio, budget.min_per_s) == (0.05, 0.0)


def test_listen_address_forms() -> None:
    assert parse_listen("[::1]:15001") == ListenAddress("::1", 15001)
    assert parse_listen(":15001") == ListenAddress("127.0.0.1", 15001)
    assert str(parse_listen("[::1]:1")) == "[::1]:1"


def test_listener_limits_default_and_merge_file_with_environment(tmp_path: Path) -> None:
    from sidecar.config import ListenerLimits

    assert ConfigSource.from_sources({}, env={}).load().listener == ListenerLimits()
    path = tmp_path / "c.yaml"
    path.write_text("listener:\n  idle_timeout: 30\n  max_streams: 8\n")
    env = {"EQUILIBRIUM_MAX_STREAMS": "16", "EQUILIBRIUM_HEADER_TIMEOUT": "2.5"}
    limits = ConfigSource.from_sources({"config": str(path)}, env=env).load().listener
    assert limits == ListenerLimits(header_timeout=2.5, idle_timeout=30.0, max_streams=16,
                                    max_connections=4096)
    flags = {"config": str(path), "idle_timeout": "0", "max_connections": "9"}
    limits = ConfigSource.from_sources(flags, env=env).load().listener
    assert limits == ListenerLimits(header_timeout=2.5, idle_timeout=0.0, max_streams=16,
                                    max_connections=9)


@pytest.mark.parametrize(("text", "env", "message"), [
    ("listener:\n  max_streams: 0\n", {}, "listener.max_streams"),
    ("listener:\n  idle: 3\n", {}, "unknown key 'idle'"),
    ("listener: 5\n", {}, "must be a mapping"),
    ("id: x\n", {"EQUILIBRIUM_MAX_CONNECTIONS": "many"}, "environment: listener.max_connections"),
])
def test_bad_listener_limits_are_config_errors(tmp_path: Path, text: str, env: dict[str, str],
                                               message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        ConfigSource.from_sources({"config": str(path)}, env=env).load()


def test_an_upstream_may_be_declared_outside_the_mesh(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.json"
    path.write_text(json.dumps({"upstreams": {
        "users": ["http://10.0.0.1:8080"],
        "payments": {"endpoints": ["https://api.example.com"], "mesh": False},
        "orders": {"endpoints": "http://10.0.0.2:8080", "mesh": True},
    }, "listener": {"local_only": False}}))
    config = ConfigSource.from_sources({"config": str(path)}, env={}).load()
    assert config.upstreams["payments"] == ("https://api.example.com:443",)
    assert config.external_upstreams == frozenset({"payments"})
    assert config.listener.local_only is False
    # upstreams from a higher layer come with their own (empty) declarations
    flags = ConfigSource.from_sources({"config": str(path), "upstreams": ["payments=http://x:1"]},
                                      env={}).load()
    assert flags.external_upstreams == frozenset()
    assert ConfigSource.from_sources({}, env={}).load().listener.local_only is True


@pytest.mark.parametrize("spec", [{"endpoints": [], "mesh": "no"}, {"urls": []}])
def test_a_bad_mesh_declaration_is_a_config_error(tmp_path: Path, spec: dict[str, Any]) -> None:
    path = tmp_path / "sidecar.json"
    path.write_text(json.dumps({"upstreams": {"payments": spec}}))
    with pytest.raises(ConfigError, match="payments"):
        ConfigSource.from_sources({"config": str(path)}, env={}).load()


def test_an_upstream_may_declare_its_long_requests(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text("upstreams:\n"
                    "  config:\n"
                    "    endpoints: [http://10.0.2.1:8080]\n"
                    "    long_paths: [/v1/watch, /pkg.Config/Watch]\n"
                    "  users: [http://10.0.0.1:8080]\n")
    config = ConfigSource.from_sources({"config": str(path)}, env={}).load()
    assert config.long_paths == {"config": ("/v1/watch", "/pkg.Config/Watch")}
    assert config.upstreams["config"] == ("http://10.0.2.1:8080",)
    # upstreams from a higher layer come with their own (empty) declarations
    flags = ConfigSource.from_sources({"config": str(path), "upstreams": ["config=http://x:1"]},
                                      env={}).load()
    assert flags.long_paths == {}


def test_long_paths_alone_declare_for_an_upstream_found_elsewhere(tmp_path: Path) -> None:
    """Without endpoints, an entry only declares (for a group discovery names, such as
    ``users.default.8080``): it makes no upstream of its own, which would win over the
    discovered one with no endpoint (a review's finding: every call answered 503)."""
    path = tmp_path / "sidecar.yaml"
    path.write_text("upstreams:\n"
                    "  users.default.8080:\n"
                    "    long_paths: [/watch]\n"
                    "  orders: [http://10.0.0.2:8080]\n")
    config = ConfigSource.from_sources({"config": str(path)}, env={}).load()
    assert set(config.upstreams) == {"orders"}
    assert config.long_paths == {"users.default.8080": ("/watch",)}


@pytest.mark.parametrize(("paths", "message"), [
    ("watch", "long_paths: expected a list"),
    ("[watch]", "long_paths: expected a list"),
    ("[/a b]", "long_paths: expected a list"),
    ("[" + ", ".join(f"/p{i}" for i in range(65)) + "]", "at most 64"),
])
def test_bad_long_paths_are_config_errors(tmp_path: Path, paths: str, message: str) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(f"upstreams:\n  config:\n    endpoints: [http://10.0.2.1:8080]\n"
                    f"    long_paths: {paths}\n")
    with pytest.raises(ConfigError, match=f"upstream 'config': .*{message}"):
        ConfigSource.from_sources({"config": str(path)}, env={}).load()


INBOUND = {"inbound": "127.0.0.1:15406", "app": "http://127.0.0.1:8080"}


def test_inbound_long_paths_replace_the_files_policing_long_paths(tmp_path: Path) -> None:
    """``--inbound-long-paths`` (an injected sidecar's only policing setting: its pod's
    annotation) replaces ``policing.long_paths`` of the file and keeps the file's others."""
    path = tmp_path / "sidecar.yaml"
    path.write_text("policing:\n  long_paths: [/old]\n  max_wait: 3\n")
    file_only = ConfigSource.from_sources({**INBOUND, "config": str(path)}, env={}).load()
    assert file_only.policing.long_paths == ("/old",)
    flag = ConfigSource.from_sources(
        {**INBOUND, "config": str(path), "inbound_long_paths": " /watch, /pkg.Config/Watch "},
        env={"EQUILIBRIUM_INBOUND_LONG_PATHS": "/env"}).load()
    assert flag.policing.long_paths == ("/watch", "/pkg.Config/Watch")
    assert flag.policing.max_wait == 3.0
    env = ConfigSource.from_sources({**INBOUND}, env={"EQUILIBRIUM_INBOUND_LONG_PATHS": "/env"})
    assert env.load().policing.long_paths == ("/env",)
    assert ConfigSource.from_sources({**INBOUND}, env={}).load().policing.long_paths == ()
    # declaring none asks for no inbound listener (an empty flag, a shared environment's ",")
    assert ConfigSource.from_sources({"inbound_long_paths": ""},
                                     env={}).load().policing.long_paths == ()


@pytest.mark.parametrize(("flags", "message"), [
    ({**INBOUND, "inbound_long_paths": "watch"}, "inbound_long_paths: expected a list"),
    ({**INBOUND, "inbound_long_paths": "/a b"}, "inbound_long_paths: expected a list"),
    ({**INBOUND, "inbound_long_paths": ",".join(f"/p{i}" for i in range(65))}, "at most 64"),
    ({"inbound_long_paths": "/watch"}, "needs --inbound"),
    ({**INBOUND, "inbound_long_paths": "/"}, "every request long"),
])
def test_bad_inbound_long_paths_are_config_errors(flags: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ConfigSource.from_sources(flags, env={}).load()


def test_listeners_on_other_hosts_may_share_a_port() -> None:
    config = ConfigSource.from_sources(
        {"outbound": "127.0.0.1:15401", "admin": "127.0.0.2:15401"}, env={}).load()
    assert (config.outbound.port, config.admin.port) == (15401, 15401)


@pytest.mark.parametrize("key", ["hedge", "rescue"])
def test_a_switch_that_is_neither_true_nor_false_is_refused(tmp_path: Path, key: str) -> None:
    # The stranger's finding: `hedge: ture` (or `rescue: enabled`) was read as off, silently
    path = tmp_path / "c.yaml"
    for bad in ("ture", "enabled", "[1]"):
        path.write_text(f"{key}: {bad}\n")
        with pytest.raises(ConfigError, match=f"{key}: must be true or false"):
            ConfigSource.from_sources({"config": str(path)}, env={}).load()
    for good, on in (("true", True), ("false", False), ("on", True), ("no", False)):
        path.write_text(f"{key}: {good}\n")
        loaded = ConfigSource.from_sources({"config": str(path)}, env={}).load()
        assert getattr(loaded, key) is on
    env = {f"EQUILIBRIUM_{key.upper()}": "sometimes"}
    with pytest.raises(ConfigError, match=f"environment: {key}: must be true or false"):
        ConfigSource.from_sources({}, env=env).load()
