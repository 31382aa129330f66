"""compose.yaml, really run by Compose: Redis, the mesh key, two signalers, the demo, a failover.

The stack runs under ``docker-compose`` (Debian's Compose 1.29, ``apt-get install -y
docker-compose``) on the local engine, as ``docker-compose -p PROJECT -f compose.yaml ...``:
the project name is given with ``-p`` (unique per run, so nothing collides with a user's stack
or another test), the file is run as written. Compose v2 (``docker compose``) reads the same
file. The test sets only what the file leaves to its environment (``REDIS_IMAGE`` to the
locally built Redis, a random ``REDIS_PASSWORD``, free loopback ports for the two admin
listeners) and adds one override file for the demo: a shorter ``--duration`` and no tty.

Needs ``docker-compose`` and, for the stack, the engine and three images (``equilibrium:local``
and the demo's ``equilibrium-lab:local`` from scripts/image/build.sh, ``equilibrium-redis:local``
from scripts/ci/build-redis-image.sh), all through the one gate (tests/environment.py: CI sets
EQUILIBRIUM_REQUIRE_DOCKER=1 and provides them; elsewhere the test is skipped with the reason).
Nothing is ever pulled or built here (``up --no-build`` after checking the images exist), and
the admin ports are published on 127.0.0.1 only.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import subprocess
import tarfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from equilibrium.lab.processes import free_port
from tests.environment import DOCKER, unavailable
from tests.support import child_env, metric_value

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
IMAGE = "equilibrium:local"  # compose.yaml's image for the key generator and the signalers
LAB_IMAGE = "equilibrium-lab:local"  # the demo's: the same Dockerfile with EXTRAS=lab
REDIS_IMAGE = os.environ.get("EQUILIBRIUM_REDIS_IMAGE", "equilibrium-redis:local")
DEMO_SECONDS = 40
"""Long enough that the fixed costs (first plan, failover) stay a small share of the run."""
WAIT = 60.0
"""Bound of every wait for a container (healthy, completed, leading, exited after the load)."""
UPSTREAM = "demo"
ADMIN = 15020
CLIENTS = {"client-1", "client-2", "client-3"}  # the demo's --clients 3
SIGNALERS = ["signaler", "signaler-standby"]
PROJECT_LABEL = "com.docker.compose.project"


def compose_env(**settings: str) -> dict[str, str]:
    """The environment Compose interpolates the file with: ours, without the caller's values
    of the file's variables, plus ``settings``."""
    env = child_env(DOCKER_HOST=os.environ.get("DOCKER_HOST", "unix:///run/docker.sock"))
    for name in ("REDIS_IMAGE", "REDIS_PASSWORD", "REDIS_SIGNALER_PASSWORD",
                 "REDIS_SIDECAR_PASSWORD", "SIGNALER_ADMIN_PORT", "STANDBY_ADMIN_PORT",
                 "COMPOSE_FILE", "COMPOSE_PROJECT_NAME"):
        env.pop(name, None)
    env.update(settings)
    return env


def compose(project: str, files: list[Path], env: dict[str, str], *args: str,
            timeout: float = 120.0) -> str:
    """``docker-compose -p PROJECT -f FILE... ARGS``; its stdout, or AssertionError with both
    streams."""
    argv = ["docker-compose", "-p", project, *(a for f in files for a in ("-f", str(f))), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT, check=False)
    assert done.returncode == 0, f"{' '.join(argv[3:])}: {done.returncode}\n" \
        f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


# ---- Compose reads the file (no engine needed) -----------------------------------------------
@pytest.mark.needs("docker-compose")
def test_compose_reads_the_file_with_our_settings_and_its_defaults() -> None:
    env = compose_env(REDIS_IMAGE="r:1", REDIS_PASSWORD="pw", REDIS_SIGNALER_PASSWORD="spw",
                      REDIS_SIDECAR_PASSWORD="cpw", SIGNALER_ADMIN_PORT="40001")
    services = yaml.safe_load(compose("config-check", [COMPOSE], env, "config"))["services"]
    assert services["redis"]["image"] == "r:1"
    assert "pw" in services["redis"]["command"]
    # least privilege: the signalers log in as eq-signaler, the demo's sidecars as eq-sidecar
    assert all("redis://eq-signaler:spw@redis:6379/0" in services[s]["command"]
               for s in SIGNALERS)
    assert "--sidecar-arg=redis://eq-sidecar:cpw@redis:6379/0" in services["demo"]["command"]
    assert services["signaler"]["ports"] == [f"127.0.0.1:40001:{ADMIN}/tcp"]
    assert services["signaler-standby"]["ports"] == [f"127.0.0.1:15021:{ADMIN}/tcp"]
    for name in (*SIGNALERS, "demo"):
        assert services[name]["depends_on"] == {
            "redis": {"condition": "service_healthy"},
            "mesh-key": {"condition": "service_completed_successfully"}}, name
    # The signalers run the lean sidecar image; only the demo builds and runs the lab image.
    for name in ("mesh-key", *SIGNALERS):
        assert services[name]["image"] == IMAGE, name
        assert services[name]["build"]["context"] == str(ROOT), name
        assert not services[name]["build"].get("args"), name
    assert services["demo"]["image"] == LAB_IMAGE
    assert services["demo"]["build"]["context"] == str(ROOT)
    assert services["demo"]["build"]["args"] == {"EXTRAS": "lab"}
    # The healthcheck keeps its exec form: the engine runs it without a shell in the image.
    assert services["redis"]["healthcheck"]["test"][:2] == ["CMD", "redis-cli"]

    defaults = yaml.safe_load(compose("config-check", [COMPOSE], compose_env(REDIS_PASSWORD=""),
                                      "config"))["services"]
    assert defaults["redis"]["image"] == "redis:7.2-alpine"  # ':-' also replaces an empty value
    assert "equilibrium-local" in defaults["redis"]["command"]
    assert defaults["signaler"]["ports"] == [f"127.0.0.1:15020:{ADMIN}/tcp"]


# ---- the stack on the engine -----------------------------------------------------------------
@pytest.fixture
def engine() -> Iterator[Any]:
    help_text = ("start the engine with scripts/ci/docker-up.sh and build the images with "
                 "scripts/ci/build-redis-image.sh and scripts/image/build.sh")
    import docker
    import docker.errors

    try:
        client = docker.DockerClient(
            base_url=os.environ.get("DOCKER_HOST", "unix:///run/docker.sock"), timeout=30)
        client.ping()
    except docker.errors.DockerException as exc:
        unavailable(f"no Docker engine answers ({exc}); {help_text}", variable=DOCKER)
    for image in (IMAGE, LAB_IMAGE, REDIS_IMAGE):
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


class Stack:
    """One Compose project of compose.yaml (plus the test's override) on the engine."""

    def __init__(self, client: Any, project: str, files: list[Path], env: dict[str, str]) -> None:
        self.client, self.project, self.files, self.env = client, project, files, env

    def compose(self, *args: str, timeout: float = 120.0) -> str:
        return compose(self.project, self.files, self.env, *args, timeout=timeout)

    def container(self, service: str) -> Any:
        labels = [f"{PROJECT_LABEL}={self.project}", f"com.docker.compose.service={service}"]
        (found,) = self.client.containers.list(all=True, filters={"label": labels})
        return found

    def state(self, service: str) -> dict[str, Any]:
        return dict(self.container(service).attrs["State"])

    def admin_url(self, service: str) -> str:
        host, port = self.compose("port", service, str(ADMIN)).strip().rsplit(":", 1)
        assert host == "127.0.0.1", (service, host)  # the file publishes on loopback only
        return f"http://{host}:{port}"

    def logs(self, service: str, tail: int = 80) -> str:
        return self.compose("logs", "--no-color", f"--tail={tail}", service)

    def read_file(self, service: str, path: str) -> bytes:
        """A file from the service's container (running or exited)."""
        chunks, _ = self.container(service).get_archive(path)
        with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tar:
            member = tar.extractfile(tar.getmembers()[0])
            assert member is not None, path
            return member.read()

    def wait_for(self, service: str, done: Callable[[dict[str, Any]], bool], what: str,
                 timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            state = self.state(service)
            if done(state):
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"{service} not {what} within {timeout}s: {state}\n"
                                     f"{self.logs(service)}")
            time.sleep(0.5)

    def leftovers(self) -> list[str]:
        """What ``down`` left of this project on the engine (containers, networks, volumes)."""
        label = {"label": f"{PROJECT_LABEL}={self.project}"}
        return [*(f"container {c.name}" for c in self.client.containers.list(all=True,
                                                                              filters=label)),
                *(f"network {n.name}" for n in self.client.networks.list(filters=label)),
                *(f"volume {v.name}" for v in self.client.volumes.list(filters=label))]


def demo_override(tmp_path: Path, env: dict[str, str]) -> Path:
    """An override file: the demo's command as the file writes it, with only ``--duration``
    changed, and no tty (its output is read from the logs)."""
    config = yaml.safe_load(compose("config-check", [COMPOSE], env, "config"))
    command = list(config["services"]["demo"]["command"])
    i = command.index("--duration")
    command[i + 1] = str(DEMO_SECONDS)
    path = tmp_path / "compose.test.yaml"
    path.write_text(yaml.safe_dump({"services": {"demo": {"command": command, "tty": False}}}))
    return path


@pytest.fixture
def stack(engine: Any, tmp_path: Path) -> Iterator[Stack]:
    env = compose_env(REDIS_IMAGE=REDIS_IMAGE, REDIS_PASSWORD=secrets.token_hex(12),
                      SIGNALER_ADMIN_PORT=str(free_port()), STANDBY_ADMIN_PORT=str(free_port()))
    project = f"eq-compose-{os.getpid()}-{secrets.token_hex(3)}"
    stack = Stack(engine, project, [COMPOSE, demo_override(tmp_path, env)], env)
    try:
        yield stack
    finally:
        stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "5")
        left = stack.leftovers()
    assert not left, left


def http_get(url: str) -> bytes | None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=3) as resp:
            return bytes(resp.read())
    except OSError:
        return None


def upstream_state(stack: Stack, service: str) -> dict[str, Any]:
    body = http_get(f"{stack.admin_url(service)}/debug/state")
    if body is None:
        return {}
    return dict(json.loads(body).get("upstreams", {}).get(UPSTREAM, {}))


def published_total(stack: Stack, service: str) -> float:
    text = (http_get(f"{stack.admin_url(service)}/metrics") or b"").decode()
    return metric_value(text, "equilibrium_signaler_recommendations_published_total",
                        upstream=UPSTREAM)


def wait_leading(stack: Stack, candidates: list[str]) -> tuple[str, dict[str, Any]]:
    """The signaler that leads the demo upstream with an optimal plan and publications."""
    deadline = time.monotonic() + WAIT
    seen: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        for name in candidates:
            seen[name] = state = upstream_state(stack, name)
            plan = state.get("plan") or {}
            if state.get("leader") and state.get("published", 0) > 0 \
                    and plan.get("status") == "optimal":
                return name, state
        if stack.state("demo")["Status"] == "exited":
            break
        time.sleep(0.5)
    logs = "\n".join(f"--- {n}\n{stack.logs(n)}" for n in [*candidates, "demo"])
    raise AssertionError(f"no signaler of {candidates} led {UPSTREAM} and published: "
                         f"{json.dumps(seen)[:2000]}\n{logs}")


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.needs("docker", "docker-compose")
def test_compose_stack_publishes_fails_over_and_the_demo_follows(stack: Stack) -> None:
    # `up` starts Redis and the one-shot key generator first and waits for the file's
    # depends_on conditions (healthy, completed successfully) before the others.
    stack.compose("up", "--detach", "--no-build", *SIGNALERS, "demo", timeout=WAIT + 60)

    # The one-shot key generator completed, and the key is in the volume the others mount.
    assert stack.state("mesh-key")["ExitCode"] == 0
    key = stack.read_file("signaler", "/run/equilibrium/mesh.key")
    assert re.fullmatch(rb"[0-9a-f]{64}", key), key[:80]
    assert stack.read_file("signaler-standby", "/run/equilibrium/mesh.key") == key

    # One signaler leads the demo's upstream: an optimal plan, recommendations published.
    leader, state = wait_leading(stack, SIGNALERS)
    (standby,) = set(SIGNALERS) - {leader}
    assert set(state.get("sidecars", [])) <= CLIENTS
    assert published_total(stack, leader) > 0
    assert not upstream_state(stack, standby).get("leader")
    # The leader's dashboard is published with it (127.0.0.1): its frame shows the plan.
    shown: dict[str, Any] = {}
    for _ in range(20):  # a frame a second
        frame = json.loads(http_get(f"{stack.admin_url(leader)}/dashboard/frame") or b"{}")
        shown = next((u for u in frame.get("upstreams", []) if u["name"] == UPSTREAM), {})
        if shown.get("leader") and shown.get("plan"):
            break
        time.sleep(0.5)
    assert shown.get("leader") is True and shown.get("plan"), frame

    # Kill it (SIGKILL; the restart policy leaves a killed container down): the standby leads.
    stack.compose("kill", leader)
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
