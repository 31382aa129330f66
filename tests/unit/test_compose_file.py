"""compose.yaml: structure, safety, and that every command parses with our own CLI.

Without any tool (Compose itself runs the file in tests/integration/test_compose_stack.py): it
loads as YAML (merge keys resolved), has no top-level ``name:`` (Compose 1.29 rejects it; the
project name comes from ``-p``), the services the README promises exist and build from the
project's Dockerfile (the demo with the lab extra), no port is published beyond loopback, no
mesh key is written in the file, and each command line is accepted by the ``equilibrium``
parsers it will meet in the container.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from equilibrium.cli import build_parser
from equilibrium.lab.demo.run import DemoConfig
from wire.signing import read_mesh_key

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
_VAR = re.compile(r"\$\{([A-Z_]+)(?::-([^}]*)|:\?[^}]*)?\}")


def interpolate(value: Any) -> Any:
    """Compose's ``${VAR:-default}``, with every variable unset."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: m.group(2) or "", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return dict(interpolate(data))


def test_services_and_images(compose: dict[str, Any]) -> None:
    assert "name" not in compose  # Compose 1.29 (docker-compose) refuses it: use -p NAME
    services = compose["services"]
    assert {"redis", "mesh-key", "signaler", "signaler-standby", "demo"} <= set(services)
    assert (ROOT / "Dockerfile").is_file()
    for name in ("mesh-key", "signaler", "signaler-standby"):
        service = services[name]
        assert service["build"] == ".", name
        assert service["image"] == "equilibrium:local", name
    # The demo needs the lab extra: the lab image, built from the same Dockerfile.
    assert services["demo"]["build"] == {"context": ".", "args": {"EXTRAS": "lab"}}
    assert services["demo"]["image"] == "equilibrium-lab:local"
    for name in ("signaler", "signaler-standby", "demo"):
        needs = services[name]["depends_on"]
        assert needs["redis"]["condition"] == "service_healthy"
        assert needs["mesh-key"]["condition"] == "service_completed_successfully"
    assert "healthcheck" in services["redis"]
    assert set(compose["volumes"]) == {"mesh-key"}


def test_nothing_is_exposed_beyond_loopback_and_no_key_is_in_the_file(
    compose: dict[str, Any]
) -> None:
    assert "ports" not in compose["services"]["redis"]
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
        env = service.get("environment") or {}
        assert "EQUILIBRIUM_MESH_SECRET" not in env, name
    assert "--requirepass" in compose["services"]["redis"]["command"]


def parse(argv: list[str]) -> Any:
    return build_parser(argv).parse_args(argv)


def test_every_command_parses_with_the_equilibrium_cli(compose: dict[str, Any]) -> None:
    services = compose["services"]
    urls = set()
    for name in ("signaler", "signaler-standby"):
        args = parse(services[name]["command"])
        assert args.command == "signaler"
        assert args.mesh_secret_file == "/run/equilibrium/mesh.key"
        assert args.redis.startswith("redis://eq-signaler:") and "@redis:6379" in args.redis
        urls.add(args.redis)
    ids = {parse(services[n]["command"]).id for n in ("signaler", "signaler-standby")}
    assert len(ids) == 2  # two replicas must not share an id (one lease holder each)
    # As many tokens as the demo's own signaler: with the CLI default (32) a solve outlasted
    # the lease on a busy 2-core machine and no recommendation was ever published.
    tokens = {int(parse(services[n]["command"]).tokens) for n in ("signaler", "signaler-standby")}
    assert tokens == {DemoConfig().tokens}

    demo = parse(services["demo"]["command"])
    assert demo.command == "demo"
    sidecar = parse(["sidecar", *demo.sidecar_arg])  # what every demo sidecar is given
    assert len(urls) == 1  # both signalers log in as eq-signaler, the sidecars as eq-sidecar
    assert sidecar.redis.startswith("redis://eq-sidecar:")
    assert sidecar.redis.partition("@")[2] == urls.pop().partition("@")[2]
    assert sidecar.mesh_secret_file == "/run/equilibrium/mesh.key"


def test_the_key_generator_writes_a_random_key_once(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    service = compose["services"]["mesh-key"]
    script = service["command"][0].replace("/run/equilibrium", str(tmp_path))
    exec(compile(script, "mesh-key", "exec"), {})  # the container's script, on a temp dir
    key = (tmp_path / "mesh.key").read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    assert (tmp_path / "mesh.key").stat().st_mode & 0o777 == 0o400
    (tmp_path / "mesh.key").chmod(0o444)  # a volume from before the reader refused that mode
    exec(compile(script, "mesh-key", "exec"), {})
    assert (tmp_path / "mesh.key").read_text() == key  # kept across restarts
    assert (tmp_path / "mesh.key").stat().st_mode & 0o777 == 0o400
    assert read_mesh_key({}, tmp_path / "mesh.key") == key.encode()  # the reader accepts it


def redis_users(command: list[str]) -> dict[str, list[str]]:
    """``--user NAME RULE...`` groups of a redis-server command line, by user name."""
    users: dict[str, list[str]] = {}
    for i, token in enumerate(command):
        if token == "--user":
            end = next((j for j in range(i + 1, len(command)) if command[j].startswith("--")),
                       len(command))
            users[command[i + 1]] = command[i + 2:end]
    return users


def test_redis_users_are_the_least_privilege_rules_and_each_role_logs_in_as_its_own(
    compose: dict[str, Any],
) -> None:
    from wire.acl import ROLES, acl_rules

    services = compose["services"]
    users = redis_users(services["redis"]["command"])
    assert set(users) == {user for user, _ in ROLES.values()}
    for role, (user, _) in ROLES.items():
        password = users[user][2].removeprefix(">")
        assert users[user] == acl_rules(role, password), role
    for name in ("signaler", "signaler-standby"):
        command = services[name]["command"]
        assert command[command.index("--redis") + 1].startswith("redis://eq-signaler:"), name
    assert any(arg.startswith("--sidecar-arg=redis://eq-sidecar:")
               for arg in services["demo"]["command"])
