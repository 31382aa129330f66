"""Transparent interception for real: a pod's network namespace, `equilibrium init`, the sidecar.

Topology (two network namespaces this test creates and always deletes; nothing else is touched,
no traffic leaves them)::

    "pod" namespace                              "cluster" namespace
    app (this test, uid 0)   veth 10.200.0.1 <-> veth 10.200.0.2, 10.200.0.3
    sidecar (gid 1337)       route 10.96.0.0/16 (Service IPs) via 10.200.0.2
      outbound 0.0.0.0:O                         users pods    10.200.0.2:P, 10.200.0.3:P
      admin    127.0.0.1:A                       metrics pod   10.200.0.2:M
    iptables nat from `equilibrium init`         an echo server (not a Service) 10.200.0.2:E
                                                 a server-first "banner" server 10.200.0.2:B
                                                 the Kubernetes API stand-in   10.200.0.2:K
                                                 "kube-proxy": DNAT 10.96.0.10:7000 -> E,
                                                               10.96.0.10:2525 -> B

The app dials the Service's cluster IP 10.96.0.10 with no proxy settings at all; nothing
listens on that address, so only the init rules can make the connection work: they send it to
the sidecar, which recovers the original destination and routes it to the Service's endpoints
(found through the EndpointSlice watch). A destination that is no Service, or a Service port
that does not speak HTTP/1.1 (named ``tcp-*``, or silent until the server speaks first),
passes through as a TCP relay -- to kube-proxy, played by a DNAT rule in the cluster namespace.

The sidecar runs with GID 1337 and UID 0: the interpreter lives under /root (mode 0700), which
UID 1337 cannot reach, and the init rules exempt the proxy's GID as well as its UID, so the GID
is what keeps the sidecar's own connections from being redirected here.

A last test reads original destinations of IPv4 and IPv6 redirects directly (no sidecar).

Sockets of the app, the backends and the API server are made inside the namespaces by
switching this thread's network namespace (``setns``) just for the ``socket()``/``bind()``
calls; they are then served and used from the test's event loop. Needs root, ``ip``
(iproute2), ``iptables`` and ``setpriv``: a missing one fails the test with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest

from sidecar.original_dst import original_dst, redirected_to
from tests.integration.kube_api import endpoint_slice, service
from tests.integration.netns import (
    ClusterServers,
    PodAdmin,
    PodSidecar,
    connect_in,
    free_port_in,
    http_in,
    init_in,
    inside,
    listen_in,
    namespaces,
    require_tools,
    run,
    serve_http,
    start_echo,
)
from tests.integration.procs import rss_bytes

POD_IP, CLUSTER_IP_A, CLUSTER_IP_B = "10.200.0.1", "10.200.0.2", "10.200.0.3"
SERVICE_IP = "10.96.0.10"  # the "users" Service's cluster IP: exists only in the init rules
TCP_PORT, BANNER_PORT = 7000, 2525  # the Service's non-HTTP ports (opaque, server-first)
GRPC_PORT = 50051  # the Service's h2c port (named grpc: sniffed, h2c routed per stream)
BULK_MIB = 64
PROXY_GID = 1337


# ---------------------------------------------------------------- the pod and the cluster


@dataclass
class Cluster(ClusterServers):
    """Servers in the cluster namespace, run by this test's event loop."""

    echo_peers: list[tuple[str, int]] = field(default_factory=list)
    users_port: int = 0
    metrics_port: int = 0
    echo_port: int = 0
    banner_port: int = 0
    sink_port: int = 0
    h2_port: int = 0

    async def serve_named(self, name: str, sock: socket.socket) -> None:
        self.runners.append(await serve_http(sock, self.users_handler(name)))

    async def start(self) -> None:
        ns = self.namespace
        users_a = listen_in(ns, CLUSTER_IP_A)
        self.users_port = users_a.getsockname()[1]
        users_b = listen_in(ns, CLUSTER_IP_B, self.users_port)  # a fresh namespace: free
        metrics = listen_in(ns, CLUSTER_IP_A)
        self.metrics_port = metrics.getsockname()[1]
        await self.serve_named("users-a", users_a)
        await self.serve_named("users-b", users_b)
        await self.serve_named("users-metrics", metrics)

        echo_sock = listen_in(ns, CLUSTER_IP_A)
        self.echo_port = echo_sock.getsockname()[1]
        self.servers.append(await start_echo(echo_sock, self.echo_peers))

        async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            total = 0  # counts what arrives until EOF, then says how much
            while chunk := await reader.read(65536):
                total += len(chunk)
            writer.write(f"{total}\n".encode())
            await writer.drain()
            writer.close()

        sink_sock = listen_in(ns, CLUSTER_IP_A)
        self.sink_port = sink_sock.getsockname()[1]
        self.servers.append(await asyncio.start_server(sink, sock=sink_sock))

        async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"220 banner ready\r\n")  # the server speaks first, as SMTP does
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while line := await reader.readline():
                    writer.write(b"250 " + line)
                    await writer.drain()
            writer.close()

        loop = asyncio.get_running_loop()
        h2_a = listen_in(ns, CLUSTER_IP_A)
        self.h2_port = h2_a.getsockname()[1]
        h2_b = listen_in(ns, CLUSTER_IP_B, self.h2_port)
        for name, sock in (("users-a", h2_a), ("users-b", h2_b)):
            self.servers.append(await loop.create_server(
                lambda name=name: H2Backend(name), sock=sock))  # type: ignore[misc]

        banner_sock = listen_in(ns, CLUSTER_IP_A)
        self.banner_port = banner_sock.getsockname()[1]
        self.servers.append(await asyncio.start_server(banner, sock=banner_sock))
        # kube-proxy's part for the ports the sidecar does not route: DNAT the Service IP.
        for service_port, target in ((TCP_PORT, self.echo_port),
                                     (BANNER_PORT, self.banner_port)):
            run("ip", "netns", "exec", ns, "iptables", "-t", "nat", "-A", "PREROUTING",
                "-d", SERVICE_IP, "-p", "tcp", "--dport", str(service_port),
                "-j", "DNAT", "--to-destination", f"{CLUSTER_IP_A}:{target}")

        self.api.put("services", service(
            "users", "default", SERVICE_IP,
            [("http", 80), ("metrics", 9090), ("tcp-echo", TCP_PORT), ("banner", BANNER_PORT),
             ("grpc", GRPC_PORT)]))
        self.api.put("endpointslices", self.users_slice([CLUSTER_IP_A, CLUSTER_IP_B]))
        await self.api.start(sock=listen_in(ns, CLUSTER_IP_A))

    def users_slice(self, addresses: list[str]) -> dict[str, object]:
        return endpoint_slice("users-x1", "default", "users",
                              [("http", self.users_port), ("metrics", self.metrics_port),
                               ("tcp-echo", self.echo_port), ("banner", self.banner_port),
                               ("grpc", self.h2_port)],
                              addresses)


class H2Backend(asyncio.Protocol):
    """A ``users`` pod speaking prior-knowledge h2c (the ``h2`` library's server side):
    answers every request ``NAME PATH`` with ``x-backend: NAME``."""

    def __init__(self, name: str) -> None:
        self.name = name.encode()
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None))
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                path = dict(event.headers)[b":path"]
                body = self.name + b" " + path
                self.conn.send_headers(event.stream_id, [
                    (b":status", b"200"), (b"x-backend", self.name),
                    (b"content-length", b"%d" % len(body))])
                self.conn.send_data(event.stream_id, body, end_stream=True)
            elif isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                    event.stream_id)
        assert self.transport is not None
        self.transport.write(self.conn.data_to_send())


async def h2c_get_in(namespace: str, host: str, port: int, paths: list[str],
                     authority: str) -> list[dict[bytes, bytes]]:
    """GET each path as a stream of ONE prior-knowledge h2c connection (all at once, as a gRPC
    channel multiplexes its calls), made from ``namespace`` with no proxy configured; the
    answers' headers (with ``body``) in order."""
    reader, writer = await connect_in(namespace, host, port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None))
    conn.initiate_connection()
    answers: dict[int, dict[bytes, bytes]] = {}
    ids = []
    for path in paths:
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, [(b":method", b"GET"), (b":scheme", b"http"),
                                      (b":path", path.encode()),
                                      (b":authority", authority.encode())], end_stream=True)
        answers[stream_id] = {b"body": b""}
        ids.append(stream_id)
    writer.write(conn.data_to_send())
    ended: set[int] = set()
    try:
        async with asyncio.timeout(10):
            while len(ended) < len(ids):
                data = await reader.read(65536)
                assert data, "the connection closed before every answer"
                for event in conn.receive_data(data):
                    sid = getattr(event, "stream_id", 0)
                    if isinstance(event, h2.events.ResponseReceived):
                        answers[sid].update(event.headers)
                    elif isinstance(event, h2.events.DataReceived):
                        answers[sid][b"body"] += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, sid)
                    elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                        ended.add(sid)
                writer.write(conn.data_to_send())
    finally:
        writer.close()
    return [answers[sid] for sid in ids]


@dataclass
class Pod(PodAdmin):
    namespace: str
    outbound_port: int
    admin_port: int
    sidecar: PodSidecar | None = None

    def output(self) -> str:
        return self.sidecar.output() if self.sidecar is not None else ""

    async def endpoints(self, upstream: str) -> list[str]:
        import json

        state = json.loads((await self.admin("/debug/state")).body)
        return [e["endpoint"] for e in state["upstreams"].get(upstream, {}).get("endpoints", [])]


@pytest.fixture
async def world(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Pod, Cluster]]:
    """The two namespaces, the cluster's servers, init rules, and the sidecar in the pod.

    Indirect parameter ``exempt`` (default True): False runs the sidecar as plain root, whose
    own connections the init rules then redirect back to it (a misconfigured pod).
    """
    require_tools()
    exempt = getattr(request, "param", True)
    cluster: Cluster | None = None
    pod: Pod | None = None
    with namespaces("eq-pod", "eq-cluster") as (pod_ns, cluster_ns):
        try:
            # The veth pair is created inside the pod namespace with its peer in the cluster's.
            run("ip", "-n", pod_ns, "link", "add", "eth0", "type", "veth",
                "peer", "name", "eth0", "netns", cluster_ns)
            run("ip", "-n", pod_ns, "addr", "add", f"{POD_IP}/24", "dev", "eth0")
            run("ip", "-n", cluster_ns, "addr", "add", f"{CLUSTER_IP_A}/24", "dev", "eth0")
            run("ip", "-n", cluster_ns, "addr", "add", f"{CLUSTER_IP_B}/24", "dev", "eth0")
            for ns in (pod_ns, cluster_ns):
                run("ip", "-n", ns, "link", "set", "eth0", "up")
            run("ip", "-n", pod_ns, "route", "add", "10.96.0.0/16", "via", CLUSTER_IP_A)

            cluster = Cluster(cluster_ns)
            await cluster.start()
            outbound, admin, inbound = (free_port_in(pod_ns, "127.0.0.1") for _ in range(3))
            init = init_in(pod_ns, "--outbound-port", str(outbound), "--inbound-port",
                           str(inbound), "--proxy-uid", "1337", "--proxy-gid", str(PROXY_GID),
                           "--exclude-inbound-ports", str(admin))
            assert init.returncode == 0, init.stderr
            token = tmp_path / "token"
            token.write_text(cluster.api.token)
            pod = Pod(pod_ns, outbound, admin)
            discovery = ["--discovery", "--kube-api", cluster.api.url,
                         "--kube-token-file", str(token)] if exempt else []
            pod.sidecar = PodSidecar(
                pod_ns, ["--outbound", f"0.0.0.0:{outbound}", "--admin", f"127.0.0.1:{admin}",
                         "--id", "pod-sidecar", "--drain-timeout", "1", "--transparent",
                         *discovery],
                tmp_path / "sidecar.log", gid=PROXY_GID if exempt else None)

            async def ready() -> bool:
                return ((await pod.admin("/readyz")).status == 200
                        and (not exempt or bool(await pod.endpoints("users.default.80"))))

            await pod.sidecar.wait_ready(ready)
            yield pod, cluster
        finally:
            if pod is not None and pod.sidecar is not None:
                pod.sidecar.stop()
            if cluster is not None:
                await cluster.stop()


async def test_app_calls_a_service_ip_and_the_sidecar_routes_it_to_the_endpoints(
    world: tuple[Pod, Cluster],
) -> None:
    pod, cluster = world
    # No proxy anywhere: the app just dials the Service IP. 6 connections, 6 answers.
    answers = [await http_in(pod.namespace, SERVICE_IP, 80, f"/users/{i}") for i in range(6)]
    assert {a.status for a in answers} == {200}
    assert {a.headers["x-backend"] for a in answers} <= {"users-a", "users-b"}
    assert answers[0].body.startswith(b"users-") and answers[0].body.endswith(b"/users/0")
    assert cluster.seen_hosts == Counter({SERVICE_IP: 6})  # Host went on untouched
    # The other port of the same Service IP is another group: its own endpoints.
    metrics = await http_in(pod.namespace, SERVICE_IP, 9090, "/metrics", host_header="users")
    assert (metrics.status, metrics.headers["x-backend"]) == (200, "users-metrics")
    # The same sidecar still serves an app that uses it on purpose (HTTP_PROXY style): by Host,
    # whose port picks the Service port.
    direct = await http_in(pod.namespace, "127.0.0.1", pod.outbound_port, "/", "users")
    assert (direct.status, direct.headers["x-backend"][:6]) == (200, "users-")
    direct = await http_in(pod.namespace, "127.0.0.1", pod.outbound_port, "/", "users:9090")
    assert (direct.status, direct.headers["x-backend"]) == (200, "users-metrics")

    # An EndpointSlice update: 10.200.0.2 leaves the Service; the sidecar follows the watch.
    cluster.api.put("endpointslices", cluster.users_slice([CLUSTER_IP_B]))
    async with asyncio.timeout(10):
        while await pod.endpoints("users.default.80") != [f"http://{CLUSTER_IP_B}:"
                                                           f"{cluster.users_port}"]:
            await asyncio.sleep(0.05)
    later = [await http_in(pod.namespace, SERVICE_IP, 80, "/again") for _ in range(5)]
    assert [(a.status, a.headers["x-backend"]) for a in later] == [(200, "users-b")] * 5

    connections = "equilibrium_transparent_connections_total"
    assert await pod.metric(connections, route="service") == 12
    assert await pod.metric(connections, route="direct") == 2
    # The sidecar's own upstream and API connections were never redirected back to itself.
    assert await pod.metric(connections, route="passthrough") == 0

    # HTTP/1.1 on a redirected connection is the sidecar's own server, with the listener's
    # defences: a request llhttp refuses is answered 400 and counted
    reader, writer = await connect_in(pod.namespace, SERVICE_IP, 80)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n")
    async with asyncio.timeout(10):
        raw = await reader.read()
    writer.close()
    assert raw.startswith(b"HTTP/1.1 400")
    assert await pod.metric("equilibrium_http1_rejected_requests_total", reason="malformed") == 1


async def test_what_is_not_a_services_http_passes_through_untouched(
    world: tuple[Pod, Cluster],
) -> None:
    pod, cluster = world
    # 1. No Service at all (a pod IP): a byte relay to the original destination.
    reader, writer = await connect_in(pod.namespace, CLUSTER_IP_A, cluster.echo_port)
    app_side = writer.get_extra_info("sockname")[:2]
    writer.write(b"ping\n")
    writer.write(b"\x00\xffbinary\n")
    async with asyncio.timeout(5):
        assert await reader.readline() == b"echo:ping\n"
        assert await reader.readline() == b"echo:\x00\xffbinary\n"
    writer.write_eof()  # half-close travels through the relay; the server closes in turn
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()
    # The echo server saw a different connection than the app made: the sidecar's relay.
    assert len(cluster.echo_peers) == 1
    assert cluster.echo_peers[0][0] == POD_IP and cluster.echo_peers[0] != app_side

    # 2. A destination where nothing listens: the app's connection is reset (as its own
    # connect would have been refused), never ended cleanly as if the server had closed it.
    dead = free_port_in(cluster.namespace, CLUSTER_IP_A)
    async with asyncio.timeout(5):
        with pytest.raises(ConnectionResetError):  # at once, or at the first read
            reader, writer = await connect_in(pod.namespace, CLUSTER_IP_A, dead)
            try:
                await reader.read()
            finally:
                writer.close()

    # 2b. A destination whose first SYN is lost: the sidecar waits as the app would have
    # (10 s at least), the kernel sends the SYN again after 1 s, and the relay works. (It
    # gave up after the profile's 1 s connect timeout and ended the app's connection.)
    drop = ["INPUT", "-p", "tcp", "--dport", str(cluster.echo_port), "--syn", "-m",
            "statistic", "--mode", "nth", "--every", "2", "--packet", "0", "-j", "DROP"]
    run("ip", "netns", "exec", cluster.namespace, "iptables", "-I", *drop)
    try:
        for _ in range(2):  # one of the two connections loses its first SYN
            reader, writer = await connect_in(pod.namespace, CLUSTER_IP_A, cluster.echo_port)
            writer.write(b"again\n")
            async with asyncio.timeout(5):
                assert await reader.readline() == b"echo:again\n"
            writer.close()
    finally:
        run("ip", "netns", "exec", cluster.namespace, "iptables", "-D", *drop)
    del cluster.echo_peers[1:]  # the two above: not what the steps below count

    # 3. A Service port named tcp-*: opaque, relayed to the Service IP (kube-proxy's DNAT).
    reader, writer = await connect_in(pod.namespace, SERVICE_IP, TCP_PORT)
    writer.write(b"\x16\x03\x01 not http\n")
    async with asyncio.timeout(5):
        assert await reader.readline() == b"echo:\x16\x03\x01 not http\n"
    writer.close()
    assert len(cluster.echo_peers) == 2

    # 4. A Service port without a protocol hint whose server speaks first: the sidecar waits
    # for the app's first bytes, hears nothing, and relays; the greeting arrives.
    reader, writer = await connect_in(pod.namespace, SERVICE_IP, BANNER_PORT)
    async with asyncio.timeout(5):
        assert await reader.readline() == b"220 banner ready\r\n"
        writer.write(b"HELO app\r\n")
        assert await reader.readline() == b"250 HELO app\r\n"
    writer.close()
    # ...while on a port without a hint whose client sends HTTP, the mesh routes it.
    metrics = await http_in(pod.namespace, SERVICE_IP, 9090, "/m")
    assert (metrics.status, metrics.headers["x-backend"]) == (200, "users-metrics")

    connections = "equilibrium_transparent_connections_total"
    assert await pod.metric(connections, route="passthrough") == 6
    assert await pod.metric(connections, route="service") == 1
    assert await pod.metric("equilibrium_passthrough_failures_total",
                            reason="refused-or-unreachable") == 1
    assert await pod.metric("equilibrium_passthrough_bytes_total", direction="to-destination") \
        == len(b"ping\n\x00\xffbinary\n" + 2 * b"again\n" + b"\x16\x03\x01 not http\n"
               + b"HELO app\r\n")

    # 5. A bulk upload through the relay arrives whole, and flow control keeps the sidecar's
    # memory flat: its peak RSS grows by far less than what passed through it.
    assert pod.process is not None
    peak_before = rss_bytes(pod.process.pid, peak=True)
    reader, writer = await connect_in(pod.namespace, CLUSTER_IP_A, cluster.sink_port)
    block = bytes(range(256)) * 4096  # 1 MiB
    for _ in range(BULK_MIB):
        writer.write(block)
        await writer.drain()
    writer.write_eof()
    async with asyncio.timeout(30):
        assert await reader.readline() == f"{BULK_MIB * len(block)}\n".encode()
    writer.close()
    growth = rss_bytes(pod.process.pid, peak=True) - peak_before
    assert growth < BULK_MIB * len(block) // 4, f"peak RSS grew {growth} bytes"

    # 6. SIGTERM with a relay still open: it gets the drain timeout (1 s), then is closed, and
    # the sidecar exits cleanly.
    reader, writer = await connect_in(pod.namespace, CLUSTER_IP_A, cluster.echo_port)
    writer.write(b"still here\n")
    async with asyncio.timeout(5):
        assert await reader.readline() == b"echo:still here\n"
    assert await pod.metric("equilibrium_passthrough_open") == 1
    assert pod.process is not None
    pod.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(10):
        with contextlib.suppress(ConnectionResetError):
            assert await reader.read() == b""
    writer.close()
    assert await asyncio.to_thread(pod.process.wait, 10) == 0


async def test_h2c_to_a_service_ip_is_routed_per_stream_not_passed_through(
    world: tuple[Pod, Cluster],
) -> None:
    pod, _ = world
    async with asyncio.timeout(10):  # the grpc port's group comes with the same Service
        while not await pod.endpoints(f"users.default.{GRPC_PORT}"):
            await asyncio.sleep(0.05)
    # One h2c connection to the Service's cluster IP, 24 streams on it: the sidecar routes
    # each stream on its own, pinned to that Service port, so both pods answer.
    paths = [f"/call/{i}" for i in range(24)]
    answers = await h2c_get_in(pod.namespace, SERVICE_IP, GRPC_PORT, paths, "anything")
    assert [a[b":status"] for a in answers] == [b"200"] * len(paths)
    assert [a[b"body"].split(b" ")[1] for a in answers] == [p.encode() for p in paths]
    assert {a[b"x-backend"] for a in answers} == {b"users-a", b"users-b"}
    # An app that dials the listener itself with h2c is routed by :authority.
    direct = await h2c_get_in(pod.namespace, "127.0.0.1", pod.outbound_port, ["/d"],
                              f"users:{GRPC_PORT}")
    assert direct[0][b":status"] == b"200" and direct[0][b"body"].endswith(b" /d")

    assert await pod.metric("equilibrium_outbound_connections_total", protocol="h2c") == 2
    connections = "equilibrium_transparent_connections_total"
    assert await pod.metric(connections, route="service") == 1
    assert await pod.metric(connections, route="direct") == 1
    assert await pod.metric(connections, route="passthrough") == 0


@pytest.mark.parametrize("world", [False], indirect=True, ids=["sidecar-not-exempt"])
async def test_a_sidecar_whose_own_traffic_is_redirected_refuses_to_loop(
    world: tuple[Pod, Cluster],
) -> None:
    pod, cluster = world
    reader, writer = await connect_in(pod.namespace, CLUSTER_IP_A, cluster.echo_port)
    writer.write(b"ping\n")
    async with asyncio.timeout(5):
        with contextlib.suppress(ConnectionResetError):
            assert await reader.read() == b""  # cut, instead of relaying to itself forever
    writer.close()
    assert cluster.echo_peers == []
    assert await pod.metric("equilibrium_passthrough_failures_total", reason="loop") == 1
    # The app's connection was relayed once; the hop that came back was refused, not relayed.
    assert await pod.metric("equilibrium_transparent_connections_total",
                            route="passthrough") == 1
    assert "being redirected" in pod.output()


def test_original_destination_is_read_for_ipv4_and_ipv6_redirects() -> None:
    """SO_ORIGINAL_DST and IP6T_SO_ORIGINAL_DST on real NAT records, incl. an IPv4 client on
    a dual-stack listener (the IPv6 query fails, the IPv4 one answers)."""
    require_tools()
    with namespaces("eq-odst") as (namespace,):
        for cmd in (["link", "add", "v0", "type", "veth", "peer", "name", "v1"],
                    ["addr", "add", "10.9.0.1/24", "dev", "v0"],
                    ["addr", "add", "fd00:9::1/64", "dev", "v0", "nodad"],
                    ["link", "set", "v0", "up"], ["link", "set", "v1", "up"]):
            run("ip", "-n", namespace, *cmd)
        with inside(namespace):
            listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        with listener:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            listener.bind(("::", 0))
            listener.listen(4)
            port = str(listener.getsockname()[1])
            for binary, dst in (("iptables", "10.9.0.10"), ("ip6tables", "fd00:9::10")):
                run("ip", "netns", "exec", namespace, binary, "-t", "nat", "-A", "OUTPUT",
                    "-p", "tcp", "-d", dst, "--dport", "8443", "-j", "REDIRECT",
                    "--to-ports", port)
            seen = []
            for family, dst in ((socket.AF_INET, "10.9.0.10"), (socket.AF_INET6, "fd00:9::10")):
                with inside(namespace):
                    client = socket.socket(family, socket.SOCK_STREAM)
                with client:
                    client.settimeout(5)
                    client.connect((dst, 8443))  # nothing there: only the rule answers
                    accepted, _ = listener.accept()
                    with accepted:
                        seen.append(original_dst(accepted))
                        assert redirected_to(accepted) == seen[-1]
        assert seen == [("10.9.0.10", 8443), ("fd00:9::10", 8443)]
