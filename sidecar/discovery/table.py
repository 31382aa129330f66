"""Discovery as a whole: the watches of Services and EndpointSlices -> the routing table.

Owns ``Discovery``: one ``ResourceWatch`` per resource and watched namespace (or cluster-wide),
and the application of the ``Routes`` built from their stores to the sidecar's
``UpstreamTable`` (``apply(..., source="discovery")``, which calls ``policy.set_endpoints`` and
so keeps the learned state of endpoints that stay; requests in flight hold their group and are
never dropped). Bursts of events are coalesced into one application. Also the lookups the
outbound side routes by: a connection's destination (transparent interception) and a request's
authority (``Host: users:9090``). The RBAC this needs: get, list and watch on ``services`` and
``discovery.k8s.io/endpointslices`` -- a RoleBinding in each watched namespace (by default only
the pod's own), or a ClusterRoleBinding for cluster-wide.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from sidecar.discovery.client import WATCH_IDLE_S, KubeClient, KubeCredentials
from sidecar.discovery.model import (
    DEFAULT_CLUSTER_DOMAIN,
    Routes,
    build_routes,
    parse_endpoint_slice,
    parse_service,
    split_authority,
)
from sidecar.discovery.watch import ResourceWatch
from sidecar.metrics import DiscoveryMetrics

log = logging.getLogger(__name__)

APPLY_SETTLE_S = 0.02  # coalesce a burst of events into one table update


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
        metrics: DiscoveryMetrics,
        namespaces: tuple[str, ...] | None = None,
        on_removed: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        cluster_domain: str = DEFAULT_CLUSTER_DOMAIN,
        watch_idle: float = WATCH_IDLE_S,
    ) -> None:
        self.credentials = credentials
        self.watch_idle = watch_idle  # a silent watch is resumed after this (client.py)
        self.table = table
        self.namespaces = namespaces
        self.on_removed = on_removed  # e.g. drop a removed group's metric labels
        self.clock = clock
        self.rng = rng or random.Random()
        self.cluster_domain = cluster_domain
        self.metrics = metrics
        self.routes = Routes()
        self._reported: set[tuple[str, str, str]] = set()  # bad annotations logged
        self._dirty = asyncio.Event()
        self.watches: list[ResourceWatch] = []

    def destination(self, host: str, port: int) -> str | None:
        """The upstream group a connection to ``host:port`` (a cluster IP) belongs to."""
        return self.routes.destinations.get((host, port))

    def route(self, host: str, port: int) -> tuple[str, str] | None:
        """(group, protocol) of a connection to ``host:port``, or None if it is no Service."""
        group = self.routes.destinations.get((host, port))
        return (group, self.routes.protocols.get(group, "unknown")) if group else None

    def long_paths(self, group: str) -> tuple[str, ...]:
        """The declared long requests of a discovered group (its Service's
        ``equilibrium.io/long-paths``); () for none."""
        return self.routes.long_paths.get(group, ())

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
        async with KubeClient(self.credentials, self.watch_idle) as client:
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
        for svc in services:  # told once per Service and reason, not at every apply
            key = (svc.namespace, svc.name, svc.bad_annotation)
            if svc.bad_annotation and key not in self._reported:
                self._reported.add(key)
                self.metrics.rejected_annotations.inc()
                log.warning("service %s/%s: ignored its annotation %s (its routes stand)",
                            svc.namespace, svc.name, svc.bad_annotation)
        return routes
