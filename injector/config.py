"""What the injector injects: its configuration and the pod-annotation contract.

Owns the names users type (annotations, label, strategy profiles, ports, UID) and the parsing of
annotation values. Pure: no I/O, no environment reads; the CLI builds an ``InjectorConfig``.
Documented for users in docs/kubernetes.md ("Annotations").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

# The names only: mesh.profiles would import numpy into every init container (via this module).
from mesh.errors import ConfigError
from mesh.profile_names import PROFILE_NAMES
from wire.long_paths import ANNOTATION, parse_long_path_list
from wire.numerals import ascii_uint

# ---- the annotation / label contract -----------------------------------------------------------
INJECT: Final = "equilibrium.io/inject"  # "true" | "false" (per-pod opt-in / opt-out)
STRATEGY: Final = "equilibrium.io/strategy"  # one of STRATEGY_PROFILES
EXCLUDE_OUTBOUND_PORTS: Final = "equilibrium.io/exclude-outbound-ports"  # "5432,6379"
EXCLUDE_INBOUND_PORTS: Final = "equilibrium.io/exclude-inbound-ports"  # "9090"
APP_PORT: Final = "equilibrium.io/app-port"  # port the inbound listener forwards to
IPV6: Final = "equilibrium.io/ipv6"  # one of IPV6_MODES: IPv6 interception by the init container
LONG_PATHS: Final = ANNOTATION  # "/watch,/v1/poll": the app's long requests (wire.long_paths)
STATUS: Final = "equilibrium.io/status"  # written by the injector: "injected"
STATUS_INJECTED: Final = "injected"
DEFAULT_CONTAINER: Final = "kubectl.kubernetes.io/default-container"

STRATEGY_PROFILES: Final = PROFILE_NAMES  # the sidecar's profiles (mesh/profiles.py)
DEFAULT_STRATEGY: Final = "balanced"

# auto: intercept IPv6 when the pod has it, warn when it cannot (``equilibrium init``, no flag);
# required: the pod does not start unless IPv6 is intercepted (--ipv6); off: IPv4 only (--no-ipv6).
Ipv6Mode = Literal["auto", "required", "off"]
IPV6_MODES: Final[tuple[Ipv6Mode, ...]] = ("auto", "required", "off")
DEFAULT_IPV6: Final[Ipv6Mode] = "auto"

SIDECAR_NAME: Final = "equilibrium-sidecar"
INIT_NAME: Final = "equilibrium-init"

# ---- pod networking (the same numbers Istio uses) ----------------------------------------------
OUTBOUND_PORT: Final = 15001
INBOUND_PORT: Final = 15006
ADMIN_PORT: Final = 15020
SIDECAR_UID: Final = 1337
DEFAULT_APP_PORT: Final = 8080


class AnnotationError(ConfigError):
    """An annotation value (or an init flag of the same form) the injector cannot honour
    exactly (the message names it)."""


@dataclass(frozen=True, slots=True)
class Resources:
    """Kubernetes resource requests/limits of the sidecar container."""

    cpu_request: str = "50m"
    memory_request: str = "96Mi"
    cpu_limit: str = "1"
    memory_limit: str = "256Mi"


DEFAULT_SHUTDOWN_DELAY: Final = 5.0
"""Seconds an ordinary sidecar container keeps serving after its pod is told to stop."""
MAX_SHUTDOWN_DELAY: Final = 300.0


@dataclass(frozen=True, slots=True)
class InjectorConfig:
    """Everything the injector needs to build the patch; one per webhook process.

    ``mesh_secret_name`` names a Secret that must exist in every namespace running meshed pods
    (``secretKeyRef`` cannot cross namespaces), with keys ``mesh-hmac-key`` and ``redis-url``.
    """

    image: str = "equilibrium:local"
    image_pull_policy: str = "IfNotPresent"
    mesh_secret_name: str = "equilibrium-mesh"
    mesh_secret_key: str = "mesh-hmac-key"
    redis_url_key: str = "redis-url"
    resources: Resources = field(default_factory=Resources)
    outbound_port: int = OUTBOUND_PORT
    inbound_port: int = INBOUND_PORT
    admin_port: int = ADMIN_PORT
    sidecar_uid: int = SIDECAR_UID
    # the proxy as a native sidecar (Kubernetes 1.29+): an init container with restartPolicy
    # Always, ready before the app's containers start and stopped after they exit
    native_sidecar: bool = False
    # otherwise (an ordinary container): seconds its preStop hook keeps it serving after the
    # pod is told to stop, for the app's last calls (0: no hook); see sidecar.hooks
    shutdown_delay: float = DEFAULT_SHUTDOWN_DELAY
    sidecar_log_format: str = "plain"  # the injected sidecars' log lines (wire.logs)


MAX_LISTED_PORTS: Final = 1024
"""Ports one annotation may list: each becomes an iptables rule (per address family)."""


def parse_port_list(source: str, value: str, *, expected: str = "a comma list of integers "
                    "1-65535, e.g. \"5432,6379\"") -> tuple[int, ...]:
    """Parse ``"80, 443"`` into ``(80, 443)``: a comma list of TCP ports 1..65535, no duplicates.

    ``""`` (or only spaces) means no ports. Raises ``AnnotationError`` naming ``source`` (e.g.
    ``"annotation equilibrium.io/exclude-inbound-ports"``).
    """
    ports: list[int] = []
    seen: set[int] = set()  # a set: a list's membership test made 42,000 ports take 8 s
    shown = value if len(value) <= 64 else value[:61] + "..."  # warnings stay readable
    if value.count(",") >= MAX_LISTED_PORTS:
        raise AnnotationError(f"{source}={shown!r}: more than {MAX_LISTED_PORTS} ports "
                              "(each is an iptables rule in every meshed pod)")
    for raw in value.split(","):
        item = raw.strip()
        if not item and not value.strip():
            continue
        port = ascii_uint(item, max_digits=5)
        if port is None or not 1 <= port <= 65535:
            raise AnnotationError(
                f"{source}={shown!r}: {item[:8]!r} is not a port (expected {expected})"
            )
        if port in seen:
            raise AnnotationError(f"{source}={shown!r}: port {item} is repeated")
        seen.add(port)
        ports.append(port)
    return tuple(ports)


def parse_strategy(value: str | None) -> str:
    """Validate ``equilibrium.io/strategy``; absent means ``balanced``."""
    if value is None:
        return DEFAULT_STRATEGY
    if value not in STRATEGY_PROFILES:
        raise AnnotationError(
            f"annotation {STRATEGY}={value!r} is not a strategy profile "
            f"(expected one of: {', '.join(STRATEGY_PROFILES)})"
        )
    return value


def parse_ipv6(value: str | None) -> Ipv6Mode:
    """Validate ``equilibrium.io/ipv6``; absent means ``auto``."""
    if value is None:
        return DEFAULT_IPV6
    for mode in IPV6_MODES:
        if value == mode:
            return mode
    raise AnnotationError(
        f"annotation {IPV6}={value!r} is not an IPv6 interception mode "
        f"(expected one of: {', '.join(IPV6_MODES)})"
    )


def parse_app_port(value: str) -> int:
    """Validate ``equilibrium.io/app-port``: one TCP port."""
    ports = parse_port_list(f"annotation {APP_PORT}", value,
                            expected="one integer 1-65535, e.g. \"8080\"")
    if len(ports) != 1:
        raise AnnotationError(f"annotation {APP_PORT}={value!r}: expected exactly one port")
    return ports[0]


def parse_long_paths(value: str | None) -> tuple[str, ...]:
    """Validate ``equilibrium.io/long-paths`` (wire.long_paths' comma form); absent: none.

    The pod's sidecar keeps these requests out of its app's concurrency limit (its
    ``--inbound-long-paths``); the same annotation on a Service tells the callers' sidecars
    (docs/kubernetes.md, "Annotations")."""
    if value is None:
        return ()
    try:
        return parse_long_path_list(value, f"annotation {LONG_PATHS}")
    except ValueError as exc:
        raise AnnotationError(str(exc)) from None
