"""Sidecar configuration: precedence flags > env > file > defaults, and clear rejection.

The precedence rules are checked on ``ConfigSource`` directly (pure, fast); the process tests
check that the real command honours them and exits 2 with a message on bad input.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest

from sidecar.config import ConfigError, ConfigSource, ListenAddress, parse_listen
from tests.integration.procs import (
    async_start_sidecar,
    async_stop,
    free_port,
    run_equilibrium,
    start_backend,
)


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
        ({}, {}, "listen: 1\n", "unknown key 'listen'"),
        ({}, {}, "- just\n- a list\n", "top level must be a mapping"),
        ({}, {}, "upstreams: {a: [1]}\n", "is not a string"),
        ({}, {}, "upstreams: [\n", "not valid YAML/JSON"),
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


def test_listen_address_forms() -> None:
    assert parse_listen("[::1]:15001") == ListenAddress("::1", 15001)
    assert parse_listen(":15001") == ListenAddress("127.0.0.1", 15001)
    assert str(parse_listen("[::1]:1")) == "[::1]:1"


async def test_bad_configuration_exits_2_with_a_message(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    # every rule is checked on ConfigSource above; here: the process maps them to exit 2
    cases = [
        (["sidecar", "--upstream", "users=not a url", "--strategy", "balanced"], {}),
        (["sidecar", "--config", str(missing)], {"EQUILIBRIUM_UPSTREAMS": "a=http://x;;b"}),
        (["sidecar", "--kube-api", "http://127.0.0.1:1"], {}),  # a Kubernetes flag, checked too
        (["sidecar", "--redis", "redis://127.0.0.1:1/0"], {}),  # checked as the runner is built
    ]
    results = await asyncio.gather(
        *(asyncio.to_thread(run_equilibrium, *args, env=env) for args, env in cases)
    )
    for result in results:
        assert result.returncode == 2, result.stderr
        assert "bad configuration" in result.stderr
    assert "users" in results[0].stderr
    assert "cannot read" in results[1].stderr
    assert "need --discovery" in results[2].stderr
    assert "no mesh key" in results[3].stderr


async def test_the_real_command_honours_env_and_file(tmp_path: Path) -> None:
    file_backend = await start_backend("from-file")
    env_backend = await start_backend("from-env")
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        f"id: file-id\nstrategy: conservative\nupstreams:\n  svc: [{file_backend.url}]\n"
    )
    sidecar = await async_start_sidecar(
        config_file=path,
        strategy="aggressive-learning",
        env={"EQUILIBRIUM_ID": "env-id", "EQUILIBRIUM_UPSTREAMS": f"svc={env_backend.url}"},
    )
    try:
        state = sidecar.state()
        assert (state["id"], state["strategy"]) == ("env-id", "aggressive-learning")
        assert [e["endpoint"] for e in state["upstreams"]["svc"]["endpoints"]] == [env_backend.url]
    finally:
        assert await async_stop(sidecar) == 0
        await file_backend.stop()
        await env_backend.stop()


async def test_a_port_in_use_exits_1_with_a_message() -> None:
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        result = await asyncio.to_thread(
            run_equilibrium, "sidecar", "--outbound", f"127.0.0.1:{port}",
            "--admin", f"127.0.0.1:{free_port()}",
        )
    assert result.returncode == 1
    assert "cannot listen on 127.0.0.1:" in result.stderr
