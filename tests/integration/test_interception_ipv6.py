"""Dual-stack interception for real: `equilibrium init`'s ip6tables rules and the sidecar's [::].

Topology (two network namespaces this test creates and always deletes; no traffic leaves them)::

    "pod" namespace                                   "cluster" namespace
    app (this test, uid 0)   veth fd00:201::1    <->  veth fd00:201::2, fd00:201::3
                                  10.201.0.1               10.201.0.2
    sidecar (gid 1337)       route fd00:96::/112 via fd00:201::2 (Service IPs), and
      outbound 0.0.0.0:O           10.96.0.0/16  via 10.201.0.2
      inbound  0.0.0.0:I     users pods     [fd00:201::2]:P, [fd00:201::3]:P
      admin    0.0.0.0:A     echo servers   [fd00:201::2]:E, [fd00:201::2]:X (excluded port)
    the app's server         Kubernetes API stand-in [fd00:201::2]:K
      127.0.0.1:APP          "kube-proxy": DNAT [fd00:96::10]:7000 -> E
    a loopback server [::1]:L

The "users" Service is dual-stack: cluster IPs 10.96.0.10 and fd00:96::10, IPv6 endpoints.
`equilibrium init` runs without any IPv6 flag: it finds ::1 on lo and installs the same rules
with ip6tables; the sidecar is told to listen on 0.0.0.0 only and also listens on [::].
Nothing listens on fd00:96::10, so only the ip6tables rules can make the app's connections
work: they must reach the sidecar, which recovers the IPv6 original destination
(IP6T_SO_ORIGINAL_DST) and routes it. The exemptions must hold for IPv6 too: the proxy's GID
(its own IPv6 connections to endpoints and to the API), loopback (::1), an excluded port, and
the admin port for inbound. A second test checks the IPv6 decisions of `equilibrium init`
(detection, --ipv6, --no-ipv6, a failing ip6tables) in a bare namespace.

Needs root, iproute2, iptables (which brings ip6tables) and setpriv; a missing one fails the
test with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from tests.integration.kube_api import endpoint_slice, service
from tests.integration.netns import (
    ClusterServers,
    PodAdmin,
    PodSidecar,
    connect_in,
    free_port_in,
    http_in,
    init_in,
    listen_in,
    namespaces,
    require_tools,
    run,
    serve_http,
    start_echo,
)

POD_V6, CLUSTER_V6_A, CLUSTER_V6_B = "fd00:201::1", "fd00:201::2", "fd00:201::3"
POD_V4, CLUSTER_V4 = "10.201.0.1", "10.201.0.2"
SERVICE_V6, SERVICE_V4 = "fd00:96::10", "10.96.0.10"  # exist only in the init rules
TCP_PORT = 7000  # the Service's opaque port, balanced by "kube-proxy"
PROXY_GID = 1337
CONNECTIONS = "equilibrium_transparent_connections_total"


def our_rules(namespace: str, save: str) -> list[str]:
    """Our nat rules as ``iptables-save``/``ip6tables-save`` prints them."""
    saved = run("ip", "netns", "exec", namespace, save, "-t", "nat")
    return [line for line in saved.splitlines() if "EQUILIBRIUM" in line]


@dataclass
class Cluster(ClusterServers):
    echo_peers: dict[int, list[tuple[str, int]]] = field(default_factory=dict)
    users_port: int = 0
    echo_port: int = 0
    excluded_port: int = 0
    echo_v4_port: int = 0

    async def start(self) -> None:
        ns = self.namespace
        users_a = listen_in(ns, CLUSTER_V6_A)
        self.users_port = users_a.getsockname()[1]
        for name, sock in (("users-a", users_a),
                           ("users-b", listen_in(ns, CLUSTER_V6_B, self.users_port))):
            self.runners.append(await serve_http(sock, self.users_handler(name)))
        for attr, host in (("echo_port", CLUSTER_V6_A), ("excluded_port", CLUSTER_V6_A),
                           ("echo_v4_port", CLUSTER_V4)):
            sock = listen_in(ns, host)
            port = sock.getsockname()[1]
            setattr(self, attr, port)
            self.servers.append(await start_echo(sock, self.echo_peers.setdefault(port, [])))
        run("ip", "netns", "exec", ns, "ip6tables", "-t", "nat", "-A", "PREROUTING",
            "-d", SERVICE_V6, "-p", "tcp", "--dport", str(TCP_PORT),
            "-j", "DNAT", "--to-destination", f"[{CLUSTER_V6_A}]:{self.echo_port}")
        users = service("users", "default", SERVICE_V6, [("http", 80), ("tcp-echo", TCP_PORT)])
        users["spec"].update(clusterIPs=[SERVICE_V6, SERVICE_V4], ipFamilies=["IPv6", "IPv4"],
                             ipFamilyPolicy="RequireDualStack")
        self.api.put("services", users)
        endpoints = endpoint_slice("users-v6", "default", "users",
                                   [("http", self.users_port), ("tcp-echo", self.echo_port)],
                                   [CLUSTER_V6_A, CLUSTER_V6_B])
        endpoints["addressType"] = "IPv6"
        self.api.put("endpointslices", endpoints)
        await self.api.start(sock=listen_in(ns, CLUSTER_V6_A))


@dataclass
class Pod(PodAdmin):
    namespace: str
    admin_port: int
    loopback_port: int
    init_args: list[str]
    init_output: str
    app_seen: list[dict[str, str]] = field(default_factory=list)
    sidecar: PodSidecar | None = None

    async def has_endpoints(self, upstream: str) -> bool:
        state = json.loads((await self.admin("/debug/state")).body)
        return bool(state["upstreams"].get(upstream, {}).get("endpoints"))


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[Pod, Cluster]]:
    """The two namespaces, the cluster's servers, init rules, the app and the sidecar."""
    require_tools("ip6tables", "ip6tables-save")
    cluster: Cluster | None = None
    pod: Pod | None = None
    app_runner: web.AppRunner | None = None
    loopback_server: asyncio.base_events.Server | None = None
    with namespaces("eq6-pod", "eq6-cluster") as (pod_ns, cluster_ns):
        try:
            run("ip", "-n", pod_ns, "link", "add", "eth0", "type", "veth",
                "peer", "name", "eth0", "netns", cluster_ns)
            for ns, addresses in ((pod_ns, (f"{POD_V4}/24", f"{POD_V6}/64")),
                                  (cluster_ns, (f"{CLUSTER_V4}/24", f"{CLUSTER_V6_A}/64",
                                                f"{CLUSTER_V6_B}/64"))):
                for address in addresses:
                    run("ip", "-n", ns, "addr", "add", address, "dev", "eth0", "nodad")
                run("ip", "-n", ns, "link", "set", "eth0", "up")
            run("ip", "-n", pod_ns, "route", "add", "10.96.0.0/16", "via", CLUSTER_V4)
            run("ip", "-n", pod_ns, "-6", "route", "add", "fd00:96::/112", "via", CLUSTER_V6_A)

            cluster = Cluster(cluster_ns)
            await cluster.start()
            # In the pod: the app behind the inbound listener, and a loopback-only server.
            app_seen: list[dict[str, str]] = []

            async def app(request: web.Request) -> web.Response:
                app_seen.append({"remote": request.remote or "",
                                 "xff": request.headers.get("X-Forwarded-For", "")})
                return web.Response(text=f"app {request.path}")

            app_sock = listen_in(pod_ns, "127.0.0.1")
            app_runner = await serve_http(app_sock, app)
            loopback_sock = listen_in(pod_ns, "::1")
            loopback_port = loopback_sock.getsockname()[1]
            loopback_server = await start_echo(
                loopback_sock, cluster.echo_peers.setdefault(loopback_port, []))

            outbound, inbound, admin = (free_port_in(pod_ns, "127.0.0.1") for _ in range(3))
            ports = ["--outbound-port", str(outbound), "--inbound-port", str(inbound),
                     "--proxy-uid", "1337", "--proxy-gid", str(PROXY_GID),
                     "--exclude-inbound-ports", str(admin),
                     "--exclude-outbound-ports", str(cluster.excluded_port)]
            init = init_in(pod_ns, *ports)
            assert init.returncode == 0, init.stderr
            token = tmp_path / "token"
            token.write_text(cluster.api.token)
            pod = Pod(pod_ns, admin, loopback_port, ports, init.stdout + init.stderr, app_seen)
            pod.sidecar = PodSidecar(
                pod_ns, ["--outbound", f"0.0.0.0:{outbound}", "--inbound", f"0.0.0.0:{inbound}",
                         "--app", f"http://127.0.0.1:{app_sock.getsockname()[1]}",
                         "--admin", f"0.0.0.0:{admin}", "--id", "pod6", "--drain-timeout", "1",
                         "--transparent", "--discovery", "--kube-api", cluster.api.url,
                         "--kube-token-file", str(token)],
                tmp_path / "sidecar.log", gid=PROXY_GID)

            async def ready() -> bool:
                return ((await pod.admin("/readyz")).status == 200
                        and await pod.has_endpoints("users.default.80"))

            await pod.sidecar.wait_ready(ready)
            yield pod, cluster
        finally:
            if pod is not None and pod.sidecar is not None:
                pod.sidecar.stop()
            if loopback_server is not None:
                loopback_server.close()
            if app_runner is not None:
                await app_runner.cleanup()
            if cluster is not None:
                await cluster.stop()


async def echo_once(namespace: str, host: str, port: int, text: bytes) -> tuple[str, int]:
    """One line through a plain connection; returns the app side's (address, port)."""
    reader, writer = await connect_in(namespace, host, port)
    try:
        writer.write(text + b"\n")
        async with asyncio.timeout(5):
            assert await reader.readline() == b"echo:" + text + b"\n"
        return writer.get_extra_info("sockname")[:2]
    finally:
        writer.close()


async def test_an_apps_ipv6_connections_go_through_the_sidecar_to_their_destination(
    world: tuple[Pod, Cluster],
) -> None:
    pod, cluster = world
    assert "IPv6: intercepted" in pod.init_output
    assert re.search(r"(\d+) rules installed for IPv4 and \1 for IPv6", pod.init_output)

    # 1. HTTP to the Service's IPv6 cluster IP: only ip6tables can deliver it, to the sidecar,
    # which pins it to the Service port's group and picks an IPv6 endpoint. Host untouched.
    answers = [await http_in(pod.namespace, SERVICE_V6, 80, f"/v6/{i}") for i in range(4)]
    assert [a.status for a in answers] == [200] * 4
    assert {a.headers["x-backend"] for a in answers} <= {"users-a", "users-b"}
    assert answers[0].body.endswith(b"/v6/0")
    assert cluster.seen_hosts == Counter({f"[{SERVICE_V6}]": 4})
    # ...and the same Service's IPv4 cluster IP through the same sidecar (dual-stack).
    v4 = await http_in(pod.namespace, SERVICE_V4, 80, "/v4")
    assert (v4.status, v4.body[-3:]) == (200, b"/v4")
    assert await pod.metric(CONNECTIONS, route="service") == 5

    # 2. An IPv6 pod address (no Service): a byte relay. The echo server's peer is the
    # sidecar's own connection from the pod's address, not the app's socket.
    app_side = await echo_once(pod.namespace, CLUSTER_V6_A, cluster.echo_port, b"ping6")
    (peer,) = cluster.echo_peers[cluster.echo_port]
    assert peer[0] == POD_V6 and peer != app_side
    # 3. The Service's opaque IPv6 port: relayed to the cluster IP, where kube-proxy DNATs.
    await echo_once(pod.namespace, SERVICE_V6, TCP_PORT, b"opaque")
    assert len(cluster.echo_peers[cluster.echo_port]) == 2
    assert await pod.metric(CONNECTIONS, route="passthrough") == 2

    # 4. Exempt: an excluded destination port, and ::1. The servers see the app's own socket
    # and the sidecar never sees the connections.
    app_side = await echo_once(pod.namespace, CLUSTER_V6_A, cluster.excluded_port, b"excl")
    assert cluster.echo_peers[cluster.excluded_port] == [app_side]
    app_side = await echo_once(pod.namespace, "::1", pod.loopback_port, b"local")
    assert cluster.echo_peers[pod.loopback_port] == [app_side]
    assert await pod.metric(CONNECTIONS, route="passthrough") == 2
    # The sidecar's own IPv6 connections (endpoints, the API watch) were never redirected.
    assert await pod.metric(CONNECTIONS, route="direct") == 0
    assert await pod.metric("equilibrium_passthrough_failures_total", reason="loop") == 0

    # 5. Inbound over IPv6: a client in the cluster dials the pod's IPv6 address on a port
    # where nothing listens; ip6tables sends it to the inbound listener's [::] side, which
    # forwards it to the app, naming the real client. The admin port is excluded: reached
    # directly, over IPv6, as a kubelet probe of an IPv6 pod would.
    inbound = await http_in(cluster.namespace, POD_V6, 8080, "/hello")
    assert (inbound.status, inbound.body) == (200, b"app /hello")
    assert [seen["remote"] for seen in pod.app_seen] == ["127.0.0.1"]  # from the sidecar
    assert pod.app_seen[0]["xff"] in (CLUSTER_V6_A, CLUSTER_V6_B)  # the cluster's client
    assert await pod.metric("equilibrium_inbound_requests_total") == 1
    probe = await http_in(cluster.namespace, POD_V6, pod.admin_port, "/readyz")
    assert probe.status == 200
    assert await pod.metric("equilibrium_inbound_requests_total") == 1

    # 6. Init again (a restarted init container): one copy of every rule, and still working.
    before = {save: our_rules(pod.namespace, save) for save in ("iptables-save",
                                                               "ip6tables-save")}
    assert len(before["ip6tables-save"]) == len(before["iptables-save"]) >= 12
    again = init_in(pod.namespace, *pod.init_args)
    assert again.returncode == 0, again.stderr
    assert {save: our_rules(pod.namespace, save) for save in before} == before
    after = await http_in(pod.namespace, SERVICE_V6, 80, "/again")
    assert after.status == 200

    # 7. One relay per family open at once: the IPv4 socket and its [::] twin share one
    # gauge and one drain. SIGTERM closes both after the drain timeout; the sidecar exits 0.
    relays = [await connect_in(pod.namespace, host, port)
              for host, port in ((CLUSTER_V6_A, cluster.echo_port),
                                 (CLUSTER_V4, cluster.echo_v4_port))]
    for reader, writer in relays:
        writer.write(b"hold\n")
        async with asyncio.timeout(5):
            assert await reader.readline() == b"echo:hold\n"
    assert await pod.metric("equilibrium_passthrough_open") == 2
    assert pod.process is not None
    pod.process.send_signal(signal.SIGTERM)
    for reader, writer in relays:
        async with asyncio.timeout(10):
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read() == b""
        writer.close()
    assert await asyncio.to_thread(pod.process.wait, 10) == 0


def test_init_decides_ipv6_from_the_namespace_and_flags() -> None:
    """Detection and flags in a bare namespace, each case checked against the real tables."""
    require_tools("ip6tables", "ip6tables-save")
    with namespaces("eq6-init") as (ns,):
        run("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        run("ip", "-n", ns, "addr", "add", "fd00:202::1/64", "dev", "eth0", "nodad")
        run("ip", "-n", ns, "link", "set", "eth0", "up")

        def installed() -> tuple[int, int]:
            return len(our_rules(ns, "iptables-save")), len(our_rules(ns, "ip6tables-save"))

        # A failing ip6tables: reported and skipped by default (the pod still starts with
        # IPv4 interception), fatal with --ipv6; nothing half-installed either way.
        done = init_in(ns, "--ip6tables", "false")
        assert done.returncode == 0, done.stderr
        assert "IPv6: `false -t nat -N EQUILIBRIUM_INBOUND` failed (1)" in done.stderr
        assert "NOT intercepted" in done.stderr and "for IPv4 (" in done.stdout
        v4_rules = installed()[0]
        assert installed() == (v4_rules, 0) and v4_rules >= 12
        done = init_in(ns, "--ipv6", "--ip6tables", "false")
        assert done.returncode == 1
        assert "IPv6: `false -t nat -N EQUILIBRIUM_INBOUND` failed (1)" in done.stderr

        # --no-ipv6 leaves IPv6 alone; --cleanup removes both families.
        run("ip", "netns", "exec", ns, "ip6tables", "-t", "nat", "-N", "EQUILIBRIUM_OUTPUT")
        done = init_in(ns, "--no-ipv6")
        assert done.returncode == 0, done.stderr
        assert "IPv6: not intercepted (--no-ipv6)" in done.stdout
        assert installed() == (v4_rules, 1)
        assert init_in(ns, "--cleanup").returncode == 0
        assert installed() == (0, 0)

        # IPv6 on eth0 but not on lo: a redirect could not land on ::1. Not intercepted, said
        # loudly; the IPv4 rules are installed.
        run("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv6.conf.lo.disable_ipv6=1")
        done = init_in(ns)
        assert done.returncode == 0, done.stderr
        assert "IPv6: NOT intercepted: IPv6 is on (eth0 fd00:202::1" in done.stderr
        assert "lo has no ::1" in done.stderr and "bypasses the sidecar" in done.stderr
        assert installed() == (v4_rules, 0)

        # IPv6 off on every interface: nothing can bypass, so a plain note.
        run("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1")
        done = init_in(ns)
        assert done.returncode == 0, done.stderr
        assert "IPv6: not intercepted: IPv6 is disabled on every interface" in done.stdout
        assert done.stderr == ""
        assert installed() == (v4_rules, 0)
