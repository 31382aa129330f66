"""The injector's core: an AdmissionReview v1 in, an AdmissionReview v1 response out.

Modelled on kopf's ``serve_admission_request``: a pure function over typed wire dicts, with
no HTTP, no clock and no Kubernetes API calls, so every decision is testable from a fixture.
``injector/server.py`` only parses the body and maps ``MalformedReview`` to HTTP 400.

Decisions, in order (each is counted by the server under ``Outcome``):

1. No request uid can be read → ``MalformedReview`` (HTTP 400: the API server cannot match
   any response to the call; with ``failurePolicy: Ignore`` it admits the pod unchanged).
2. A uid but a malformed review (wrong apiVersion/kind, not a Pod, missing object/spec) →
   ``allowed: true`` with a warning and no patch: the webhook fails open, in the spirit of
   ``failurePolicy: Ignore``, and never blocks a workload.
3. Not a CREATE, a pod already injected, a ``hostNetwork`` pod, or no injection asked for
   → allowed, no patch.
4. An annotation the injector cannot honour exactly (unknown strategy or IPv6 mode, bad port
   list, malformed long-request paths) → allowed **without injection**, with a warning naming
   the annotation and the accepted values: the pod runs as it would without the mesh rather
   than with settings nobody asked for.
5. Otherwise → allowed with a JSONPatch adding the init container, the sidecar and the
   ``equilibrium.io/status: injected`` annotation.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, NotRequired, TypedDict

from injector import config as names
from injector.config import AnnotationError, InjectorConfig
from injector.jsonpatch import PatchOperation, append_items, set_entries
from injector.podspec import (
    DEFAULT_GRACE_PERIOD,
    DRAIN_ROOM,
    EXIT_ROOM,
    PodMeshSettings,
    init_container,
    sidecar_container,
    stop_times,
)

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"
WARNING_PREFIX = "equilibrium-injector: "


# ---- wire format (the AdmissionReview v1 response; the request is untrusted JSON, read in decide)
class AdmissionResponse(TypedDict):
    uid: str
    allowed: bool
    patchType: NotRequired[Literal["JSONPatch"]]
    patch: NotRequired[str]  # base64 of the JSON Patch document
    warnings: NotRequired[list[str]]


class AdmissionReviewResponse(TypedDict):
    apiVersion: str
    kind: str
    response: AdmissionResponse


class Outcome(StrEnum):
    """Why a review ended the way it did (the ``result`` label of the server's metric); the
    last three are the server's answers to a body it could not review."""

    INJECTED = "injected"
    NOT_REQUESTED = "not_requested"
    OPTED_OUT = "opted_out"
    ALREADY_INJECTED = "already_injected"
    HOST_NETWORK = "host_network"
    NOT_CREATE = "not_create"
    INVALID_ANNOTATION = "invalid_annotation"
    MALFORMED = "malformed"  # a uid was readable: allowed + warning
    REJECTED = "rejected"  # no uid: MalformedReview / HTTP 400 (counted by the server)
    TOO_LARGE = "too_large"  # the body exceeded the size limit: HTTP 413 (the server's)
    ERROR = "error"  # a bug while reviewing: HTTP 500, the API server then Ignores


class MalformedReview(ValueError):
    """A body no AdmissionReview response can be built for (no readable ``request.uid``)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """The response to send and why."""

    response: AdmissionReviewResponse
    outcome: Outcome
    patch: tuple[PatchOperation, ...] = ()


def review(admission_review: Any, config: InjectorConfig, *,
           namespace_default: bool = False) -> AdmissionReviewResponse:
    """Answer one AdmissionReview (see the module docstring for the rules).

    ``namespace_default`` is True when the pod's namespace opted in as a whole (the webhook
    registered for ``equilibrium.io/injection=enabled`` namespaces calls ``/mutate/namespace``);
    then pods are injected unless annotated ``equilibrium.io/inject: "false"``. Raises
    ``MalformedReview`` when no uid can be read.
    """
    return decide(admission_review, config, namespace_default=namespace_default).response


def decide(admission_review: Any, config: InjectorConfig, *,
           namespace_default: bool = False) -> Verdict:
    """Like ``review`` but also returns the outcome and the patch operations."""
    uid = _read_uid(admission_review)
    if admission_review.get("apiVersion") != API_VERSION or admission_review.get("kind") != KIND:
        got = f"{admission_review.get('apiVersion')!r}/{admission_review.get('kind')!r}"
        return _allow(uid, Outcome.MALFORMED,
                      f"expected {API_VERSION}/{KIND}, got {got}; pod admitted unchanged")
    request = admission_review["request"]
    kind = request.get("kind")
    if not isinstance(kind, dict) or (kind.get("group"), kind.get("version"),
                                      kind.get("kind")) != ("", "v1", "Pod"):
        return _allow(uid, Outcome.MALFORMED,
                      f"request.kind {kind!r} is not core/v1 Pod; admitted unchanged")
    if request.get("operation") != "CREATE":
        return _allow(uid, Outcome.NOT_CREATE)
    pod = request.get("object")
    problem = _pod_shape_problem(pod)
    if problem:
        return _allow(uid, Outcome.MALFORMED, f"{problem}; pod admitted unchanged")
    assert isinstance(pod, dict)
    metadata = pod.get("metadata") or {}
    annotations: dict[str, str] = metadata.get("annotations") or {}
    spec: dict[str, Any] = pod["spec"]

    if _already_injected(annotations, spec):
        return _allow(uid, Outcome.ALREADY_INJECTED)
    asked = annotations.get(names.INJECT)
    if asked not in (None, "true", "false"):
        return _allow(uid, Outcome.INVALID_ANNOTATION,
                      f"annotation {names.INJECT}={asked!r} must be \"true\" or \"false\"; "
                      "pod not injected")
    if asked == "false":
        return _allow(uid, Outcome.OPTED_OUT)
    if asked is None and not namespace_default:
        return _allow(uid, Outcome.NOT_REQUESTED)
    if spec.get("hostNetwork") is True:
        return _allow(uid, Outcome.HOST_NETWORK,
                      "hostNetwork pods are never injected (the rules would apply to the node)")
    warnings: list[str] = []
    try:
        settings = _mesh_settings(annotations, spec, warnings, config)
    except AnnotationError as exc:
        return _allow(uid, Outcome.INVALID_ANNOTATION, f"{exc}; pod not injected")
    patch = build_patch(pod, config, settings)
    response: AdmissionResponse = {
        "uid": uid,
        "allowed": True,
        "patchType": "JSONPatch",
        "patch": base64.b64encode(json.dumps(patch).encode()).decode("ascii"),
    }
    if warnings:
        response["warnings"] = [WARNING_PREFIX + w for w in warnings]
    return Verdict(_wrap(response), Outcome.INJECTED, tuple(patch))


def build_patch(pod: dict[str, Any], config: InjectorConfig,
                settings: PodMeshSettings) -> list[PatchOperation]:
    """The JSON Patch that turns ``pod`` into an injected pod.

    The init container goes last among init containers (the app's own init containers keep a
    normal network); the sidecar goes first among containers, so that its postStart hook
    holds the app's start until it is ready (or, with ``native_sidecar``, right after the init
    container, as a native sidecar), and ``kubectl.kubernetes.io/default-container`` keeps
    ``kubectl logs`` and ``kubectl exec`` on the app.
    """
    spec = pod["spec"]
    metadata = pod.get("metadata") or {}
    ops: list[PatchOperation] = []
    if not isinstance(pod.get("metadata"), dict):
        ops.append({"op": "add", "path": "/metadata", "value": {}})
    sidecar = sidecar_container(config, settings)
    native = config.native_sidecar  # after the rules' init container: redirected too
    ops += append_items(spec, "initContainers",
                        [init_container(config, settings), *([sidecar] if native else [])],
                        ("spec",))
    if not native:  # first: the kubelet starts containers in order (sidecar.hooks)
        ops.append({"op": "add", "path": "/spec/containers/0", "value": sidecar})
    annotations = metadata.get("annotations") or {}
    new = {names.STATUS: names.STATUS_INJECTED}
    extra = {
        names.DEFAULT_CONTAINER: spec["containers"][0]["name"],
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(config.admin_port),
        "prometheus.io/path": "/metrics",
    }
    new.update({k: v for k, v in extra.items() if k not in annotations})
    ops += set_entries(metadata, "annotations", new, ("metadata",))
    return ops


# ---- helpers ----------------------------------------------------------------------------------
def _read_uid(body: Any) -> str:
    if not isinstance(body, dict):
        kind = type(body).__name__
        raise MalformedReview(f"body is a JSON {kind}, not an AdmissionReview object")
    request = body.get("request")
    if not isinstance(request, dict):
        raise MalformedReview("AdmissionReview has no 'request' object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise MalformedReview("AdmissionReview request has no 'uid' string")
    return uid


def _pod_shape_problem(pod: Any) -> str | None:
    if not isinstance(pod, dict):
        return "request.object is missing or not an object"
    metadata = pod.get("metadata", {})
    if metadata is not None and not isinstance(metadata, dict):
        return "pod metadata is not an object"
    annotations = (metadata or {}).get("annotations") or {}
    if not isinstance(annotations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
        return "pod annotations are not a map of strings"
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        return "pod has no spec"
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) for c in containers):
        return "pod spec.containers is missing, empty or has an unnamed container"
    init = spec.get("initContainers")
    if init is not None and not (isinstance(init, list)
                                 and all(isinstance(c, dict) for c in init)):
        return "pod spec.initContainers is not a list of objects"
    return None


def _already_injected(annotations: dict[str, str], spec: dict[str, Any]) -> bool:
    if annotations.get(names.STATUS) == names.STATUS_INJECTED:
        return True
    present = {c.get("name") for c in spec["containers"]}
    present |= {c.get("name") for c in spec.get("initContainers") or []}
    return names.SIDECAR_NAME in present or names.INIT_NAME in present


def _mesh_settings(annotations: dict[str, str], spec: dict[str, Any],
                   warnings: list[str], config: InjectorConfig) -> PodMeshSettings:
    strategy = names.parse_strategy(annotations.get(names.STRATEGY))
    ipv6 = names.parse_ipv6(annotations.get(names.IPV6))
    long_paths = names.parse_long_paths(annotations.get(names.LONG_PATHS))
    outbound = names.parse_port_list(f"annotation {names.EXCLUDE_OUTBOUND_PORTS}",
                                     annotations.get(names.EXCLUDE_OUTBOUND_PORTS, ""))
    inbound = names.parse_port_list(f"annotation {names.EXCLUDE_INBOUND_PORTS}",
                                    annotations.get(names.EXCLUDE_INBOUND_PORTS, ""))
    declared = _declared_tcp_ports(spec)
    if names.APP_PORT in annotations:
        app_port = names.parse_app_port(annotations[names.APP_PORT])
    elif declared:
        app_port = declared[0]
    else:
        app_port = names.DEFAULT_APP_PORT
        warnings.append(f"no containerPort declared; inbound traffic goes to port {app_port} "
                        f"(set {names.APP_PORT} to change it)")
    reserved = {names.OUTBOUND_PORT, names.INBOUND_PORT, names.ADMIN_PORT}
    if app_port in reserved:
        raise AnnotationError(f"app port {app_port} collides with the sidecar's ports "
                              f"{sorted(reserved)}")
    bound = _declared_tcp_ports(spec, sidecars=True)  # the app's and its native sidecars'
    taken = sorted(reserved.intersection(bound))
    if taken:  # the app and the sidecar share the network namespace: one could not bind
        raise AnnotationError(f"container port {taken[0]} collides with the sidecar's ports "
                              f"{sorted(reserved)}")
    if app_port in inbound:
        raise AnnotationError(f"annotation {names.EXCLUDE_INBOUND_PORTS} excludes the app port "
                              f"{app_port}, which the sidecar must receive")
    _check_runs_apart(spec)
    # Other declared ports (metrics, admin, gRPC...) bypass the sidecar: it forwards to one port.
    excluded = set(inbound)
    others = tuple(p for p in bound if p != app_port and p not in excluded)
    discovery = spec.get("automountServiceAccountToken") is not False
    if not discovery:
        warnings.append("automountServiceAccountToken is false: the sidecar cannot watch "
                        "EndpointSlices; Service IPs are passed through unbalanced")
    app_stop, unknown = _app_prestop_seconds(spec)
    ordered_by_hooks = not config.native_sidecar and config.shutdown_delay > 0
    for name in unknown if ordered_by_hooks else ():
        warnings.append(f"container {name[:64]!r} has a preStop hook the injector cannot time: "
                        "the sidecar stops accepting once its own delay is over, maybe before "
                        "that hook ends (raise the injector's --shutdown-delay, or use "
                        "--native-sidecar)")
    grace = spec.get("terminationGracePeriodSeconds")
    if isinstance(grace, bool) or not isinstance(grace, int | float) or grace < 0:
        grace = DEFAULT_GRACE_PERIOD  # absent (the default), or not what the API server sends
    settings = PodMeshSettings(strategy=strategy, app_port=app_port,
                               exclude_outbound_ports=outbound,
                               exclude_inbound_ports=inbound + others, discovery=discovery,
                               ipv6=ipv6, app_prestop_seconds=app_stop,
                               grace_seconds=float(grace), long_paths=long_paths)
    stop = stop_times(config, settings)
    if stop.delay < stop.wanted:
        warnings.append(
            f"terminationGracePeriodSeconds {grace:g} is too short for the sidecar to outlast "
            f"the app's stop ({app_stop:g} s of its own preStop wait, then "
            f"{config.shutdown_delay:g} s): its delay is cut to {stop.delay:g} s and its "
            f"drain to {stop.drain:g} s; raise terminationGracePeriodSeconds to at least "
            f"{stop.wanted + DRAIN_ROOM + EXIT_ROOM:g}")
    return settings


_SLEEPS = frozenset({"sleep", "/bin/sleep", "/usr/bin/sleep"})
_SHELLS = frozenset({"sh", "/bin/sh", "bash", "/bin/bash", "/usr/bin/bash"})


def _app_prestop_seconds(spec: dict[str, Any]) -> tuple[float, list[str]]:
    """The longest preStop hook of the app's containers when each is a plain wait (the
    ``sleep`` action, ``sleep N``, ``sh -c "sleep N"``), and the names of the containers
    whose hook is anything else. The kubelet runs every container's preStop hook at once
    and sends each container SIGTERM after its own: the sidecar's delay must outlast the
    app's hook for the app's last calls to find it serving."""
    longest, unknown = 0.0, []
    for container in spec["containers"]:
        lifecycle = container.get("lifecycle")
        hook = lifecycle.get("preStop") if isinstance(lifecycle, dict) else None
        if not isinstance(hook, dict):
            continue
        seconds = _waits(hook)
        if seconds is None:
            unknown.append(str(container.get("name")))
        else:
            longest = max(longest, seconds)
    return longest, unknown


def _waits(hook: dict[str, Any]) -> float | None:
    """How long a preStop hook waits, if all it does is wait (None otherwise)."""
    sleep = hook.get("sleep")
    if isinstance(sleep, dict) and set(hook) == {"sleep"}:
        return _seconds(sleep.get("seconds"))
    command = hook.get("exec", {}).get("command") if isinstance(hook.get("exec"), dict) \
        else None
    if not isinstance(command, list) or set(hook) != {"exec"}:
        return None
    if not all(isinstance(word, str) for word in command):  # not what the API server sends
        return None
    if len(command) == 2 and command[0] in _SLEEPS:
        return _seconds(command[1])
    if len(command) == 3 and command[0] in _SHELLS and command[1] == "-c":
        words = command[2].split()
        if len(words) == 2 and words[0] == "sleep":
            return _seconds(words[1])
    return None


def _seconds(value: Any) -> float | None:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if 0 <= seconds <= names.MAX_SHUTDOWN_DELAY else None


def _native_sidecars(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod's own native sidecars: init containers with ``restartPolicy: Always``, which
    keep running beside the app, in its network namespace, once the rules exist."""
    return [c for c in spec.get("initContainers") or []
            if isinstance(c, dict) and c.get("restartPolicy") == "Always"]


def _declared_tcp_ports(spec: dict[str, Any], *, sidecars: bool = False) -> list[int]:
    """The TCP ports the app's containers declare, in order (``sidecars``: then those of the
    pod's native sidecars, which bind in the same network namespace)."""
    ports: dict[int, None] = {}  # in order, each once (a dict: linear in the ports declared)
    containers = [*spec["containers"], *(_native_sidecars(spec) if sidecars else [])]
    for container in containers:
        declared = container.get("ports")
        for port in declared if isinstance(declared, list) else []:
            number = port.get("containerPort") if isinstance(port, dict) else None
            if isinstance(number, int) and port.get("protocol", "TCP") == "TCP":
                ports.setdefault(number, None)
    return list(ports)


def _check_runs_apart(spec: dict[str, Any]) -> None:
    """The app must not run as the sidecar's UID or GID (the rules let that traffic through
    unredirected: it would be marked injected and never meshed), and must be a Linux pod (the
    init container's rules are iptables)."""
    os_spec = spec.get("os")
    if isinstance(os_spec, dict) and os_spec.get("name") not in (None, "linux"):
        raise AnnotationError(f"spec.os.name is {str(os_spec.get('name'))[:16]!r}: only Linux "
                              "pods are meshed")
    contexts = [("the pod", spec.get("securityContext"))]
    contexts += [(f"container {str(c.get('name'))[:64]!r}", c.get("securityContext"))
                 for c in [*spec["containers"], *_native_sidecars(spec)]
                 if isinstance(c, dict)]  # the app's other init containers run before the
    # rules exist, and end: their id does not matter; a native sidecar runs on beside the app
    for who, context in contexts:
        if not isinstance(context, dict):
            continue
        for key in ("runAsUser", "runAsGroup"):
            if context.get(key) == names.SIDECAR_UID:
                raise AnnotationError(
                    f"{who} sets {key}: {names.SIDECAR_UID}, the sidecar's own id, whose "
                    "traffic is never redirected: it would bypass the mesh")


def _allow(uid: str, outcome: Outcome, warning: str | None = None) -> Verdict:
    response: AdmissionResponse = {"uid": uid, "allowed": True}
    if warning:
        response["warnings"] = [WARNING_PREFIX + warning]
    return Verdict(_wrap(response), outcome)


def _wrap(response: AdmissionResponse) -> AdmissionReviewResponse:
    return {"apiVersion": API_VERSION, "kind": KIND, "response": response}
