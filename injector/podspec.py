"""The two containers the injector adds to a pod, as Kubernetes JSON.

Owns the sidecar container (proxy listeners, probes, hardening, and its start and stop order:
lifecycle hooks as an ordinary container, or a native sidecar's fields) and the
``equilibrium-init`` container (interception rules, NET_ADMIN + NET_RAW only). Pure data in,
data out: the flags here must match ``equilibrium sidecar``, ``equilibrium sidecar-hook`` and
``equilibrium init`` (sidecar/cli.py, sidecar/hooks.py, injector/init_cli.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from injector.config import (
    DEFAULT_IPV6,
    INIT_NAME,
    MAX_SHUTDOWN_DELAY,
    SIDECAR_NAME,
    InjectorConfig,
    Ipv6Mode,
)
from wire import logs
from wire.signing import MESH_SECRET_ENV

Json = dict[str, Any]

IMAGE_ENTRYPOINT = "/opt/equilibrium/bin/equilibrium"
"""The image's ``equilibrium`` command (the Dockerfile's ENTRYPOINT): exec hooks name it."""
POST_START_TIMEOUT = 60  # seconds the app's start waits for the sidecar at most
# The pod's stop, within its terminationGracePeriodSeconds (after which the kubelet kills
# what still runs): the sidecar's preStop delay, then its drain (sidecar.config's default,
# shortened to what is left of the period, a second kept for the exit itself), of which at
# least DRAIN_ROOM seconds are kept however long a delay is asked for.
DEFAULT_GRACE_PERIOD = 30.0  # Kubernetes' default terminationGracePeriodSeconds
SIDECAR_DRAIN = 20.0  # sidecar.config.DEFAULT_DRAIN_TIMEOUT
DRAIN_ROOM = 5.0
EXIT_ROOM = 1.0

# ``equilibrium.io/ipv6`` -> the flags of ``equilibrium init`` (auto is its default: no flag).
IPV6_INIT_FLAGS: dict[Ipv6Mode, tuple[str, ...]] = {
    "auto": (),
    "required": ("--ipv6",),
    "off": ("--no-ipv6",),
}


@dataclass(frozen=True, slots=True)
class PodMeshSettings:
    """What one pod's annotations decided (already validated)."""

    strategy: str
    app_port: int
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_inbound_ports: tuple[int, ...] = ()
    discovery: bool = True  # watch Services/EndpointSlices (needs the pod's API token)
    ipv6: Ipv6Mode = DEFAULT_IPV6  # IPv6 interception by the init container
    app_prestop_seconds: float = 0.0  # the app's own preStop wait, which the sidecar outlasts
    grace_seconds: float = DEFAULT_GRACE_PERIOD  # the pod's terminationGracePeriodSeconds
    long_paths: tuple[str, ...] = ()  # the app's declared long requests (--inbound-long-paths)


@dataclass(frozen=True, slots=True)
class StopTimes:
    """The ordered sidecar's stop (:func:`stop_times`)."""

    delay: float  # its preStop hook's wait (0: no hook)
    drain: float  # its --drain-timeout
    wanted: float  # the delay the app's stop asks for (more than ``delay`` when cut)


def stop_times(config: InjectorConfig, settings: PodMeshSettings) -> StopTimes:
    """An ordinary sidecar container's preStop delay (the injector's ``shutdown_delay``
    after the app's own preStop wait) and its drain, fitted into the pod's grace period:
    the delay is cut to leave :data:`DRAIN_ROOM` seconds, but never to end before the app's
    own wait does (the app would make its last calls to a sidecar that stopped accepting),
    and the drain to end a second before the kubelet's kill. A native sidecar has neither
    (the kubelet stops it after the app exited: its drain comes after the app's stop)."""
    if config.native_sidecar:
        return StopTimes(0.0, SIDECAR_DRAIN, 0.0)
    grace = settings.grace_seconds
    delay = wanted = 0.0
    if config.shutdown_delay > 0:
        wanted = min(config.shutdown_delay + settings.app_prestop_seconds, MAX_SHUTDOWN_DELAY)
        delay = max(min(wanted, grace - DRAIN_ROOM - EXIT_ROOM),
                    min(settings.app_prestop_seconds, grace), 0.0)
    drain = min(SIDECAR_DRAIN, max(EXIT_ROOM, grace - delay - EXIT_ROOM))
    return StopTimes(delay, drain, wanted)


def kube_literal(arg: str) -> str:
    """``arg`` as a container argument the kubelet passes on unchanged: it expands
    ``$(NAME)`` to the container's variable (the mesh key among them) and ``$$`` to ``$``,
    so a user's ``$`` is written ``$$``."""
    return arg.replace("$", "$$")


def sidecar_container(config: InjectorConfig, settings: PodMeshSettings) -> Json:
    """The proxy container: runs as the sidecar UID so its own traffic is not intercepted."""
    res = config.resources
    # Redirected connections are routed by their original destination (--transparent), and
    # a Service's cluster IP maps to its endpoints through the Kubernetes API (--discovery).
    mesh_flags = ["--transparent", *(["--discovery"] if settings.discovery else [])]
    if settings.long_paths:  # the pod's equilibrium.io/long-paths, for its inbound listener
        mesh_flags += ["--inbound-long-paths", kube_literal(",".join(settings.long_paths))]
    return {
        "name": SIDECAR_NAME,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "args": [
            "sidecar",
            "--outbound", f"0.0.0.0:{config.outbound_port}",
            "--inbound", f"0.0.0.0:{config.inbound_port}",
            "--app", f"http://127.0.0.1:{settings.app_port}",
            "--admin", f"0.0.0.0:{config.admin_port}",
            "--id", "$(POD_NAME)",
            "--strategy", settings.strategy,
            *mesh_flags,
            *_drain_flag(config, settings),
        ],
        "env": [
            _field_env("POD_NAME", "metadata.name"),
            _field_env("POD_NAMESPACE", "metadata.namespace"),
            _field_env("POD_IP", "status.podIP"),
            # Secrets stay out of argv (visible in /proc); the sidecar reads them from env.
            _secret_env(MESH_SECRET_ENV, config.mesh_secret_name,
                        config.mesh_secret_key),
            _secret_env("EQUILIBRIUM_REDIS_URL", config.mesh_secret_name, config.redis_url_key),
            *([{"name": logs.ENV, "value": config.sidecar_log_format}]
              if config.sidecar_log_format != "plain" else []),
        ],
        "ports": [{"name": "eq-admin", "containerPort": config.admin_port, "protocol": "TCP"}],
        "resources": {
            "requests": {"cpu": res.cpu_request, "memory": res.memory_request},
            "limits": {"cpu": res.cpu_limit, "memory": res.memory_limit},
        },
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": config.admin_port},
            "periodSeconds": 5,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": config.admin_port},
            "initialDelaySeconds": 5,
            "periodSeconds": 10,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
        "securityContext": {
            "runAsUser": config.sidecar_uid,
            "runAsGroup": config.sidecar_uid,
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        **(_native_sidecar(config) if config.native_sidecar else _ordered(config, settings)),
    }


def _ordered(config: InjectorConfig, settings: PodMeshSettings) -> Json:
    """An ordinary container's start and stop order (:mod:`sidecar.hooks`): placed first in
    the pod, its postStart hook holds the app's start until the sidecar is ready; its
    preStop hook keeps it serving ``shutdown_delay`` seconds after the pod is told to stop,
    counted from the end of the app's own preStop wait when it has one (the kubelet runs
    the hooks side by side and sends each container SIGTERM after its own)."""
    hook = [IMAGE_ENTRYPOINT, "sidecar-hook"]
    lifecycle: Json = {"postStart": {"exec": {"command": [
        *hook, "post-start", "--admin", f"127.0.0.1:{config.admin_port}",
        "--timeout", str(POST_START_TIMEOUT)]}}}
    delay = stop_times(config, settings).delay
    if delay > 0:
        lifecycle["preStop"] = {"exec": {"command": [
            *hook, "pre-stop", "--seconds", f"{delay:g}"]}}
    return {"lifecycle": lifecycle}


def _drain_flag(config: InjectorConfig, settings: PodMeshSettings) -> list[str]:
    """``--drain-timeout`` when the sidecar's default drain would outlast the grace period."""
    drain = stop_times(config, settings).drain
    return [] if drain >= SIDECAR_DRAIN else ["--drain-timeout", f"{drain:g}"]


def _native_sidecar(config: InjectorConfig) -> Json:
    """What makes the proxy a native sidecar (KEP-753, Kubernetes 1.29+): as an init
    container that keeps running, the kubelet starts the app's containers only once its
    startup probe passes (the app's first outbound call finds the listener up) and stops it
    only after they have exited (the app's last calls go through while it shuts down)."""
    return {
        "restartPolicy": "Always",
        "startupProbe": {
            "httpGet": {"path": "/readyz", "port": config.admin_port},
            "periodSeconds": 1,
            "timeoutSeconds": 1,
            "failureThreshold": 120,
        },
    }


def init_container(config: InjectorConfig, settings: PodMeshSettings) -> Json:
    """The rule installer: root inside the pod's network namespace, NET_ADMIN + NET_RAW only."""
    args = [
        "init",
        "--outbound-port", str(config.outbound_port),
        "--inbound-port", str(config.inbound_port),
        "--proxy-uid", str(config.sidecar_uid),
        "--exclude-inbound-ports", _ports_arg((config.admin_port, *settings.exclude_inbound_ports)),
    ]
    if settings.exclude_outbound_ports:
        args += ["--exclude-outbound-ports", _ports_arg(settings.exclude_outbound_ports)]
    args += IPV6_INIT_FLAGS[settings.ipv6]
    return {
        "name": INIT_NAME,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "args": args,
        "resources": {
            "requests": {"cpu": "10m", "memory": "32Mi"},
            "limits": {"cpu": "200m", "memory": "128Mi"},
        },
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            # iptables takes its lock under /run; Istio's init also keeps a writable root.
            "readOnlyRootFilesystem": False,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def _ports_arg(ports: tuple[int, ...]) -> str:
    return ",".join(str(p) for p in dict.fromkeys(ports))


def _field_env(name: str, field_path: str) -> Json:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": field_path}}}


def _secret_env(name: str, secret: str, key: str) -> Json:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
