"""Discovery's pure model: Kubernetes API objects in, the sidecar's routes out.

Owns the validation of Services and EndpointSlices (``parse_service``,
``parse_endpoint_slice``: a malformed object raises ``MalformedObject``, which the watch counts
and skips) and ``build_routes``, which turns the current objects into ``Routes``: one upstream
group per Service port (``NAME.NAMESPACE.PORT``) with its ready endpoints as URLs, the Host
aliases of each Service's primary port (``svc`` in the sidecar's own namespace, ``svc.ns``,
``svc.ns.svc``, ``svc.ns.svc.cluster.local`` and the cluster IP), the cluster IP:port -> group
map that transparent interception routes by, each port's protocol (``port_protocol``:
HTTP, opaque TCP, or unknown = sniffed), and each group's declared long requests (the
Service's ``equilibrium.io/long-paths`` annotation). No I/O: nothing here talks to the API server or
touches the routing table.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from wire.long_paths import ANNOTATION, parse_long_path_list
from wire.numerals import ascii_uint

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
DEFAULT_CLUSTER_DOMAIN = "cluster.local"
LONG_PATHS_ANNOTATION = ANNOTATION
"""A Service's declared long requests (comma-separated path prefixes, :mod:`wire.long_paths`):
its callers' sidecars learn nothing of a pod from how long they took (docs/routing.md,
"Long polls")."""


class MalformedObject(ValueError):
    """An API object that does not have the shape this module relies on."""



@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    port: int
    scheme: str  # http or https (from appProtocol or the port name)
    protocol: str = "unknown"  # http | opaque | unknown: how transparent interception treats it


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    namespace: str
    name: str
    cluster_ips: tuple[str, ...]  # empty for headless and ExternalName services
    ports: tuple[ServicePort, ...]  # TCP only
    long_paths: tuple[str, ...] = ()  # LONG_PATHS_ANNOTATION's prefixes
    bad_annotation: str = ""  # why LONG_PATHS_ANNOTATION was ignored ("": it was not)

    @property
    def primary(self) -> ServicePort | None:
        """The port Host-based routing (no port in the URL) uses: 80 if any, else the first."""
        return next((p for p in self.ports if p.port == 80), self.ports[0] if self.ports else None)


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    address: str
    ready: bool
    serving: bool


@dataclass(frozen=True, slots=True)
class EndpointSliceInfo:
    namespace: str
    name: str
    service: str
    ports: Mapping[str, int]  # port name ("" if unnamed) -> endpoint port, TCP only
    endpoints: tuple[SliceEndpoint, ...]


@dataclass(frozen=True, slots=True)
class Routes:
    """What discovery hands to the sidecar; every mapping is complete (not a delta)."""

    upstreams: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)  # Host name -> group name
    destinations: Mapping[tuple[str, int], str] = field(default_factory=dict)  # ip:port -> group
    protocols: Mapping[str, str] = field(default_factory=dict)  # group -> http|opaque|unknown
    # (Host name or cluster IP, port) -> group, for every port: `users:9090` -> users...9090
    authorities: Mapping[tuple[str, int], str] = field(default_factory=dict)
    # group -> its Service's declared long requests (LONG_PATHS_ANNOTATION), where it has any
    long_paths: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def object_key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping):
        raise MalformedObject("object has no metadata")
    name, namespace = meta.get("name"), meta.get("namespace")
    if not isinstance(name, str) or not name or not isinstance(namespace, str) or not namespace:
        raise MalformedObject("metadata.name and metadata.namespace must be non-empty strings")
    return namespace, name


def _port_number(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise MalformedObject(f"{what}: port {value!r} is not an integer in 1..65535")
    return value


def _ip(value: Any, what: str) -> str:
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise MalformedObject(f"{what}: {value!r} is not an IP address") from None


HTTP_APP_PROTOCOLS = frozenset({"http", "kubernetes.io/ws"})
# HTTP/2 ports: sniffed, so that prior-knowledge h2c (gRPC) is routed per call and TLS
# (grpcs, h2) passes through
H2_APP_PROTOCOLS = frozenset({"grpc", "h2c", "kubernetes.io/h2c", "http2"})
H2_NAME_PREFIXES = ("grpc", "h2c", "http2")
OPAQUE_NAME_PREFIXES = ("tcp", "tls", "https", "mongo", "mysql", "redis",
                        "postgres", "amqp", "kafka", "zookeeper")


def port_protocol(port: Mapping[str, Any]) -> str:
    """How intercepted connections to a Service port are handled (as Istio selects protocols).

    ``appProtocol`` decides when set (``http`` or ``kubernetes.io/ws``: HTTP/1.1, routed by the
    mesh policy; ``grpc``, ``h2c``, ``kubernetes.io/h2c``, ``http2``: ``unknown``, sniffed, so
    h2c is routed per stream and TLS passes through; anything else: opaque TCP). Otherwise the
    port name: ``http`` or ``http-*`` is HTTP; ``grpc*``, ``h2c*``, ``http2*`` are sniffed; a
    name starting with a known non-HTTP protocol (``tcp``, ``tls``, ``https``, ``redis``...)
    is opaque; any other or no name is ``unknown`` and is sniffed.
    """
    app_protocol = str(port.get("appProtocol") or "").strip().lower()
    if app_protocol:
        if app_protocol in H2_APP_PROTOCOLS:
            return "unknown"
        return "http" if app_protocol in HTTP_APP_PROTOCOLS else "opaque"
    name = str(port.get("name") or "").lower()
    if name == "http" or name.startswith("http-"):
        return "http"
    if name.startswith(H2_NAME_PREFIXES):
        return "unknown"
    if name.startswith(OPAQUE_NAME_PREFIXES):
        return "opaque"
    return "unknown"


def _scheme(port: Mapping[str, Any]) -> str:
    app_protocol = str(port.get("appProtocol") or "").lower()
    name = str(port.get("name") or "").lower()
    return "https" if app_protocol == "https" or name == "https" or name.startswith("https-") \
        else "http"


def _long_paths(obj: Mapping[str, Any]) -> tuple[tuple[str, ...], str]:
    """The Service's :data:`LONG_PATHS_ANNOTATION` prefixes, and why it was ignored ("": it
    was not). A bad annotation costs the declaration, never the Service's routes."""
    annotations = obj["metadata"].get("annotations") or {}
    raw = annotations.get(LONG_PATHS_ANNOTATION) if isinstance(annotations, Mapping) else None
    if raw is None:
        return (), ""
    if not isinstance(raw, str):
        return (), f"{LONG_PATHS_ANNOTATION}: not a string"
    try:
        return parse_long_path_list(raw, LONG_PATHS_ANNOTATION), ""
    except ValueError as exc:
        return (), str(exc)


def parse_service(obj: Mapping[str, Any]) -> ServiceInfo:
    namespace, name = object_key(obj)
    what = f"service {namespace}/{name}"
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise MalformedObject(f"{what}: no spec")
    if spec.get("type") == "ExternalName":  # a DNS alias: its traffic is not ours to route
        return ServiceInfo(namespace, name, (), ())
    raw_ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    if not isinstance(raw_ips, list):
        raise MalformedObject(f"{what}: spec.clusterIPs is not a list")
    ips = tuple(_ip(ip, what) for ip in raw_ips if ip not in ("None", ""))
    raw_ports = spec.get("ports") or []
    if not isinstance(raw_ports, list):
        raise MalformedObject(f"{what}: spec.ports is not a list")
    ports: list[ServicePort] = []
    for raw in raw_ports:
        if not isinstance(raw, Mapping):
            raise MalformedObject(f"{what}: a port is not an object")
        if str(raw.get("protocol") or "TCP") != "TCP":
            continue
        port_name = raw.get("name") or ""
        if not isinstance(port_name, str):
            raise MalformedObject(f"{what}: port name {port_name!r} is not a string")
        ports.append(ServicePort(port_name, _port_number(raw.get("port"), what), _scheme(raw),
                                 port_protocol(raw)))
    long_paths, bad = _long_paths(obj)
    return ServiceInfo(namespace, name, ips, tuple(ports), long_paths, bad)


def parse_endpoint_slice(obj: Mapping[str, Any]) -> EndpointSliceInfo | None:
    """The slice, or None for one that belongs to no Service or holds FQDN endpoints."""
    namespace, name = object_key(obj)
    what = f"endpointslice {namespace}/{name}"
    labels = obj["metadata"].get("labels") or {}
    if not isinstance(labels, Mapping):
        raise MalformedObject(f"{what}: metadata.labels is not an object")
    service = labels.get(SERVICE_NAME_LABEL)
    address_type = obj.get("addressType")
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        raise MalformedObject(f"{what}: addressType {address_type!r} is not IPv4, IPv6 or FQDN")
    if not isinstance(service, str) or not service or address_type == "FQDN":
        return None
    ports: dict[str, int] = {}
    raw_ports = obj.get("ports") or []
    if not isinstance(raw_ports, list):
        raise MalformedObject(f"{what}: ports is not a list")
    for raw in raw_ports:
        if not isinstance(raw, Mapping):
            raise MalformedObject(f"{what}: a port is not an object")
        if str(raw.get("protocol") or "TCP") != "TCP" or raw.get("port") is None:
            continue
        port_name = raw.get("name") or ""
        if not isinstance(port_name, str):
            raise MalformedObject(f"{what}: port name {port_name!r} is not a string")
        ports[port_name] = _port_number(raw.get("port"), what)
    raw_endpoints = obj.get("endpoints") or []
    if not isinstance(raw_endpoints, list):
        raise MalformedObject(f"{what}: endpoints is not a list")
    endpoints: list[SliceEndpoint] = []
    for raw in raw_endpoints:
        if not isinstance(raw, Mapping) or not isinstance(raw.get("addresses"), list):
            raise MalformedObject(f"{what}: an endpoint has no addresses list")
        conditions = raw.get("conditions") or {}
        if not isinstance(conditions, Mapping):
            raise MalformedObject(f"{what}: endpoint conditions is not an object")
        # Kubernetes: an unknown (absent) ready condition means ready; serving likewise.
        ready = conditions.get("ready") is not False
        serving = conditions.get("serving", ready) is not False
        # Every address of one endpoint is the same pod (fungible); the first suffices.
        if raw["addresses"]:
            endpoints.append(SliceEndpoint(_ip(raw["addresses"][0], what), ready, serving))
    return EndpointSliceInfo(namespace, name, service, ports, tuple(endpoints))


def split_authority(authority: str, default_port: int = 80) -> tuple[str, int]:
    """``Host`` header -> (lower-case host without brackets or trailing dot, port)."""
    text = authority.strip().lower()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        host, port_text = (text[1:end], text[end + 2:]) if end > 0 else (text, "")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    port = ascii_uint(port_text, max_digits=5)
    if port is not None and 0 < port < 65536:
        return host.rstrip("."), port
    return (host.rstrip("."), default_port) if not port_text else ("", 0)


def endpoint_url(scheme: str, address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{scheme}://{host}:{port}"


def group_name(service: ServiceInfo, port: ServicePort) -> str:
    """``NAME.NAMESPACE.PORT``: the same in every sidecar (so the signaler coordinates them),
    unambiguous (Service and namespace names have no dots) and a valid upstream name of the
    signaling protocol (no ``:``)."""
    return f"{service.name}.{service.namespace}.{port.port}"


def build_routes(
    services: Iterable[ServiceInfo],
    slices: Iterable[EndpointSliceInfo],
    *,
    own_namespace: str | None,
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN,
) -> Routes:
    """The complete routing view of the given objects (pure; order-independent output).

    Endpoints of a port: the ready ones of every slice of the Service that carries the port's
    name; when none is ready, those still serving while terminating (as kube-proxy does), so
    a rollout's last pods are not cut off early.
    """
    by_service: dict[tuple[str, str], list[EndpointSliceInfo]] = {}
    for info in slices:
        by_service.setdefault((info.namespace, info.service), []).append(info)
    upstreams: dict[str, tuple[str, ...]] = {}
    aliases: dict[str, str] = {}
    destinations: dict[tuple[str, int], str] = {}
    protocols: dict[str, str] = {}
    authorities: dict[tuple[str, int], str] = {}
    long_paths: dict[str, tuple[str, ...]] = {}
    for svc in sorted(services, key=lambda s: (s.namespace, s.name)):
        service_slices = by_service.get((svc.namespace, svc.name), [])
        for port in svc.ports:
            ready: list[str] = []
            serving: list[str] = []
            for info in service_slices:
                target = info.ports.get(port.name)
                if target is None:
                    continue
                for ep in info.endpoints:
                    url = endpoint_url(port.scheme, ep.address, target)
                    (ready if ep.ready else serving if ep.serving else []).append(url)
            group = group_name(svc, port)
            upstreams[group] = tuple(sorted(set(ready or serving)))
            protocols[group] = port.protocol
            if svc.long_paths:
                long_paths[group] = svc.long_paths
            for ip in svc.cluster_ips:
                destinations[(ip, port.port)] = group
        primary = svc.primary
        if primary is None:
            continue
        names = [f"{svc.name}.{svc.namespace}", f"{svc.name}.{svc.namespace}.svc",
                 f"{svc.name}.{svc.namespace}.svc.{cluster_domain}", *svc.cluster_ips]
        if svc.namespace == own_namespace:
            names.append(svc.name)
        for alias in names:
            aliases[alias.lower()] = group_name(svc, primary)
            for port in svc.ports:
                authorities[(alias.lower(), port.port)] = group_name(svc, port)
    return Routes(upstreams, aliases, destinations, protocols, authorities, long_paths)

