"""Run a compose file's services on the plain Docker engine, without the compose plugin.

Owns the translation of the subset of the Compose specification that ``compose.yaml`` uses into
Docker Engine API calls (through the ``docker`` SDK): ``${VAR:-default}`` interpolation, a
user-defined network per project (each container reachable by its service name), named
volumes, ``depends_on`` with ``service_started`` / ``service_healthy`` /
``service_completed_successfully``, ``entrypoint``, ``command``, ``user``, ``environment``,
``healthcheck`` (exec form, as the engine runs it: no shell needed in the image), ``restart``,
``tty`` and ``ports``. A key outside that subset is an error, never silently dropped, so a test
built on this runs what the file says or fails.

Differences from ``docker compose``, all on the side of isolation: the project name is unique
per run (so networks, volumes and containers never collide with a user's stack or another
test), published ports keep their loopback address but get an ephemeral host port, and
``build:`` is not run: the image must already exist locally. Nothing is ever pulled.
"""

from __future__ import annotations

import io
import re
import tarfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import yaml
from docker.models.containers import Container

LABEL = "org.equilibrium.compose-test.project"
"""Every container, network and volume made here carries this label (value: the project)."""

SERVICE_KEYS = frozenset({
    "image", "build", "command", "entrypoint", "user", "environment", "volumes", "depends_on",
    "healthcheck", "restart", "tty", "ports",
})
"""The service keys this runner honours; ``build`` is accepted and the image must exist."""

CONDITIONS = ("service_started", "service_healthy", "service_completed_successfully")

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|us|ns|h|m|s)")
_UNIT_NS = {"h": 3600e9, "m": 60e9, "s": 1e9, "ms": 1e6, "us": 1e3, "ns": 1.0}


class ComposeError(RuntimeError):
    """The file asks for something this runner does not do, or a service did not come up."""


# ---- the file ------------------------------------------------------------------------------


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose interpolation of every string in ``value``: ``$VAR``, ``${VAR}``,
    ``${VAR:-default}`` (default when unset or empty), ``${VAR-default}`` (when unset),
    ``${VAR:?message}`` / ``${VAR?message}`` (error) and ``$$`` (a literal ``$``)."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: _substitute(m, env), value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def _substitute(m: re.Match[str], env: Mapping[str, str]) -> str:
    if m.group("escaped"):
        return "$"
    name = m.group("braced") or m.group("bare")
    op, arg = m.group("op"), m.group("arg") or ""
    current = env.get(name)
    missing = current is None or (current == "" and op is not None and op.startswith(":"))
    if op is not None and op.endswith("-"):
        return arg if missing else str(current)
    if op is not None and op.endswith("?"):
        if missing:
            raise ComposeError(f"required variable {name} is missing: {arg}")
        return str(current)
    return current or ""


def load_compose(path: Path, env: Mapping[str, str]) -> dict[str, Any]:
    """The file as YAML (merge keys resolved), interpolated with ``env``, every service checked
    against :data:`SERVICE_KEYS`."""
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("services"), dict):
        raise ComposeError(f"{path}: no services mapping")
    data = {k: v for k, v in data.items() if not str(k).startswith("x-")}
    spec: dict[str, Any] = interpolate(data, env)
    for name, service in spec["services"].items():
        unknown = set(service) - SERVICE_KEYS
        if unknown:
            raise ComposeError(f"service {name}: keys {sorted(unknown)} are not run by this "
                               "runner; teach tests/integration/compose_engine.py about them")
        for need, condition in depends_on(service).items():
            if need not in spec["services"] or condition not in CONDITIONS:
                raise ComposeError(f"service {name}: bad depends_on {need}: {condition}")
    return spec


def depends_on(service: Mapping[str, Any]) -> dict[str, str]:
    """``depends_on`` as {service: condition} (the list form means ``service_started``)."""
    needs = service.get("depends_on") or {}
    if isinstance(needs, list):
        return {n: "service_started" for n in needs}
    return {n: (c or {}).get("condition", "service_started") for n, c in needs.items()}


def start_order(services: Mapping[str, Any], wanted: Iterable[str]) -> list[str]:
    """``wanted`` and everything it depends on, dependencies first (cycles are an error)."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ComposeError(f"depends_on cycle through {name}")
        visiting.add(name)
        for need in depends_on(services[name]):
            visit(need)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


def duration_ns(text: str | int | float) -> int:
    """A compose duration (``2s``, ``1m30s``, ``500ms``) in nanoseconds."""
    if isinstance(text, int | float):
        return int(text * 1e9)
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        raise ComposeError(f"bad duration {text!r}")
    return int(sum(float(n) * _UNIT_NS[u] for n, u in parts))


def healthcheck(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The engine's HealthConfig for a compose ``healthcheck``."""
    test = spec["test"]
    if isinstance(test, str):
        test = ["CMD-SHELL", test]
    out: dict[str, Any] = {"test": list(test)}
    for key in ("interval", "timeout", "start_period"):
        if key in spec:
            out[key] = duration_ns(spec[key])
    if "retries" in spec:
        out["retries"] = int(spec["retries"])
    return out


def port_bindings(ports: Iterable[str]) -> dict[str, tuple[str, None]]:
    """``IP:HOST:CONTAINER`` entries as engine bindings on the same IP, ephemeral host port.

    Only loopback addresses are accepted: a test never publishes a port beyond this machine.
    """
    out: dict[str, tuple[str, None]] = {}
    for entry in ports:
        ip, _host, container = str(entry).rsplit(":", 2) if str(entry).count(":") >= 2 else (
            "", "", str(entry))
        if ip not in ("127.0.0.1", "[::1]"):
            raise ComposeError(f"port {entry!r} is not bound to loopback")
        proto = "tcp"
        if "/" in container:
            container, proto = container.split("/", 1)
        out[f"{container}/{proto}"] = (ip.strip("[]"), None)
    return out


def environment(value: Any) -> dict[str, str]:
    if isinstance(value, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in value)
    return {str(k): "" if v is None else str(v) for k, v in (value or {}).items()}


# ---- the engine ----------------------------------------------------------------------------


@dataclass
class ComposeProject:
    """One run of a compose file on the engine: ``up`` services, observe them, ``down``."""

    client: docker.DockerClient
    spec: dict[str, Any]
    project: str
    containers: dict[str, Container] = field(default_factory=dict)
    created_volumes: list[str] = field(default_factory=list)
    network_name: str = ""

    def __post_init__(self) -> None:
        self.network_name = f"{self.project}_default"

    # ---- names
    def container_name(self, service: str) -> str:
        return f"{self.project}-{service}-1"

    def volume_name(self, volume: str) -> str:
        return f"{self.project}_{volume}"

    # ---- lifecycle
    def create_shared(self) -> None:
        """The project's network and its named volumes."""
        labels = {LABEL: self.project}
        self.client.networks.create(self.network_name, driver="bridge", labels=labels)
        for volume in self.spec.get("volumes") or {}:
            name = self.volume_name(volume)
            self.client.volumes.create(name, labels=labels)
            self.created_volumes.append(name)

    def up(self, services: Iterable[str], *, timeout: float,
           overrides: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Start ``services`` (and what they depend on) in ``depends_on`` order, waiting for
        each dependency's condition first (``timeout`` seconds per wait)."""
        overrides = overrides or {}
        specs = self.spec["services"]
        for name in start_order(specs, services):
            for need, condition in depends_on(specs[name]).items():
                self.wait_condition(need, condition, timeout)
            self.start(name, overrides.get(name, {}))

    def start(self, service: str, override: Mapping[str, Any]) -> Container:
        spec = {**self.spec["services"][service], **override}
        image = spec["image"]
        try:
            self.client.images.get(image)
        except docker.errors.ImageNotFound:
            raise ComposeError(f"image {image} (service {service}) is not on this engine; "
                               "it is never pulled: build it first") from None
        kwargs: dict[str, Any] = {
            "name": self.container_name(service),
            "labels": {LABEL: self.project, f"{LABEL}.service": service},
            "network": self.network_name,
            "networking_config": {self.network_name: self.client.api.create_endpoint_config(
                aliases=[service])},
            "tty": bool(spec.get("tty", False)),
            "detach": True,
        }
        if "entrypoint" in spec:
            kwargs["entrypoint"] = spec["entrypoint"]
            kwargs["command"] = spec.get("command", [])  # compose drops the image's CMD too
        elif "command" in spec:
            kwargs["command"] = spec["command"]
        if "user" in spec:
            kwargs["user"] = str(spec["user"])
        if "environment" in spec:
            kwargs["environment"] = environment(spec["environment"])
        if "healthcheck" in spec:
            kwargs["healthcheck"] = healthcheck(spec["healthcheck"])
        restart = str(spec.get("restart", "no"))
        if restart != "no":
            kwargs["restart_policy"] = {"Name": restart}
        if spec.get("ports"):
            kwargs["ports"] = port_bindings(spec["ports"])
        if spec.get("volumes"):
            kwargs["volumes"] = self._mounts(service, spec["volumes"])
        container = self.client.containers.create(image, **kwargs)
        self.containers[service] = container
        container.start()
        return container

    def _mounts(self, service: str, entries: Iterable[str]) -> dict[str, dict[str, str]]:
        out = {}
        named = self.spec.get("volumes") or {}
        for entry in entries:
            source, target, *mode = str(entry).split(":")
            if source not in named:
                raise ComposeError(f"service {service}: volume {entry!r} is not a named volume")
            out[self.volume_name(source)] = {"bind": target, "mode": mode[0] if mode else "rw"}
        return out

    def down(self) -> list[str]:
        """Remove every container, the network and the volumes; returns what failed."""
        problems = []
        found = self.client.containers.list(all=True, filters={"label": f"{LABEL}={self.project}"})
        for container in {c.id: c for c in [*self.containers.values(), *found]}.values():
            try:
                container.remove(force=True, v=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                problems.append(f"container {container.name}: {exc}")
        for network in self.client.networks.list(names=[self.network_name]):
            try:
                network.remove()
            except docker.errors.APIError as exc:
                problems.append(f"network {network.name}: {exc}")
        for name in self.created_volumes:
            try:
                self.client.volumes.get(name).remove(force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                problems.append(f"volume {name}: {exc}")
        return problems

    # ---- observation
    def state(self, service: str) -> dict[str, Any]:
        container = self.containers[service]
        container.reload()
        return dict(container.attrs["State"])

    def logs(self, service: str, tail: int = 40) -> str:
        try:
            raw = self.containers[service].logs(tail=tail)
        except (KeyError, docker.errors.APIError) as exc:
            return f"<no logs: {exc}>"
        return raw.decode("utf-8", "replace")

    def wait_condition(self, service: str, condition: str, timeout: float) -> None:
        """Block (at most ``timeout`` s) until ``service`` meets a ``depends_on`` condition."""
        if condition == "service_started":
            return
        if condition == "service_healthy":
            state = self.wait_for(
                service, lambda s: (s.get("Health") or {}).get("Status") in {"healthy",
                                                                             "unhealthy"},
                "healthy", timeout)
            if state["Health"]["Status"] == "unhealthy":  # compose gives up here too
                raise ComposeError(f"{service} is unhealthy (last health checks "
                                   f"{state['Health']['Log'][-2:]}):\n{self.logs(service)}")
        else:
            self.wait_for(service, lambda s: s["Status"] == "exited", "exited", timeout)
            code = self.state(service)["ExitCode"]
            if code != 0:
                raise ComposeError(f"{service} exited with {code}:\n{self.logs(service)}")

    def wait_for(self, service: str, ok: Callable[[dict[str, Any]], bool], what: str,
                 timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            state = self.state(service)
            if ok(state):
                return state
            if state["Status"] == "exited" and what != "exited":
                raise ComposeError(f"{service} exited ({state['ExitCode']}) before {what}:\n"
                                   f"{self.logs(service)}")
            if time.monotonic() > deadline:
                health = (state.get("Health") or {}).get("Log") or []
                raise ComposeError(f"{service} not {what} within {timeout:g} s (state "
                                   f"{state['Status']}, last health checks {health[-2:]}):\n"
                                   f"{self.logs(service)}")
            time.sleep(0.2)

    def published(self, service: str, port: str) -> tuple[str, int]:
        """The (loopback IP, ephemeral host port) a container port was published on."""
        container = self.containers[service]
        container.reload()
        (binding, *_rest) = container.attrs["NetworkSettings"]["Ports"][port]
        return binding["HostIp"], int(binding["HostPort"])

    def read_file(self, service: str, path: str) -> bytes:
        """One file out of a (running or stopped) container, as ``docker cp`` does."""
        stream, _stat = self.containers[service].get_archive(path)
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            member = tar.next()
            if member is None or not member.isfile():
                raise ComposeError(f"{service}:{path} is not a file")
            extracted = tar.extractfile(member)
            assert extracted is not None
            return extracted.read()
