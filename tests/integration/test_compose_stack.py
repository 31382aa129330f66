"""compose.yaml, really run: Redis, the mesh key, two signalers, the demo, and a failover.

The compose plugin is not installed here, so :mod:`tests.integration.compose_engine` runs the
file's services on the Docker engine as ``docker compose up`` would (a network of its own per
run, the named volume, ``depends_on`` conditions, the healthcheck, commands as written,
``${VAR:-default}`` interpolation). The test overrides only the demo's ``--duration`` and its
tty, and sets ``REDIS_IMAGE`` to the locally built Redis and a random ``REDIS_PASSWORD``.

It needs the engine and both images (``equilibrium:local`` from scripts/image/build.sh,
``equilibrium-redis:local`` from scripts/ci/build-redis-image.sh): a missing one is a failure
with instructions, as in test_image.py (CI sets EQUILIBRIUM_REQUIRE_DOCKER=1 and builds them
first; elsewhere deselect with ``-m "not docker"``). Nothing is ever pulled, and the admin ports
are published on 127.0.0.1 only (on ephemeral host ports).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.environment import DOCKER, unavailable
from tests.integration.compose_engine import (
    ComposeError,
    ComposeProject,
    healthcheck,
    load_compose,
    port_bindings,
    start_order,
)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
IMAGE = os.environ.get("EQUILIBRIUM_IMAGE", "equilibrium:local")
REDIS_IMAGE = os.environ.get("EQUILIBRIUM_REDIS_IMAGE", "equilibrium-redis:local")
DEMO_SECONDS = 25
WAIT = 60.0
"""Bound of every wait for a container (healthy, completed, leading, exited after the load)."""
UPSTREAM = "demo"
ADMIN = "15020/tcp"
CLIENTS = {"client-1", "client-2", "client-3"}  # the demo's --clients 3


# ---- without the engine: the runner reads the file as compose does -------------------------
def test_the_runner_reads_compose_yaml_as_compose_does() -> None:
    spec = load_compose(COMPOSE, {"REDIS_IMAGE": "r:1", "REDIS_PASSWORD": "pw"})
    services = spec["services"]
    assert services["redis"]["image"] == "r:1"
    assert "pw" in services["redis"]["command"]
    assert all("redis://:pw@redis:6379/0" in services[s]["command"]
               for s in ("signaler", "signaler-standby"))
    assert "--sidecar-arg=redis://:pw@redis:6379/0" in services["demo"]["command"]
    defaults = load_compose(COMPOSE, {"REDIS_PASSWORD": ""})["services"]["redis"]
    assert defaults["image"] == "redis:7.2-alpine"  # ':-' also replaces an empty value
    assert "equilibrium-local" in defaults["command"]
    order = start_order(services, ["demo"])
    assert order.index("redis") < order.index("demo")
    assert order.index("mesh-key") < order.index("demo")
    # The healthcheck keeps its exec form: the engine runs it without a shell in the image.
    check = healthcheck(services["redis"]["healthcheck"])
    assert check["test"][:2] == ["CMD", "redis-cli"]
    assert check["interval"] == 2_000_000_000 and check["retries"] == 15
    for name in ("signaler", "signaler-standby"):
        assert port_bindings(services[name]["ports"]) == {ADMIN: ("127.0.0.1", None)}
    with pytest.raises(ComposeError, match="not bound to loopback"):
        port_bindings(["0.0.0.0:15020:15020"])


# ---- with the engine ------------------------------------------------------------------------
@pytest.fixture
def engine() -> Iterator[Any]:
    help_text = ("start the engine with scripts/ci/docker-up.sh and build the images with "
                 "scripts/ci/build-redis-image.sh and scripts/image/build.sh, or deselect "
                 "this test with -m 'not docker'")
    import docker
    import docker.errors

    os.environ.setdefault("DOCKER_HOST", "unix:///run/docker.sock")
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except docker.errors.DockerException as exc:
        unavailable(f"no Docker engine answers ({exc}); {help_text}", variable=DOCKER)
    for image in (IMAGE, REDIS_IMAGE):
        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            unavailable(f"image {image} is missing; {help_text}", variable=DOCKER)
    # compose.yaml's healthcheck runs redis-cli inside the Redis container: without it the
    # stack never becomes healthy, so say so at once.
    probe = client.containers.create(REDIS_IMAGE, ["--version"], entrypoint=["redis-cli"],
                                     network_mode="none")
    try:
        probe.start()
        code = probe.wait(timeout=20)["StatusCode"]
    except docker.errors.DockerException as exc:
        code = str(exc)[-200:]
    finally:
        probe.remove(force=True)
    if code != 0:
        unavailable(f"{REDIS_IMAGE} has no working redis-cli, which compose.yaml's healthcheck "
                    f"runs ({code}); rebuild it with scripts/ci/build-redis-image.sh (the recipe "
                    "must copy /usr/bin/redis-cli into the image)", variable=DOCKER)
    yield client
    client.close()


@pytest.fixture
def stack(engine: Any) -> Iterator[ComposeProject]:
    env = {"REDIS_IMAGE": REDIS_IMAGE, "REDIS_PASSWORD": secrets.token_hex(12)}
    spec = load_compose(COMPOSE, env)
    for service in spec["services"].values():
        if service["image"] == "equilibrium:local":
            service["image"] = IMAGE
    project = ComposeProject(engine, spec, f"eq-compose-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        project.create_shared()
        yield project
    finally:
        problems = project.down()
    assert not problems, problems


def demo_command(command: list[str], seconds: int) -> list[str]:
    """The demo's command as written, with only ``--duration`` changed."""
    i = command.index("--duration")
    return [*command[:i + 1], str(seconds), *command[i + 2:]]


def admin_get(project: ComposeProject, service: str, path: str) -> bytes | None:
    ip, port = project.published(service, ADMIN)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{ip}:{port}{path}", timeout=3) as resp:
            return bytes(resp.read())
    except OSError:
        return None


def upstream_state(project: ComposeProject, service: str) -> dict[str, Any]:
    body = admin_get(project, service, "/debug/state")
    if body is None:
        return {}
    return dict(json.loads(body).get("upstreams", {}).get(UPSTREAM, {}))


def published_total(project: ComposeProject, service: str) -> float:
    text = (admin_get(project, service, "/metrics") or b"").decode()
    found = re.search(r'^equilibrium_signaler_recommendations_published_total\{upstream="demo"\}'
                      r" ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def wait_leading(project: ComposeProject, candidates: list[str]) -> tuple[str, dict[str, Any]]:
    """The signaler that leads the demo upstream with an optimal plan and publications."""
    deadline = time.monotonic() + WAIT
    seen: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        for name in candidates:
            seen[name] = state = upstream_state(project, name)
            plan = state.get("plan") or {}
            if state.get("leader") and state.get("published", 0) > 0 \
                    and plan.get("status") == "optimal":
                return name, state
        if project.state("demo")["Status"] == "exited":
            break
        time.sleep(0.5)
    logs = "\n".join(f"--- {n}\n{project.logs(n)}" for n in [*candidates, "demo"])
    raise AssertionError(f"no signaler of {candidates} led {UPSTREAM} and published: "
                         f"{json.dumps(seen)[:2000]}\n{logs}")


@pytest.mark.docker
def test_compose_stack_publishes_fails_over_and_the_demo_follows(
    stack: ComposeProject,
) -> None:
    demo = stack.spec["services"]["demo"]
    stack.up(["signaler", "signaler-standby", "demo"], timeout=WAIT, overrides={
        "demo": {"command": demo_command(demo["command"], DEMO_SECONDS), "tty": False}})

    # The one-shot key generator completed, and the key is in the volume the others mount.
    assert stack.state("mesh-key")["ExitCode"] == 0
    key = stack.read_file("signaler", "/run/equilibrium/mesh.key")
    assert re.fullmatch(rb"[0-9a-f]{64}", key), key[:80]
    assert stack.read_file("signaler-standby", "/run/equilibrium/mesh.key") == key

    # One signaler leads the demo's upstream: an optimal plan, recommendations published.
    replicas = ["signaler", "signaler-standby"]
    leader, state = wait_leading(stack, replicas)
    (standby,) = set(replicas) - {leader}
    assert set(state.get("sidecars", [])) <= CLIENTS
    assert published_total(stack, leader) > 0
    assert not upstream_state(stack, standby).get("leader")

    # Kill it (compose's restart policy leaves a killed container down): the standby leads.
    stack.containers[leader].kill()
    new_leader, new_state = wait_leading(stack, [standby])
    assert new_leader == standby and new_state["published"] > 0
    assert stack.state(leader)["Status"] == "exited"

    # The demo finishes its load and reports that every sidecar followed the signaler.
    done = stack.wait_for("demo", lambda s: s["Status"] == "exited", "exited",
                          DEMO_SECONDS + WAIT)
    output = stack.logs("demo", tail=60)
    assert done["ExitCode"] == 0, output
    summary = json.loads(stack.read_file("demo", "/tmp/equilibrium-demo.json"))
    signaling = summary["phases"]["signaling"]
    assert set(signaling["following_fraction"]) == CLIENTS, signaling
    for client, fraction in signaling["following_fraction"].items():
        assert fraction > 0.5, (client, signaling, output)
        assert summary["sidecars"][client]["following"], (client, output)
        assert re.search(rf"{client} followed the signaler: \d+% of the run", output), output
    assert summary["bad_pod_less_than_each_good_pod"], output
