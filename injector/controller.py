"""The install controller: generate the mesh's secrets in the cluster and hand them out.

Owns ``equilibrium injector controller`` (one replica in ``equilibrium-system``, its own
Deployment and ServiceAccount so the webhook itself keeps no API token). At start it ensures,
idempotently and only where absent (never rotating a value by accident):

1. ``equilibrium-redis-auth`` (the three Redis passwords, :mod:`wire.acl` users),
2. ``equilibrium-mesh`` (the mesh HMAC key and the signaler's Redis URL),
3. ``equilibrium-injector-tls`` (CA + serving certificate, :mod:`injector.certs`), and the
   ``caBundle`` of every webhook of the MutatingWebhookConfiguration, patched to that CA;

then it lists and watches Namespaces, and the metadata of Pods, and in each namespace that
opts in (:func:`injector.mesh_objects.wants_mesh`: labelled) or runs a pod the webhook
injected (annotation ``equilibrium.io/status: injected``: the per-pod opt-in) it creates or
updates ``equilibrium-mesh`` (the key and eq-sidecar's URL only) and the
``equilibrium-sidecar`` RoleBinding. Such a pod waits for them in
``CreateContainerConfigError`` for about a second and then starts by itself. A namespace that
opts out keeps both (already-injected pods must be able to restart); the docs say how to
remove them. Any failure is logged without
secret values and retried after a jittered backoff (:mod:`mesh.backoff`), relisting
everything. The objects' shapes are :mod:`injector.mesh_objects`; the HTTP is
:mod:`injector.kube`.

Rotation without a restart: it also watches the three control-plane Secrets (each by name,
``fieldSelector=metadata.name=...``, which is what its Role allows). When one changes (a key,
password or certificate replaced by hand) or is deleted (then it is generated anew), the
control-plane step runs again and, if the mesh key, a Redis password or the CA changed,
every namespace it manages is reconciled with the new values and the caBundle follows the
new CA. Its own writes come back as events too; they change nothing and pass nothing on.

Its metrics (:class:`injector.metrics.ControllerMetrics`: reconciles, loop errors,
rotations passed on, managed namespaces) are served by :mod:`injector.controller_admin`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from injector import certs
from injector import mesh_objects as objs
from injector.config import STATUS, STATUS_INJECTED
from injector.kube import METADATA_ONLY, ApiError, Conflict, KubeRest
from injector.metrics import ControllerMetrics
from mesh.backoff import Backoff

log = logging.getLogger(__name__)

NAMESPACES = "/api/v1/namespaces"
PODS = "/api/v1/pods"
MIN_SYNC_S = 1.0  # a list + watch that ends sooner is paced by the backoff
RETRY_S = 10.0  # a namespace the API refused is retried (by a relist) this soon
WEBHOOKS = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"


def secrets_path(namespace: str) -> str:
    return f"{NAMESPACES}/{namespace}/secrets"


def bindings_path(namespace: str) -> str:
    return f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings"


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    namespace: str = "equilibrium-system"
    service: str = "equilibrium-injector"
    webhook_config: str = certs.WEBHOOK_CONFIGURATION
    tls_secret: str = certs.TLS_SECRET
    redis_host: str = objs.DEFAULT_REDIS_HOST
    cert_days: int = 825
    extra_names: tuple[str, ...] = ()


Fill = Callable[[Mapping[str, str]], dict[str, str]]


class Controller:
    def __init__(self, api: KubeRest, config: ControllerConfig, token: objs.Token,
                 now: Callable[[], dt.datetime], rng: random.Random,
                 metrics: ControllerMetrics | None = None) -> None:
        self.api = api
        self.config = config
        self.token = token
        self.now = now
        self.rng = rng
        self.metrics = metrics or ControllerMetrics()
        self.backoff = Backoff(rng)
        self.pod_backoff = Backoff(rng)
        self.pod_namespaces: set[str] = set()  # served for their injected pods, this list
        self.managed: set[str] = set()  # every namespace given its Secret and RoleBinding
        self._reconciling = asyncio.Lock()
        self._control_plane = asyncio.Lock()
        self.mesh_key = ""
        self.auth: dict[str, str] = {}
        self.ca = ""

    def sources(self) -> tuple[str, ...]:
        """The control-plane Secrets whose values reach the namespaces (watched by name)."""
        return (objs.REDIS_AUTH_SECRET, objs.MESH_SECRET, self.config.tls_secret)

    def fingerprint(self) -> dict[str, object]:
        """What the namespaces (and the caBundle) get from each control-plane Secret."""
        return {objs.MESH_SECRET: self.mesh_key,
                objs.REDIS_AUTH_SECRET: tuple(sorted(self.auth.items())),
                self.config.tls_secret: self.ca}

    # ------------------------------------------------------------ the control plane's secrets

    async def ensure_control_plane(self) -> None:
        ns = self.config.namespace
        self.auth = await self._ensure_secret(
            ns, objs.REDIS_AUTH_SECRET, lambda have: objs.missing_redis_auth(have, self.token))
        mesh = await self._ensure_secret(ns, objs.MESH_SECRET, self._fill_signaler_mesh)
        self.mesh_key = mesh["mesh-hmac-key"]
        tls = await self._ensure_secret(ns, self.config.tls_secret, self._fill_tls,
                                        "kubernetes.io/tls")
        self.ca = tls.get("ca.crt", "")
        if tls.get("ca.crt"):
            await self._ensure_ca_bundle(tls["ca.crt"])
        else:  # a certificate made elsewhere without its CA: never replace it
            log.warning("Secret %s/%s has no ca.crt: caBundle left as it is (set it, or let "
                        "cert-manager's cainjector do it)", ns, self.config.tls_secret)

    def _fill_signaler_mesh(self, have: Mapping[str, str]) -> dict[str, str]:
        fill: dict[str, str] = {}
        if not have.get("mesh-hmac-key"):
            fill["mesh-hmac-key"] = objs.new_mesh_key(self.token)
        url = objs.signaler_url(self.auth, self.config.redis_host)
        if have.get("redis-url") != url:  # derived: follows a rotated signaler password
            fill["redis-url"] = url
        return fill

    def _fill_tls(self, have: Mapping[str, str]) -> dict[str, str]:
        if have.get("tls.crt") and have.get("tls.key"):
            return {}  # a working pair (ours, cert-manager's, yours) is never replaced
        bundle = certs.bootstrap(self.config.service, self.config.namespace, self.now(),
                                 days=self.config.cert_days, extra_names=self.config.extra_names)
        return {"tls.crt": bundle.cert_pem.decode(), "tls.key": bundle.key_pem.decode(),
                "ca.crt": bundle.ca_pem.decode()}

    async def _ensure_secret(self, namespace: str, name: str, fill: Fill,
                             secret_type: str = "Opaque") -> dict[str, str]:
        """The Secret's values after adding what ``fill`` says is missing (creating it if
        absent); values it already has are kept."""
        path = f"{secrets_path(namespace)}/{name}"
        existing = await self.api.get(path)
        if existing is None:
            values = fill({})
            try:
                await self.api.create(secrets_path(namespace),
                                      objs.secret(name, namespace, values, secret_type))
                log.info("created Secret %s/%s (keys: %s)", namespace, name,
                         ", ".join(sorted(values)))
                return values
            except Conflict:  # made meanwhile (another controller): use that one
                existing = await self.api.get(path)
                if existing is None:
                    raise ApiError(f"Secret {namespace}/{name} vanished after a conflict") \
                        from None
        have = objs.decode_data(existing)
        missing = fill(have)
        if missing:
            existing["data"] = {**(existing.get("data") or {}), **objs.encode_data(missing)}
            await self.api.replace(path, existing)
            log.info("updated Secret %s/%s (keys: %s)", namespace, name,
                     ", ".join(sorted(missing)))
        return {**have, **missing}

    async def _ensure_ca_bundle(self, ca_pem: str) -> None:
        path = f"{WEBHOOKS}/{self.config.webhook_config}"
        config = await self.api.get(path)
        if config is None:
            raise ApiError(f"MutatingWebhookConfiguration {self.config.webhook_config} is "
                           "missing (apply k8s/install.yaml)")
        bundle = certs.CertBundle(ca_pem.encode(), b"", b"").ca_bundle
        ops = [{"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": bundle}
               for i, hook in enumerate(config.get("webhooks") or [])
               if (hook.get("clientConfig") or {}).get("caBundle") != bundle]
        if ops:
            await self.api.json_patch(path, ops)
            log.info("set caBundle on %d webhook(s) of %s", len(ops),
                     self.config.webhook_config)

    # ------------------------------------------------------------ meshed namespaces

    async def reconcile_namespace(self, namespace: str) -> None:
        """``equilibrium-mesh`` (key + eq-sidecar URL) and the sidecars' RoleBinding."""
        if namespace == self.config.namespace:
            return  # the control plane's own equilibrium-mesh is the signaler's
        async with self._reconciling:  # the namespace and pod loops may name the same one
            try:
                await self._reconcile(namespace)
            except (ApiError, aiohttp.ClientError, TimeoutError):
                self.metrics.reconciles.labels(result="error").inc()
                raise
        self.metrics.reconciles.labels(result="ok").inc()
        self.managed.add(namespace)
        self.metrics.managed.set(len(self.managed))

    async def _reconcile(self, namespace: str) -> None:
        values = objs.namespace_mesh_values(self.mesh_key, self.auth, self.config.redis_host)
        path = f"{secrets_path(namespace)}/{objs.MESH_SECRET}"
        existing = await self.api.get(path)
        if existing is None:
            await self.api.create(secrets_path(namespace),
                                  objs.secret(objs.MESH_SECRET, namespace, values))
            log.info("namespace %s: created Secret %s", namespace, objs.MESH_SECRET)
        elif objs.decode_data(existing) != values:
            existing["data"] = objs.encode_data(values)  # exactly these keys: no admin URL
            await self.api.replace(path, existing)
            log.info("namespace %s: updated Secret %s", namespace, objs.MESH_SECRET)
        desired = objs.sidecar_role_binding(namespace)
        path = f"{bindings_path(namespace)}/{objs.SIDECAR_ROLE}"
        binding = await self.api.get(path)
        if binding is None:
            await self.api.create(bindings_path(namespace), desired)
            log.info("namespace %s: created RoleBinding %s", namespace, objs.SIDECAR_ROLE)
        elif objs.binding_differs(binding, desired):
            binding.update(subjects=desired["subjects"])
            await self.api.replace(path, binding)
            log.info("namespace %s: updated RoleBinding %s", namespace, objs.SIDECAR_ROLE)

    async def _handle(self, namespace: Mapping[str, Any]) -> None:
        meta = namespace.get("metadata") or {}
        name = meta.get("name")
        terminating = (namespace.get("status") or {}).get("phase") == "Terminating"
        if isinstance(name, str) and objs.wants_mesh(namespace) and not terminating:
            await self.reconcile_namespace(name)

    async def sync_namespaces(self) -> None:
        """One list, reconciling every opted-in namespace, then watch until the stream ends."""
        await self._sync(NAMESPACES, "application/json", self._handle)

    async def sync_pods(self) -> None:
        """Namespaces with injected pods (the per-pod annotation opt-in): one list of the pods'
        metadata, then a watch; each such namespace is reconciled once per list."""
        self.pod_namespaces.clear()  # a relist repairs what was changed by hand
        await self._sync(PODS, METADATA_ONLY, self._handle_pod)

    async def _sync(self, path: str, accept: str,
                    handle: Callable[[Mapping[str, Any]], Awaitable[None]]) -> None:
        """List, handle every item, watch and handle every change, until the watch ends; a
        namespace the API refuses (403, 409, 422...) is skipped and retried by a relist within
        ``RETRY_S`` without holding up the others."""
        failed: list[BaseException] = []
        items, version = await self.api.list(path, accept)
        for item in items:
            await self._guarded(handle, item, failed)
        loop = asyncio.get_running_loop()
        async with self.api.watch(path, version, accept) as events:
            with contextlib.suppress(TimeoutError):  # retry time, or the stream went quiet
                async with asyncio.timeout(None) as deadline:
                    if failed:
                        deadline.reschedule(loop.time() + RETRY_S)
                    async for event in events:
                        if event.get("type") == "ERROR":
                            return  # 410 Gone or other: relist
                        if event.get("type") in ("ADDED", "MODIFIED"):
                            await self._guarded(handle, event["object"], failed)
                            if failed and deadline.when() is None:
                                deadline.reschedule(loop.time() + RETRY_S)

    # ------------------------------------------------------------ rotations

    async def sync_source(self, name: str) -> None:
        """One control-plane Secret, by name: list, then watch; any change or deletion
        re-runs the control-plane step and passes what changed on (:meth:`refresh`)."""
        selector = {"fieldSelector": f"metadata.name={name}"}
        _, version = await self.api.list(secrets_path(self.config.namespace), selector=selector)
        await self.refresh(name)  # a change missed while no watch was open (after a failure)
        async with self.api.watch(secrets_path(self.config.namespace), version,
                                  selector=selector) as events:
            async for event in events:
                kind = event.get("type")
                if kind == "ERROR":
                    return  # 410 Gone or other: relist
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    await self.refresh(name)

    async def refresh(self, event_of: str) -> None:
        """A control-plane Secret (``event_of``) changed: read (or regenerate) them all; if
        the mesh key, a Redis password or the CA is not what the namespaces got, reconcile
        every managed namespace (each failure retried by the next relist, as usual)."""
        async with self._control_plane:
            before = self.fingerprint()
            await self.ensure_control_plane()
            after = self.fingerprint()
            changed = sorted(name for name, value in after.items() if before[name] != value)
            if not changed:
                return  # our own write coming back, or a change that alters nothing
            for name in changed:
                self.metrics.rotations.labels(secret=name).inc()
            log.info("Secret(s) %s in %s changed (seen by the watch of %s): passing them on "
                     "to %d namespace(s)", ", ".join(changed), self.config.namespace,
                     event_of, len(self.managed))
            failed: list[BaseException] = []
            for namespace in sorted(self.managed):
                await self._guarded(self.reconcile_namespace, namespace, failed)

    @staticmethod
    async def _guarded(handle: Callable[[Any], Awaitable[None]],
                       item: Any, failed: list[BaseException]) -> None:
        try:
            await handle(item)
        except ApiError as exc:
            if exc.status in (0, 401) or exc.status >= 500:
                raise  # the API or our token: nothing else would work either
            failed.append(exc)
            log.warning("%s; retrying within %.0f s", exc, RETRY_S)

    async def _handle_pod(self, pod: Mapping[str, Any]) -> None:
        meta = pod.get("metadata") or {}
        annotations = meta.get("annotations") or {}
        name = meta.get("namespace")
        if (isinstance(annotations, Mapping) and isinstance(name, str)
                and annotations.get(STATUS) == STATUS_INJECTED
                and name not in self.pod_namespaces):
            await self.reconcile_namespace(name)
            self.pod_namespaces.add(name)

    async def run(self) -> None:
        """Ensure the control plane's secrets, then serve namespaces; forever."""
        while True:
            try:
                await self.ensure_control_plane()
                break
            except (ApiError, aiohttp.ClientError, TimeoutError) as exc:
                self.metrics.errors.labels(loop="control_plane").inc()
                await self._pause(self.backoff, exc)
        self.metrics.ready.set(1)
        log.info("control-plane secrets in place; watching namespaces, injected pods and "
                 "the control-plane Secrets")
        await asyncio.gather(
            self._forever(self.sync_namespaces, self.backoff, "namespaces"),
            self._forever(self.sync_pods, self.pod_backoff, "pods"),
            *(self._forever(functools.partial(self.sync_source, name), Backoff(self.rng),
                            "secrets") for name in self.sources()))

    async def _forever(self, sync: Callable[[], Awaitable[None]], backoff: Backoff,
                       loop_name: str) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            failure: BaseException | None = None
            try:
                await sync()
            except (ApiError, aiohttp.ClientError, TimeoutError) as exc:
                failure = exc
            if loop.time() - started >= MIN_SYNC_S:
                backoff.reset()  # it worked for a while: the next failure starts small
            elif failure is None:  # a server ending every watch at once
                failure = ApiError("the watch ended at once")
            if failure is not None:
                self.metrics.errors.labels(loop=loop_name).inc()
                await self._pause(backoff, failure)

    @staticmethod
    async def _pause(backoff: Backoff, exc: BaseException) -> None:
        delay = backoff.next()
        log.warning("%s; retrying in %.1f s", exc, delay)
        await asyncio.sleep(delay)
