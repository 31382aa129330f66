"""Kubernetes endpoint discovery: Services and EndpointSlices watched through the API server.

Owns three things, from the wire to the routing table:

1. The pure model. ``parse_service`` and ``parse_endpoint_slice`` validate API objects
   (a malformed one raises ``MalformedObject``, is counted and skipped); ``build_routes``
   turns the current objects into ``Routes``: one upstream group per Service port
   (``NAME.NAMESPACE.PORT``) with its ready endpoints as URLs, the Host aliases of each
   Service's primary port (``svc`` in the sidecar's own namespace, ``svc.ns``, ``svc.ns.svc``,
   ``svc.ns.svc.cluster.local`` and the cluster IP), the cluster IP:port -> group map that
   transparent interception routes by, and each port's protocol (``port_protocol``: HTTP,
   opaque TCP, or unknown = sniffed).
2. ``ResourceWatch``: list (paginated) + watch from the list's ``resourceVersion``, with
   bookmarks; a watch that ends is resumed from the last version seen; ``410 Gone`` (as HTTP
   status or as a watch ``ERROR`` event) relists; any other failure reconnects after an
   exponential, jittered backoff. Only aiohttp is used, no Kubernetes client library.
3. ``Discovery``: the watches (Services and EndpointSlices, per watched namespace, or
   cluster-wide) plus the application of ``Routes`` to the sidecar's
   ``UpstreamTable`` (``apply(..., source="discovery")``, which calls ``policy.set_endpoints``
   and so keeps the learned state of endpoints that stay; requests in flight hold their group
   and are never dropped). Bursts of events are coalesced into one application.

Credentials: in a pod, the service account's token, CA and namespace under
``/var/run/secrets/kubernetes.io/serviceaccount`` and ``KUBERNETES_SERVICE_HOST``/``_PORT``;
for tests, an explicit API URL and token file. The token file is re-read at every request,
since the kubelet rotates bound tokens. The RBAC this needs: get, list and watch on
``services`` and ``discovery.k8s.io/endpointslices`` -- a RoleBinding in each watched
namespace (by default only the pod's own), or a ClusterRoleBinding for cluster-wide.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
DEFAULT_CLUSTER_DOMAIN = "cluster.local"
WATCH_TIMEOUT_S = 300  # the server ends a watch after this; we resume from the last version
LIST_PAGE_SIZE = 500
MAX_LINE_BYTES = 16 * 1024 * 1024  # one watch event; the API server's own limit is ~3 MiB
APPLY_SETTLE_S = 0.02  # coalesce a burst of events into one table update
MIN_WATCH_S = 1.0  # a watch that ends sooner without any event counts as a failure


class MalformedObject(ValueError):
    """An API object that does not have the shape this module relies on."""


class ApiError(RuntimeError):
    """The API server answered with an error other than 410 Gone."""


class Gone(ApiError):
    """410 Gone: the resource version is too old; relist."""


# ---------------------------------------------------------------- the pure model


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
OPAQUE_NAME_PREFIXES = ("tcp", "tls", "https", "http2", "grpc", "h2c", "mongo", "mysql", "redis",
                        "postgres", "amqp", "kafka", "zookeeper")


def port_protocol(port: Mapping[str, Any]) -> str:
    """How intercepted connections to a Service port are handled (as Istio selects protocols).

    ``appProtocol`` decides when set (``http`` or ``kubernetes.io/ws``: HTTP/1.1, routed by the
    mesh policy; anything else: opaque TCP). Otherwise the port name: ``http`` or ``http-*``
    is HTTP; a name starting with a known non-HTTP/1.1 protocol (``tcp``, ``tls``, ``https``,
    ``grpc``, ``redis``...) is opaque; any other or no name is ``unknown`` and is sniffed.
    """
    app_protocol = str(port.get("appProtocol") or "").strip().lower()
    if app_protocol:
        return "http" if app_protocol in HTTP_APP_PROTOCOLS else "opaque"
    name = str(port.get("name") or "").lower()
    if name == "http" or name.startswith("http-"):
        return "http"
    if name.startswith(OPAQUE_NAME_PREFIXES):
        return "opaque"
    return "unknown"


def _scheme(port: Mapping[str, Any]) -> str:
    app_protocol = str(port.get("appProtocol") or "").lower()
    name = str(port.get("name") or "").lower()
    return "https" if app_protocol == "https" or name == "https" or name.startswith("https-") \
        else "http"


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
    return ServiceInfo(namespace, name, ips, tuple(ports))


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
    if port_text.isdigit() and 0 < int(port_text) < 65536:
        return host.rstrip("."), int(port_text)
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
    return Routes(upstreams, aliases, destinations, protocols, authorities)


# ---------------------------------------------------------------- the API client


@dataclass(frozen=True, slots=True)
class KubeCredentials:
    """Where the API server is and how to authenticate to it."""

    api_url: str
    token_file: Path | None
    ca_file: Path | None = None
    namespace: str | None = None  # the pod's own namespace (short Host names resolve here)

    @classmethod
    def in_cluster(
        cls, env: Mapping[str, str], account_dir: Path = SERVICE_ACCOUNT_DIR
    ) -> KubeCredentials:
        host = env.get("KUBERNETES_SERVICE_HOST", "").strip()
        port = env.get("KUBERNETES_SERVICE_PORT", "").strip() or "443"
        if not host:
            raise ValueError(
                "not in a cluster: KUBERNETES_SERVICE_HOST is unset (give --kube-api URL)"
            )
        if ":" in host:
            host = f"[{host}]"
        return cls(
            api_url=f"https://{host}:{port}",
            token_file=account_dir / "token",
            ca_file=account_dir / "ca.crt",
            namespace=read_namespace(env, account_dir),
        )


def read_namespace(env: Mapping[str, str], account_dir: Path = SERVICE_ACCOUNT_DIR) -> str | None:
    """The pod's namespace: ``POD_NAMESPACE`` (downward API) or the service account's file."""
    if env.get("POD_NAMESPACE", "").strip():
        return env["POD_NAMESPACE"].strip()
    try:
        return (account_dir / "namespace").read_text().strip() or None
    except OSError:
        return None


class KubeClient:
    """A minimal list/watch client over one aiohttp session."""

    def __init__(self, credentials: KubeCredentials) -> None:
        self.credentials = credentials
        self.api_url = credentials.api_url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> KubeClient:
        ssl_context: ssl.SSLContext | bool = True
        if self.credentials.ca_file is not None and self.api_url.startswith("https:"):
            ssl_context = ssl.create_default_context(cafile=str(self.credentials.ca_file))
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl_context, limit=4),
            trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None, connect=5.0, sock_connect=5.0),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.credentials.token_file is not None:
            try:
                token = self.credentials.token_file.read_text().strip()
            except OSError as exc:
                raise ApiError(f"cannot read token {self.credentials.token_file}: {exc}") from None
            headers["Authorization"] = f"Bearer {token}"
        return headers

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("KubeClient used outside `async with`")
        return self._session

    async def list(self, path: str) -> tuple[list[Any], str]:
        """Every item of a collection (following ``continue``) and the list's resourceVersion."""
        items: list[Any] = []
        token = ""
        while True:
            params = {"limit": str(LIST_PAGE_SIZE)}
            if token:
                params["continue"] = token
            async with self.session.get(
                self.api_url + path, params=params, headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=30.0),
            ) as resp:
                await _raise_for_status(resp, f"list {path}")
                try:
                    body = await resp.json(content_type=None)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise MalformedObject(f"list {path}: the answer is not JSON: {exc}") from None
            if not isinstance(body, dict) or not isinstance(body.get("items"), list | None):
                raise MalformedObject(f"list {path}: the answer is not a list object")
            items.extend(body.get("items") or [])
            meta = body.get("metadata") or {}
            token = str(meta.get("continue") or "")
            if not token:
                version = str(meta.get("resourceVersion") or "")
                if not version:
                    raise MalformedObject(f"list {path}: no metadata.resourceVersion")
                return items, version

    @contextlib.asynccontextmanager
    async def watch(self, path: str, version: str) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """A watch stream from ``version``: yields decoded events until the server ends it."""
        params = {
            "watch": "1", "resourceVersion": version, "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_TIMEOUT_S),
        }
        async with self.session.get(
            self.api_url + path, params=params, headers=self._headers(),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=WATCH_TIMEOUT_S + 30),
        ) as resp:
            await _raise_for_status(resp, f"watch {path}")
            yield _events(resp)


async def _raise_for_status(resp: aiohttp.ClientResponse, what: str) -> None:
    if resp.status == 200:
        return
    try:
        detail = (await resp.text())[:300]
    except (aiohttp.ClientError, UnicodeDecodeError):
        detail = ""
    if resp.status == 410:
        raise Gone(f"{what}: 410 Gone")
    hint = " (check the service account's RBAC)" if resp.status in (401, 403) else ""
    raise ApiError(f"{what}: HTTP {resp.status}{hint}: {detail}")


async def _events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """Newline-delimited JSON events, each bounded by ``MAX_LINE_BYTES``."""
    buffer = b""
    async for chunk in resp.content.iter_any():
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield _decode_event(line)
        if len(buffer) > MAX_LINE_BYTES:
            raise MalformedObject(f"a watch event exceeds {MAX_LINE_BYTES} bytes")
    if buffer.strip():
        yield _decode_event(buffer)


def _decode_event(line: bytes) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedObject(f"a watch event is not JSON: {exc}") from None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str) \
            or not isinstance(event.get("object"), dict):
        raise MalformedObject("a watch event lacks type or object")
    return event


# ---------------------------------------------------------------- list + watch


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with "equal jitter" (AWS Architecture Blog, "Exponential Backoff
    And Jitter", 2015): the n-th wait is uniform in [c/2, c], c = min(cap, base * 2**n), so
    reconnecting sidecars spread out but never hammer the API server with zero waits."""

    rng: random.Random
    base: float = 0.2
    cap: float = 30.0
    attempts: int = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.base * 2 ** min(self.attempts, 30))
        self.attempts += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempts = 0


class DiscoveryMetrics:
    """Discovery's counters, in the sidecar's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "equilibrium_discovery_events", "Watch events received, by resource and type",
            ["resource", "type"], registry=registry,
        )
        self.relists = Counter(
            "equilibrium_discovery_relists",
            "Full lists of a resource, by reason (start, gone = 410, error = after a failure)",
            ["resource", "reason"], registry=registry,
        )
        self.errors = Counter(
            "equilibrium_discovery_errors",
            "List/watch failures that led to a reconnect, by resource and kind",
            ["resource", "kind"], registry=registry,
        )
        self.rejected = Counter(
            "equilibrium_discovery_rejected_objects",
            "API objects skipped because they were malformed", ["resource"], registry=registry,
        )
        self.applied = Counter(
            "equilibrium_discovery_updates", "Routing table updates applied from discovery",
            registry=registry,
        )
        self.services = Gauge(
            "equilibrium_discovery_services", "Services currently known", registry=registry,
        )
        self.synced = Gauge(
            "equilibrium_discovery_synced", "1 once the first list of a resource was applied",
            ["resource"], registry=registry,
        )


class ResourceWatch:
    """Keeps ``store`` equal to one API collection: list, then watch, forever."""

    def __init__(
        self,
        client: KubeClient,
        resource: str,
        path: str,
        parse: Callable[[Mapping[str, Any]], Any],
        on_change: Callable[[], None],
        metrics: DiscoveryMetrics,
        rng: random.Random,
    ) -> None:
        self.client = client
        self.resource = resource
        self.path = path
        self.parse = parse
        self.on_change = on_change
        self.metrics = metrics
        self.store: dict[tuple[str, str], Any] = {}
        self.synced = False
        self.backoff = Backoff(rng)
        self._version: str | None = None

    async def run(self) -> None:
        reason = "start"
        while True:
            try:
                if self._version is None:
                    await self._relist(reason)
                started = asyncio.get_running_loop().time()
                events = await self._watch_once()
                reason = "start"
                if events or asyncio.get_running_loop().time() - started >= MIN_WATCH_S:
                    self.backoff.reset()  # a watch that ran its course: resume at once
                else:  # ended at once with nothing: back off rather than spin on the server
                    self.metrics.errors.labels(self.resource, "EmptyWatch").inc()
                    await asyncio.sleep(self.backoff.next())
            except Gone:
                log.info("%s: resource version too old (410), relisting", self.resource)
                self._version, reason = None, "gone"
            except Exception as exc:  # a watch must outlive any one failure
                kind = type(exc).__name__
                if not isinstance(exc, aiohttp.ClientError | TimeoutError | OSError | ApiError
                                  | MalformedObject):
                    log.exception("%s: unexpected failure", self.resource)
                self.metrics.errors.labels(self.resource, kind).inc()
                delay = self.backoff.next()
                log.warning("%s: %s: %s; retrying in %.1fs", self.resource, kind, exc, delay)
                if isinstance(exc, MalformedObject):
                    self._version = None  # a stream we could not follow: start from a list
                reason = "error"
                await asyncio.sleep(delay)

    async def _relist(self, reason: str) -> None:
        items, version = await self.client.list(self.path)
        store: dict[tuple[str, str], Any] = {}
        for item in items:
            valid, parsed = self._parse(item)
            if valid and parsed is not None:
                store[object_key(item)] = parsed
        self.store, self._version = store, version
        self.metrics.relists.labels(self.resource, reason).inc()
        self.synced = True
        self.metrics.synced.labels(self.resource).set(1)
        self.backoff.reset()
        self.on_change()

    def _parse(self, obj: Mapping[str, Any]) -> tuple[bool, Any]:
        """(valid, parsed); parsed is None for a valid object that routes nothing."""
        try:
            object_key(obj)
            return True, self.parse(obj)
        except (MalformedObject, KeyError, TypeError, AttributeError) as exc:
            self.metrics.rejected.labels(self.resource).inc()
            log.warning("%s: skipped a malformed object: %s", self.resource, exc)
            return False, None

    async def _watch_once(self) -> int:
        """Follow one watch stream to its end; returns how many events it carried."""
        assert self._version is not None
        count = 0
        async with self.client.watch(self.path, self._version) as events:
            async for event in events:
                count += 1
                kind, obj = event["type"], event["object"]
                self.metrics.events.labels(self.resource, kind).inc()
                if kind == "ERROR":
                    code = obj.get("code")
                    if code == 410:
                        raise Gone(f"watch {self.path}: {obj.get('message', '410 Gone')}")
                    raise ApiError(f"watch {self.path}: error event {code}: {obj.get('message')}")
                version = (obj.get("metadata") or {}).get("resourceVersion")
                if kind == "BOOKMARK":
                    self._version = str(version) if version else self._version
                    continue
                if kind not in ("ADDED", "MODIFIED", "DELETED"):
                    self.metrics.rejected.labels(self.resource).inc()
                    continue
                valid, parsed = (True, None) if kind == "DELETED" else self._parse(obj)
                if valid:  # a malformed update keeps the last good version of the object
                    key = object_key(obj)
                    if parsed is not None:
                        self.store[key] = parsed
                        self.on_change()
                    elif self.store.pop(key, None) is not None:  # deleted, or no longer routable
                        self.on_change()
                if version:
                    self._version = str(version)
        return count


# ---------------------------------------------------------------- discovery as a whole


def collection_path(resource: str, namespace: str | None) -> str:
    """The API path of a collection, cluster-wide (``namespace`` None) or in one namespace."""
    group = "/api/v1" if resource == "services" else "/apis/discovery.k8s.io/v1"
    scope = f"/namespaces/{namespace}" if namespace else ""
    return f"{group}{scope}/{resource}"


class Discovery:
    """Services + EndpointSlices -> the sidecar's upstream table, aliases and destinations.

    ``namespaces``: the namespaces to watch (one list+watch per namespace and resource, which
    a RoleBinding in each suffices for), or None for the whole cluster (needs a
    ClusterRoleBinding).
    """

    def __init__(
        self,
        credentials: KubeCredentials,
        table: Any,
        *,
        registry: CollectorRegistry,
        namespaces: tuple[str, ...] | None = None,
        on_removed: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        cluster_domain: str = DEFAULT_CLUSTER_DOMAIN,
    ) -> None:
        self.credentials = credentials
        self.table = table
        self.namespaces = namespaces
        self.on_removed = on_removed  # e.g. drop a removed group's metric labels
        self.clock = clock
        self.rng = rng or random.Random()
        self.cluster_domain = cluster_domain
        self.metrics = DiscoveryMetrics(registry)
        self.routes = Routes()
        self._dirty = asyncio.Event()
        self.watches: list[ResourceWatch] = []

    def destination(self, host: str, port: int) -> str | None:
        """The upstream group a connection to ``host:port`` (a cluster IP) belongs to."""
        return self.routes.destinations.get((host, port))

    def route(self, host: str, port: int) -> tuple[str, str] | None:
        """(group, protocol) of a connection to ``host:port``, or None if it is no Service."""
        group = self.routes.destinations.get((host, port))
        return (group, self.routes.protocols.get(group, "unknown")) if group else None

    def upstream_for_authority(self, authority: str) -> str | None:
        """The group a request's ``Host`` (or absolute-form authority) names, port included:
        ``users:9090`` is the Service port 9090 (no port: 80). None if it names none."""
        host, port = split_authority(authority)
        return self.routes.authorities.get((host, port)) if host else None

    @property
    def synced(self) -> bool:
        """Every watch has listed once (before that, half a picture would drop groups)."""
        return bool(self.watches) and all(w.synced for w in self.watches)

    def _changed(self) -> None:
        self._dirty.set()

    async def run(self) -> None:
        async with KubeClient(self.credentials) as client:
            parsers = {"services": parse_service, "endpointslices": parse_endpoint_slice}
            self.watches = [
                ResourceWatch(client, resource, collection_path(resource, namespace), parse,
                              self._changed, self.metrics, self.rng)
                for namespace in (self.namespaces or (None,))
                for resource, parse in parsers.items()
            ]
            tasks = [asyncio.create_task(w.run(), name=f"discovery {w.path}")
                     for w in self.watches]
            tasks.append(asyncio.create_task(self._apply_loop(), name="discovery-apply"))
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    task.result()  # a bug in a watch surfaces instead of silently stopping
            finally:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def _apply_loop(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(APPLY_SETTLE_S)
            self._dirty.clear()
            if self.synced:
                self.apply()

    def reapply(self, _config: object = None) -> None:
        """Apply again once synced (a reload hook: config may have released a name)."""
        if self.synced:
            self.apply()

    def apply(self) -> Routes:
        """Rebuild the routes from the stores and swap them into the table (synchronous)."""
        services = [v for w in self.watches if w.resource == "services"
                    for v in w.store.values()]
        slices = [v for w in self.watches if w.resource == "endpointslices"
                  for v in w.store.values()]
        routes = build_routes(
            services, slices,
            own_namespace=self.credentials.namespace,
            cluster_domain=self.cluster_domain,
        )
        _, removed = self.table.apply(routes.upstreams, self.clock(), source="discovery")
        self.table.set_aliases(routes.aliases)
        if self.on_removed is not None:
            for name in sorted(removed):
                self.on_removed(name)
        self.routes = routes
        self.metrics.applied.inc()
        self.metrics.services.set(len(services))
        return routes


def credentials_from_flags(
    kube_api: str | None, token_file: str | None, env: Mapping[str, str] | None = None
) -> KubeCredentials:
    """``--kube-api``/``--kube-token-file`` if given, else the in-cluster service account."""
    environ = os.environ if env is None else env
    if kube_api:
        if not kube_api.startswith(("http://", "https://")):
            raise ValueError(f"--kube-api: expected an http(s):// URL, got {kube_api!r}")
        ca = SERVICE_ACCOUNT_DIR / "ca.crt"
        return KubeCredentials(
            api_url=kube_api,
            token_file=Path(token_file) if token_file else None,
            ca_file=ca if kube_api.startswith("https:") and ca.exists() else None,
            namespace=read_namespace(environ),
        )
    credentials = KubeCredentials.in_cluster(environ)
    if token_file:
        credentials = KubeCredentials(
            credentials.api_url, Path(token_file), credentials.ca_file, credentials.namespace
        )
    return credentials
