"""A small Kubernetes API server for tests: list + watch, and the writes of the controller.

No cluster can run on these machines, so this stands in for the *external* API server (it is
not a mock of our code): it speaks the wire format the real one does for the two collections
discovery reads -- Services (``/api/v1``) and EndpointSlices (``/apis/discovery.k8s.io/v1``),
cluster-wide or per namespace (``.../namespaces/NS/...``) -- with ``limit``/``continue``
paging, a list ``resourceVersion``, and ``?watch=1`` streams of newline-delimited
``{"type", "object"}`` events from a resource version, ``BOOKMARK`` events,
``timeoutSeconds``, and an ``ERROR`` event with a 410 ``Status`` when the version was
compacted away. Requests without the bearer token get 401; with ``allowed_namespaces`` set
(RoleBindings only), a request outside them gets 403. Tests can change objects, compact
history, cut open watches and inject raw bytes into them.

For the install controller (``injector.controller``) it also serves Namespaces and Pods
(cluster-wide list + watch; with ``Accept: ...;as=PartialObjectMetadata...`` the metadata only,
as ``PartialObjectMetadata(List)``), Secrets and RoleBindings (``GET``/``PUT`` by name,
``POST`` to the namespace's collection: 201, 409 ``AlreadyExists``, 409 ``Conflict`` on a stale
``resourceVersion``, 404 ``NotFound``), a namespace's Secrets as a collection (list + watch,
with ``fieldSelector=metadata.name=NAME``, the only field selector served: what the
controller's Role allows), and MutatingWebhookConfigurations (``GET``, and
``PATCH`` with ``application/json-patch+json``). Every request is recorded as (resource, verb,
params) with the verbs ``list``, ``watch``, ``get``, ``create``, ``update``, ``patch``.

Bind it to any socket (``start(sock=...)`` serves one made inside a network namespace).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import functools
import json
import socket
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.injector_support import apply_patch

# API group prefix -> (resource, apiVersion, list kind, kind); served cluster-wide at
# PREFIX/RESOURCE and per namespace at PREFIX/namespaces/NS/RESOURCE.
RESOURCES = {
    "/api/v1": ("services", "v1", "ServiceList", "Service"),
    "/apis/discovery.k8s.io/v1": (
        "endpointslices", "discovery.k8s.io/v1", "EndpointSliceList", "EndpointSlice",
    ),
}


def service(name: str, namespace: str, cluster_ip: str | None,
            ports: list[tuple[str, int]]) -> dict[str, Any]:
    """A Service object; ``ports`` are (name, port) pairs, TCP."""
    return {
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip or "None",
            "clusterIPs": [cluster_ip] if cluster_ip else ["None"],
            "ports": [{"name": n, "port": p, "protocol": "TCP", "targetPort": p}
                      for n, p in ports],
        },
    }


def endpoint_slice(name: str, namespace: str, service_name: str, ports: list[tuple[str, int]],
                   addresses: list[str], not_ready: tuple[str, ...] = ()) -> dict[str, Any]:
    """An IPv4 EndpointSlice of ``service_name``; ``not_ready`` addresses are terminating."""
    return {
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": [a], "conditions": {"ready": a not in not_ready,
                                              "serving": True,
                                              "terminating": a in not_ready}}
            for a in addresses
        ],
        "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
    }

NAMESPACES = "namespaces"  # the cluster-scoped /api/v1/namespaces collection
PODS = "pods"  # /api/v1/pods: every namespace's pods (list + watch), full or metadata only
SECRETS = "secrets"  # /api/v1/namespaces/NS/secrets: list + watch (the controller's by name)
CLUSTER_LISTS = {NAMESPACES: ("namespaces", "v1", "NamespaceList", "Namespace"),
                 PODS: ("pods", "v1", "PodList", "Pod"),
                 SECRETS: ("secrets", "v1", "SecretList", "Secret")}
# Objects read and written by name: API group prefix -> (resource, apiVersion, kind).
OBJECTS = {
    "/api/v1": ("secrets", "v1", "Secret"),
    "/apis/rbac.authorization.k8s.io/v1": (
        "rolebindings", "rbac.authorization.k8s.io/v1", "RoleBinding"),
    "/apis/admissionregistration.k8s.io/v1": (
        "mutatingwebhookconfigurations", "admissionregistration.k8s.io/v1",
        "MutatingWebhookConfiguration"),
}
NAMESPACED = {"secrets", "rolebindings"}


def pod(name: str, namespace: str, annotations: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "annotations": annotations},
            "spec": {"containers": [{"name": "app", "image": "app:1",
                                     "env": [{"name": "PASSWORD", "value": "in-the-spec"}]}]}}


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name,
                                                  **(labels or {})}},
            "status": {"phase": "Active"}}


@dataclass
class Collection:
    objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    history: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    oldest: int = 0  # watches from a version below this get 410


@dataclass
class KubeApiServer:
    token: str = "test-token"
    version: int = 100
    collections: dict[str, Collection] = field(
        default_factory=lambda: {name: Collection() for name in (
            "services", "endpointslices", "namespaces", "pods", "secrets", "rolebindings",
            "mutatingwebhookconfigurations")}
    )
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)  # every request's path, in order
    forbidden_writes: set[str] = field(default_factory=set)  # namespaces: 403 on create/update
    pod_accepts: list[str] = field(default_factory=list)  # the Accept of each pod list/watch
    # RBAC: None = the token may read every namespace (a ClusterRoleBinding); a set = only
    # these namespaces (RoleBindings), so a cluster-wide list or watch gets 403.
    allowed_namespaces: set[str] | None = None
    gone_as_status: bool = False  # a too-old watch: HTTP 410 instead of a 410 ERROR event
    empty_watches: bool = False  # a misbehaving server: every watch ends at once, empty
    port: int = 0
    host: str = "127.0.0.1"
    _changed: asyncio.Event = field(default_factory=asyncio.Event)  # replaced at each change
    _raw: dict[str, list[bytes]] = field(default_factory=dict)
    _cut: int = 0  # bumped to end every open watch
    _frozen: int = 0  # watches opened before this count of freezes send nothing more
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # ------------------------------------------------------------ test controls

    def put(self, resource: str, obj: dict[str, Any]) -> int:
        """Create or replace an object; returns its new resourceVersion."""
        coll = self.collections[resource]
        obj = copy.deepcopy(obj)
        key = (obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        kind = "MODIFIED" if key in coll.objects else "ADDED"
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        coll.objects[key] = obj
        coll.history.append((self.version, kind, obj))
        self._notify()
        return self.version

    def delete(self, resource: str, namespace: str, name: str) -> None:
        coll = self.collections[resource]
        obj = coll.objects.pop((namespace, name))
        self.version += 1
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = str(self.version)
        coll.history.append((self.version, "DELETED", gone))
        self._notify()

    def compact(self) -> None:
        """Forget the event history: watches from older versions now get 410 Gone."""
        for coll in self.collections.values():
            coll.history.clear()
            coll.oldest = self.version
        self._notify()

    def cut_watches(self) -> None:
        """End every open watch stream (as an API server restart or timeout would)."""
        self._cut += 1
        self._notify()

    def freeze_watches(self) -> None:
        """Every open watch goes silent and stays open, whatever changes (a black-holed
        connection: a dead node or a NAT that dropped its state); watches opened after
        this are served."""
        self._frozen += 1
        self._notify()

    def inject(self, resource: str, raw: bytes) -> None:
        """Send raw bytes (e.g. a malformed event line) to the open watches of ``resource``."""
        self._raw.setdefault(resource, []).append(raw)
        self._notify()

    def count(self, resource: str, verb: str) -> int:
        return sum(1 for r, v, _ in self.requests if r == resource and v == verb)

    def bookmark(self) -> None:
        """Send a BOOKMARK (the server's progress marker) on every open watch."""
        line = _line({"type": "BOOKMARK",
                      "object": {"metadata": {"resourceVersion": str(self.version)}}})
        for resource in self.collections:
            self._raw.setdefault(resource, []).append(line)
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # ------------------------------------------------------------ lifecycle

    async def start(self, sock: socket.socket | None = None) -> KubeApiServer:
        app = web.Application()
        for prefix, (resource, *_) in RESOURCES.items():
            handler = functools.partial(self._handle, prefix)
            app.router.add_get(f"{prefix}/{resource}", handler)
            app.router.add_get(f"{prefix}/namespaces/{{namespace}}/{resource}", handler)
        app.router.add_get("/api/v1/namespaces", functools.partial(self._handle, NAMESPACES))
        app.router.add_get("/api/v1/pods", functools.partial(self._handle, PODS))
        app.router.add_get("/api/v1/namespaces/{namespace}/secrets",
                           functools.partial(self._handle, SECRETS))
        for prefix, (resource, *_) in OBJECTS.items():
            scope = f"{prefix}/namespaces/{{namespace}}/{resource}" if resource in NAMESPACED \
                else f"{prefix}/{resource}"
            handler = functools.partial(self._object, prefix)
            app.router.add_route("*", f"{scope}/{{name}}", handler)
            app.router.add_post(scope, handler)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        if sock is None:
            sock = socket.create_server((self.host, 0))
        sock.setblocking(False)
        self.host, self.port = sock.getsockname()[:2]
        await web.SockSite(self._runner, sock).start()
        return self

    async def stop(self) -> None:
        self.cut_watches()
        await asyncio.sleep(0)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------ HTTP

    async def _handle(self, prefix: str, request: web.Request) -> web.StreamResponse:
        resource, api_version, list_kind, kind = CLUSTER_LISTS.get(prefix) or RESOURCES[prefix]
        if resource == "pods":
            self.pod_accepts.append(request.headers.get("Accept", ""))
        if "as=PartialObjectMetadata" in request.headers.get("Accept", ""):
            api_version, list_kind, kind = (
                "meta.k8s.io/v1", "PartialObjectMetadataList", "PartialObjectMetadata")
        namespace = request.match_info.get("namespace")
        params = dict(request.query)
        verb = "watch" if params.get("watch") in ("1", "true") else "list"
        self.requests.append((resource, verb, params))
        self.paths.append(request.path)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response(_status(401, "Unauthorized", "Unauthorized"), status=401)
        if self.allowed_namespaces is not None and namespace not in self.allowed_namespaces:
            where = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
            return web.json_response(_status(
                403, "Forbidden", f'{resource} is forbidden: cannot {verb} {resource} {where}'),
                status=403)
        if verb == "list":
            return self._list(resource, api_version, list_kind, kind, params, namespace)
        return await self._watch(request, resource, api_version, kind, params, namespace)

    def _list(self, resource: str, api_version: str, list_kind: str, kind: str,
              params: dict[str, str], namespace: str | None) -> web.Response:
        named = _field_name(params)
        items = [self._typed(o, api_version, kind)
                 for (ns, name), o in sorted(self.collections[resource].objects.items())
                 if (namespace is None or ns == namespace) and named in (None, name)]
        limit = int(params.get("limit") or 0) or len(items) or 1
        start = int(params.get("continue") or 0)
        page = items[start:start + limit]
        meta: dict[str, Any] = {"resourceVersion": str(self.version)}
        if start + limit < len(items):
            meta["continue"] = str(start + limit)
        return web.json_response({"kind": list_kind, "apiVersion": api_version,
                                  "metadata": meta, "items": page})

    async def _watch(self, request: web.Request, resource: str, api_version: str, kind: str,
                     params: dict[str, str], namespace: str | None) -> web.StreamResponse:
        coll = self.collections[resource]
        since = int(params.get("resourceVersion") or 0)
        timeout = float(params.get("timeoutSeconds") or 300)
        if since < coll.oldest:
            status = _status(410, "Expired", f"too old resource version: {since} "
                                             f"({coll.oldest})")
            if self.gone_as_status:
                return web.json_response(status, status=410)
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            await response.write(_line({"type": "ERROR", "object": status}))
            return response
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        if self.empty_watches:
            return response
        cut, frozen = self._cut, self._frozen
        sent = since
        named = _field_name(params)
        raw_seen = len(self._raw.get(resource, []))
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(timeout):
                while True:
                    changed = self._changed  # set by any change made from here on
                    if self._frozen != frozen:  # black-holed: silent until the timeout
                        await asyncio.sleep(timeout)
                    for version, event_type, obj in list(coll.history):
                        if (namespace is not None
                                and obj["metadata"].get("namespace") != namespace) or (
                                named is not None and obj["metadata"]["name"] != named):
                            sent = max(sent, version)
                        elif version > sent:
                            await response.write(_line(
                                {"type": event_type,
                                 "object": self._typed(obj, api_version, kind)}))
                            sent = version
                    raw = self._raw.get(resource, [])
                    for chunk in raw[raw_seen:]:
                        await response.write(chunk)
                    raw_seen = len(raw)
                    if self._cut != cut or sent < coll.oldest:  # restart / compaction
                        break
                    await changed.wait()
        return response

    async def _object(self, prefix: str, request: web.Request) -> web.Response:
        """GET/PUT/PATCH one object by name, or POST a new one to its collection."""
        resource, api_version, kind = OBJECTS[prefix]
        namespace = request.match_info.get("namespace", "")
        name = request.match_info.get("name")
        verb = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch"}.get(
            request.method, request.method.lower())
        self.requests.append((resource, verb, dict(request.query)))
        self.paths.append(request.path)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response(_status(401, "Unauthorized", "Unauthorized"), status=401)
        if verb in ("create", "update") and namespace in self.forbidden_writes:
            return web.json_response(_status(
                403, "Forbidden", f'{resource} is forbidden in the namespace "{namespace}"'),
                status=403)
        if verb not in ("get", "create", "update", "patch") or (verb == "create") != (
                name is None):
            return web.json_response(_status(405, "MethodNotAllowed", verb), status=405)
        coll = self.collections[resource]
        if verb == "create":
            obj = await request.json()
            name = obj["metadata"]["name"]
        current = coll.objects.get((namespace, name or ""))
        if verb == "create":
            if current is not None:
                return web.json_response(_status(
                    409, "AlreadyExists", f'{resource} "{name}" already exists'), status=409)
            if namespace:
                obj["metadata"]["namespace"] = namespace
            self.put(resource, obj)
            return web.json_response(self._typed(coll.objects[(namespace, name)],
                                                 api_version, kind), status=201)
        if current is None:
            return web.json_response(_status(404, "NotFound", f'{resource} "{name}" not found'),
                                     status=404)
        if verb == "get":
            return web.json_response(self._typed(current, api_version, kind))
        if verb == "update":
            obj = await request.json()
            if obj["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
                return web.json_response(_status(
                    409, "Conflict", "the object has been modified"), status=409)
        else:
            if request.content_type != "application/json-patch+json":
                return web.json_response(_status(415, "UnsupportedMediaType",
                                                 request.content_type), status=415)
            obj = apply_patch(current, await request.json())
        self.put(resource, obj)
        return web.json_response(self._typed(coll.objects[(namespace, name)], api_version, kind))

    def object(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.collections[resource].objects.get((namespace, name))

    def secret_values(self, namespace: str, name: str) -> dict[str, str] | None:
        """A stored Secret's data, decoded."""
        obj = self.object("secrets", namespace, name)
        if obj is None:
            return None
        return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}

    @staticmethod
    def _typed(obj: dict[str, Any], api_version: str, kind: str) -> dict[str, Any]:
        if kind == "PartialObjectMetadata":  # metadata only, as the API server's `as=` does
            return {"apiVersion": api_version, "kind": kind, "metadata": obj["metadata"]}
        return {**obj, "apiVersion": api_version, "kind": kind}


def _field_name(params: dict[str, str]) -> str | None:
    """The name of ``fieldSelector=metadata.name=NAME`` (the only field selector served)."""
    selector = params.get("fieldSelector")
    if selector is None:
        return None
    key, _, value = selector.partition("=")
    if key != "metadata.name":
        raise web.HTTPBadRequest(text=f"field selector not served: {selector}")
    return value


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def _line(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode() + b"\n"
