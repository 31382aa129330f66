"""Discovery against a real HTTP API server speaking the Kubernetes list/watch wire format.

The API server is ``tests.integration.kube_api`` on loopback (a stand-in for the external
Kubernetes API, which cannot run here); discovery, the upstream table and the sidecar are the
real ones. Covered: list + watch into groups, aliases and cluster-IP destinations; updates
that keep the group (and a request in flight); 410 Gone -> relist and catch up; a cut watch
-> resume; malformed objects and lines counted and skipped; a bad token backed off and
recovered; and the sidecar process routing by Service name from discovery.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from mesh.profiles import get_profile
from sidecar.discovery import Discovery, KubeCredentials
from sidecar.metrics import DiscoveryMetrics
from sidecar.upstreams import UpstreamTable
from tests.integration.kube_api import KubeApiServer, endpoint_slice, service
from tests.integration.procs import (
    async_start_sidecar,
    async_stop,
    fetch,
    start_backend,
)
from tests.support import metric_value

USERS = "users.default.80"


async def until(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)
    assert check(), what


@pytest.fixture
async def api() -> AsyncIterator[KubeApiServer]:
    server = await KubeApiServer().start()
    server.put("services", service("users", "default", "10.96.0.10",
                                   [("http", 80), ("metrics", 9090)]))
    server.put("endpointslices", endpoint_slice(
        "users-a", "default", "users", [("http", 8080), ("metrics", 9100)],
        ["10.0.0.1", "10.0.0.2"]))
    yield server
    await server.stop()


@pytest.fixture
def token_path(tmp_path: Path, api: KubeApiServer) -> Path:
    path = tmp_path / "token"
    path.write_text(api.token + "\n")
    return path


class Running:
    def __init__(self, discovery: Discovery, table: UpstreamTable,
                 registry: CollectorRegistry) -> None:
        self.discovery, self.table, self.registry = discovery, table, registry
        self.removed: list[str] = []  # groups reported by discovery's on_removed

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(generate_latest(self.registry).decode(), name, **labels)

    def endpoints(self, name: str = USERS) -> tuple[str, ...] | None:
        group = self.table.get(name)
        return group.endpoints if group is not None else None


@pytest.fixture
async def running(api: KubeApiServer, token_path: Path) -> AsyncIterator[Running]:
    table = UpstreamTable("equilibrium", get_profile("balanced"))
    table.apply({"static": ["http://127.0.0.1:9"]}, 0.0)
    registry = CollectorRegistry()
    removed: list[str] = []
    discovery = Discovery(
        KubeCredentials(api.url, token_path, namespace="default"), table,
        metrics=DiscoveryMetrics(registry), rng=random.Random(1), on_removed=removed.append,
    )
    task = asyncio.create_task(discovery.run())
    run = Running(discovery, table, registry)
    run.removed = removed
    try:
        await until(lambda: run.endpoints() is not None, "first sync")
        yield run
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_list_then_watch_fills_groups_aliases_and_destinations(running: Running) -> None:
    assert running.endpoints() == ("http://10.0.0.1:8080", "http://10.0.0.2:8080")
    assert running.endpoints("users.default.9090") == ("http://10.0.0.1:9100",
                                                       "http://10.0.0.2:9100")
    for alias in ("users", "users.default.svc.cluster.local", "10.96.0.10"):
        group = running.table.get(alias)
        assert group is not None and group.name == USERS
    assert running.discovery.destination("10.96.0.10", 9090) == "users.default.9090"
    assert running.discovery.destination("10.96.0.11", 80) is None
    assert running.table.get("static") is not None  # the config's own group stays
    assert running.metric("equilibrium_discovery_synced", resource="endpointslices") == 1


async def test_watch_events_update_endpoints_in_place(
    api: KubeApiServer, running: Running
) -> None:
    group = running.table.get(USERS)
    api.put("endpointslices", endpoint_slice(
        "users-a", "default", "users", [("http", 8080), ("metrics", 9100)],
        ["10.0.0.2", "10.0.0.3"]))
    await until(lambda: running.endpoints() == ("http://10.0.0.2:8080", "http://10.0.0.3:8080"),
                "endpoints updated from the watch")
    assert running.table.get(USERS) is group  # same group: requests holding it keep going
    api.put("services", service("orders", "shop", "10.96.0.20", [("http", 80)]))
    await until(lambda: running.table.get("orders.shop") is not None, "new service")
    assert running.table.get("orders") is None  # short names only in our own namespace
    api.delete("services", "default", "users")
    await until(lambda: running.table.get(USERS) is None, "deleted service removed")
    assert USERS in running.removed and "users.default.9090" in running.removed
    assert running.discovery.destination("10.96.0.10", 80) is None
    assert api.count("services", "list") == 1  # all of it without relisting


@pytest.mark.parametrize("as_status", [False, True], ids=["error-event", "http-410"])
async def test_gone_relists_and_catches_up_with_missed_changes(
    api: KubeApiServer, running: Running, as_status: bool
) -> None:
    api.gone_as_status = as_status
    lists_before = api.count("endpointslices", "list")
    # The change is made and the history compacted at once (as across an API server restart):
    # the open watch ends without it, resuming from our version gets 410, a relist follows.
    api.put("endpointslices", endpoint_slice(
        "users-a", "default", "users", [("http", 8080)], ["10.0.0.7"]))
    api.compact()
    await until(lambda: running.endpoints() == ("http://10.0.0.7:8080",),
                "the change made while the watch was down")
    assert running.metric("equilibrium_discovery_relists_total", resource="endpointslices",
                          reason="gone") >= 1
    assert api.count("endpointslices", "list") > lists_before


async def test_a_cut_watch_resumes_from_the_last_version_without_relisting(
    api: KubeApiServer, running: Running
) -> None:
    api.bookmark()
    await asyncio.sleep(0.05)
    watches = api.count("endpointslices", "watch")
    lists = api.count("endpointslices", "list")
    api.cut_watches()
    await until(lambda: api.count("endpointslices", "watch") > watches, "watch resumed")
    resumed = [p for r, v, p in api.requests if r == "endpointslices" and v == "watch"][-1]
    assert int(resumed["resourceVersion"]) == api.version  # from the bookmark, not from 0
    api.put("endpointslices", endpoint_slice(
        "users-a", "default", "users", [("http", 8080)], ["10.0.0.8"]))
    await until(lambda: running.endpoints() == ("http://10.0.0.8:8080",), "event after resume")
    assert api.count("endpointslices", "list") == lists


async def test_a_silent_watch_is_given_up_and_resumed(api: KubeApiServer,
                                                      token_path: Path) -> None:
    """A stranger's finding: a black-holed connection to the API server (a dead node, a NAT
    that dropped its state) kept a watch open and silent, and the endpoints of before for
    5.5 minutes. A watch silent for ``watch_idle`` (90 s by default; 1 s here) is resumed."""
    table = UpstreamTable("equilibrium", get_profile("balanced"))
    registry = CollectorRegistry()
    discovery = Discovery(KubeCredentials(api.url, token_path, namespace="default"), table,
                          metrics=DiscoveryMetrics(registry), rng=random.Random(1),
                          watch_idle=1.0)
    task = asyncio.create_task(discovery.run())
    try:
        await until(lambda: table.get(USERS) is not None, "first sync")
        watches = api.count("endpointslices", "watch")
        api.freeze_watches()
        api.put("endpointslices", endpoint_slice(
            "users-a", "default", "users", [("http", 8080)], ["10.0.0.9"]))
        group = table.get(USERS)
        assert group is not None and group.endpoints != ("http://10.0.0.9:8080",)
        await until(lambda: group.endpoints == ("http://10.0.0.9:8080",),
                    "the change, from a new watch", timeout=15.0)
        assert api.count("endpointslices", "watch") > watches
        assert api.count("endpointslices", "list") == 1  # resumed, not relisted
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_watches_that_end_at_once_back_off_instead_of_spinning(
    api: KubeApiServer, running: Running
) -> None:
    api.empty_watches = True
    api.cut_watches()
    slices = next(w for w in running.discovery.watches if w.resource == "endpointslices")
    await until(lambda: slices.backoff.attempts >= 3, "backoff engaged", timeout=10)
    assert running.metric("equilibrium_discovery_errors_total", resource="endpointslices",
                          kind="EmptyWatch") >= 3
    api.empty_watches = False
    api.put("endpointslices", endpoint_slice(
        "users-a", "default", "users", [("http", 8080)], ["10.0.0.6"]))
    await until(lambda: running.endpoints() == ("http://10.0.0.6:8080",), "recovered",
                timeout=10)


async def test_malformed_objects_and_lines_are_counted_and_skipped(
    api: KubeApiServer, running: Running
) -> None:
    bad = endpoint_slice("users-a", "default", "users", [("http", 8080)], ["10.0.0.9"])
    bad["ports"][0]["port"] = "eighty"
    api.put("endpointslices", bad)
    await until(lambda: running.metric("equilibrium_discovery_rejected_objects_total",
                                       resource="endpointslices") >= 1, "rejected object")
    assert running.endpoints() == ("http://10.0.0.1:8080", "http://10.0.0.2:8080")  # kept
    api.inject("endpointslices", b"{not json\n")
    await until(lambda: running.metric("equilibrium_discovery_errors_total",
                                       resource="endpointslices",
                                       kind="MalformedObject") >= 1, "bad line counted")
    api.put("endpointslices", endpoint_slice(
        "users-a", "default", "users", [("http", 8080)], ["10.0.0.4"]))
    await until(lambda: running.endpoints() == ("http://10.0.0.4:8080",),
                "recovered after the bad line", timeout=10)


async def test_a_services_long_paths_annotation_reaches_its_groups(
    api: KubeApiServer, running: Running
) -> None:
    annotated = service("users", "default", "10.96.0.10", [("http", 80), ("metrics", 9090)])
    annotated["metadata"]["annotations"] = {"equilibrium.io/long-paths": "/watch,/v1/poll"}
    api.put("services", annotated)
    await until(lambda: running.discovery.long_paths(USERS) == ("/watch", "/v1/poll"),
                "the annotation read")
    assert running.discovery.long_paths("users.default.9090") == ("/watch", "/v1/poll")
    # a bad one costs the declaration, not the routes, and is told once
    annotated["metadata"]["annotations"] = {"equilibrium.io/long-paths": "watch"}
    api.put("services", annotated)
    await until(lambda: running.discovery.long_paths(USERS) == (), "the bad one ignored")
    await until(lambda: running.metric(
        "equilibrium_discovery_rejected_annotations_total") == 1, "the bad one counted")
    assert running.endpoints() == ("http://10.0.0.1:8080", "http://10.0.0.2:8080")
    api.put("endpointslices", endpoint_slice(
        "users-a", "default", "users", [("http", 8080)], ["10.0.0.3"]))
    await until(lambda: running.endpoints() == ("http://10.0.0.3:8080",), "later changes")
    assert running.metric("equilibrium_discovery_rejected_annotations_total") == 1


async def test_namespaced_watches_need_only_role_bindings(
    api: KubeApiServer, token_path: Path
) -> None:
    api.allowed_namespaces = {"default"}  # RoleBindings in "default" only, as k8s/ installs
    api.put("services", service("orders", "shop", "10.96.0.20", [("http", 80)]))
    registry = CollectorRegistry()
    table = UpstreamTable("equilibrium", get_profile("balanced"))
    scoped = Discovery(KubeCredentials(api.url, token_path, namespace="default"), table,
                       metrics=DiscoveryMetrics(registry), namespaces=("default",),
                       rng=random.Random(3))
    wide_registry, wide_table = CollectorRegistry(), UpstreamTable("equilibrium",
                                                                    get_profile("balanced"))
    cluster_wide = Discovery(KubeCredentials(api.url, token_path, namespace="default"),
                             wide_table, metrics=DiscoveryMetrics(wide_registry),
                             rng=random.Random(4))
    tasks = [asyncio.create_task(scoped.run()), asyncio.create_task(cluster_wide.run())]
    run = Running(scoped, table, registry)
    wide = Running(cluster_wide, wide_table, wide_registry)
    try:
        await until(lambda: run.endpoints() is not None, "scoped discovery synced")
        assert table.get("orders.shop") is None  # outside the watched namespace
        assert all("/namespaces/default/" in path for path in api.paths
                   if path.startswith(("/api/v1/namespaces", "/apis/discovery.k8s.io/v1/n")))
        # Cluster-wide needs a ClusterRoleBinding: 403, retried with backoff, nothing applied.
        await until(lambda: wide.metric("equilibrium_discovery_errors_total",
                                        resource="services", kind="ApiError") >= 1,
                    "403 counted")
        assert not cluster_wide.synced and wide_table.names() == []
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with pytest.raises(asyncio.CancelledError):
                await task


async def test_bad_token_backs_off_then_recovers_when_the_token_rotates(
    api: KubeApiServer, tmp_path: Path
) -> None:
    token = tmp_path / "rotating-token"
    token.write_text("expired")
    table = UpstreamTable("equilibrium", get_profile("balanced"))
    registry = CollectorRegistry()
    discovery = Discovery(KubeCredentials(api.url, token, namespace="default"), table,
                          metrics=DiscoveryMetrics(registry), rng=random.Random(2))
    task = asyncio.create_task(discovery.run())
    run = Running(discovery, table, registry)
    try:
        await until(lambda: run.metric("equilibrium_discovery_errors_total", kind="ApiError") >= 2,
                    "401 answers counted")
        assert table.get(USERS) is None
        token.write_text(api.token)  # the kubelet rotated the projected token
        await until(lambda: run.endpoints() is not None, "synced with the new token",
                    timeout=10)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_sidecar_routes_by_service_name_from_discovery(
    api: KubeApiServer, token_path: Path
) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="slow done", headers={"X-Backend": "pod-0"})

    pod0 = await start_backend("pod-0", routes=[web.get("/slow", slow)])
    pod1 = await start_backend("pod-1")
    annotated = service("users", "default", "10.96.0.10", [("http", 80), ("metrics", 9090)])
    annotated["metadata"]["annotations"] = {"equilibrium.io/long-paths": "/slow"}
    api.put("services", annotated)
    api.put("endpointslices", endpoint_slice(
        "users-a", "default", "users", [("http", pod0.port), ("metrics", pod1.port)],
        ["127.0.0.1"]))
    sidecar = await async_start_sidecar(
        {"static": [pod1.url], "users.default": [pod1.url]},  # config wins a shared name
        extra_args=["--discovery", "--kube-api", api.url, "--kube-token-file", str(token_path)],
        env={"POD_NAMESPACE": "default"},
    )
    try:
        async with aiohttp.ClientSession() as client:
            async def get(host: str, path: str = "/") -> tuple[int, str]:
                reply = await fetch(client, "GET", sidecar.outbound_url + path,
                                    headers={"Host": host})
                return reply.status, reply.headers.get("X-Backend", "")

            async with asyncio.timeout(10):
                while (await get("users"))[0] != 200:
                    await asyncio.sleep(0.05)
            for host in ("users", "users.default.svc", "users.default.svc.cluster.local"):
                assert await get(host) == (200, "pod-0")
            assert await get("users.default") == (200, "pod-1")  # the config's own upstream
            assert (await get("users.elsewhere"))[0] == 404
            # The port in Host picks the Service port: 9090 is another group than 80.
            assert await get("users:9090") == (200, "pod-1")
            assert await get("users.default.svc.cluster.local:9090") == (200, "pod-1")
            assert await get("static") == (200, "pod-1")  # static upstreams still served

            # A request in flight on pod-0 survives pod-0 leaving the Service.
            in_flight = asyncio.create_task(fetch(
                client, "GET", sidecar.outbound_url + "/slow", headers={"Host": "users"}))
            await until(lambda: pod0.methods["GET"] >= 5, "slow request reached pod-0")

            def waiting() -> int:  # the Service's annotation declared /slow long
                state = sidecar.state()["upstreams"].get(USERS, {})
                return sum(e["long_in_flight"] for e in state.get("endpoints", []))

            async with asyncio.timeout(5):
                while await asyncio.to_thread(waiting) != 1:
                    await asyncio.sleep(0.05)
            api.put("endpointslices", endpoint_slice(
                "users-a", "default", "users", [("http", pod1.port)], ["127.0.0.1"]))

            def only_pod1() -> bool:
                state = sidecar.state()["upstreams"].get(USERS, {})
                return [e["endpoint"] for e in state.get("endpoints", [])] == [pod1.url]

            async with asyncio.timeout(10):
                while not await asyncio.to_thread(only_pod1):
                    await asyncio.sleep(0.05)
            release.set()
            reply = await in_flight
            assert (reply.status, reply.body) == (200, b"slow done")
            hits = {await get("users") for _ in range(10)}
            assert hits == {(200, "pod-1")}
        assert sidecar.metric("equilibrium_discovery_synced", resource="services") == 1
        assert sidecar.metric("equilibrium_discovery_events_total", resource="endpointslices",
                              type="MODIFIED") >= 1
    finally:
        await async_stop(sidecar)
        sidecar.cleanup()
        await pod0.stop()
        await pod1.stop()
