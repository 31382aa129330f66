"""Network namespaces for the interception tests: commands, and sockets made inside them.

Sockets of apps, backends and API stand-ins are created inside a namespace by switching this
thread's network namespace (``setns``) just for the ``socket()`` call; they are then bound,
served and used from the test's event loop. Hosts with a ``:`` are IPv6. Needs root and
iproute2; ``require_tools`` fails the test with the reason when something is missing.

Also what both interception tests do with processes in a namespace: :func:`namespaces` (made
and always deleted), :func:`init_in` (``equilibrium init`` as the init container runs it), and
:class:`PodSidecar` (an ``equilibrium sidecar`` started there, waited for, stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from tests.environment import require
from tests.integration.kube_api import KubeApiServer
from tests.support import REPO_ROOT, child_env, metric_value

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def require_tools(*tools: str) -> None:
    """Root, ``ip``, ``iptables`` and ``setpriv``, and ``tools``, through the one gate."""
    require("root", "ip", "iptables", "setpriv", *tools)


def run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def inside(namespace: str) -> Iterator[None]:
    """Sockets this thread creates meanwhile belong to ``namespace`` (no await inside!)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)
        os.close(target)


def listen_in(namespace: str, host: str, port: int = 0) -> socket.socket:
    with inside(namespace):
        sock = socket.socket(family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def free_port_in(namespace: str, host: str) -> int:
    with listen_in(namespace, host) as sock:
        return int(sock.getsockname()[1])


async def connect_in(
    namespace: str, host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain TCP connection made from ``namespace`` -- no proxy of any kind configured."""
    with inside(namespace):
        sock = socket.socket(family(host), socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(5):
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def http_in(namespace: str, host: str, port: int, path: str = "/",
                  host_header: str | None = None) -> Answer:
    """One HTTP/1.1 GET written by hand (``Connection: close``), as an app would send it."""
    reader, writer = await connect_in(namespace, host, port)
    try:
        default_host = f"[{host}]" if ":" in host else host
        head = (f"GET {path} HTTP/1.1\r\nHost: {host_header or default_host}\r\n"
                "Connection: close\r\n\r\n")
        writer.write(head.encode())
        async with asyncio.timeout(10):
            raw = await reader.read()
    finally:
        writer.close()
    header_block, _, body = raw.partition(b"\r\n\r\n")
    lines = header_block.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return Answer(int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body)


# ---------------------------------------------------------------- servers on those sockets


async def serve_http(
    sock: socket.socket, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.AppRunner:
    """``handler`` for every path and method on the listening ``sock``."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner


async def start_echo(sock: socket.socket, peers: list[tuple[str, int]]) -> asyncio.Server:
    """Echoes lines as ``echo:LINE`` on the listening ``sock``; appends each connection's peer
    (address, port) to ``peers``."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("peername")[:2])
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while line := await reader.readline():
                writer.write(b"echo:" + line)
                await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, sock=sock)


# ---------------------------------------------------------------- processes in a namespace


@contextlib.contextmanager
def namespaces(*prefixes: str) -> Iterator[list[str]]:
    """Fresh network namespaces ``PREFIX-TAG`` with ``lo`` up; deleted on exit (which takes
    their veth pairs and nat rules with them)."""
    tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
    created: list[str] = []
    try:
        for prefix in prefixes:
            name = f"{prefix}-{tag}"
            run("ip", "netns", "add", name)
            created.append(name)
            run("ip", "-n", name, "link", "set", "lo", "up")
        yield created
    finally:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


def init_in(namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``equilibrium init ARGS`` inside ``namespace``, as the init container runs it."""
    return subprocess.run(
        ["ip", "netns", "exec", namespace, sys.executable, "-m", "equilibrium", "init", *args],
        capture_output=True, text=True, timeout=30, env=child_env(POD_NAMESPACE="default"),
        cwd=REPO_ROOT, check=False)


class PodSidecar:
    """``equilibrium sidecar ARGS`` in ``namespace`` (as GID ``gid``, which the init rules
    exempt, unless None), its output in ``log_path``."""

    def __init__(self, namespace: str, args: Sequence[str], log_path: Path,
                 gid: int | None) -> None:
        self.log_path = log_path
        as_proxy = ["setpriv", f"--regid={gid}", "--clear-groups", "--"] if gid is not None else []
        with log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", namespace, *as_proxy,
                 sys.executable, "-m", "equilibrium", "sidecar", *args],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=child_env(POD_NAMESPACE="default"), cwd=REPO_ROOT,
            )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_ready(self, ready: Callable[[], Awaitable[bool]],
                         timeout: float = 20.0) -> None:
        """Poll ``ready()`` (connection errors count as not yet) until it is true; fail with
        the sidecar's output if it exits first (bounded by ``timeout``)."""
        async with asyncio.timeout(timeout):
            while True:
                assert self.process.poll() is None, f"sidecar exited:\n{self.output()}"
                with contextlib.suppress(OSError):
                    if await ready():
                        return
                await asyncio.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 10 s) if still running; remove the log."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        with contextlib.suppress(OSError):
            self.log_path.unlink()


# ---------------------------------------------------------------- what both tests' worlds share


@dataclass
class ClusterServers:
    """What a test's cluster namespace runs: the Kubernetes API stand-in (the sidecar's
    service account may read only its own namespace, as with a RoleBinding), HTTP runners and
    TCP servers; the ``users`` pods' handler, and stopping it all."""

    namespace: str
    api: KubeApiServer = field(
        default_factory=lambda: KubeApiServer(allowed_namespaces={"default"}))
    seen_hosts: Counter[str] = field(default_factory=Counter)
    runners: list[web.AppRunner] = field(default_factory=list)
    servers: list[asyncio.Server] = field(default_factory=list)

    def users_handler(self, name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        """A ``users`` pod: answers ``NAME PATH`` with ``X-Backend: NAME``, counts Hosts."""

        async def handle(request: web.Request) -> web.Response:
            self.seen_hosts[request.headers.get("Host", "")] += 1
            return web.Response(text=f"{name} {request.path}", headers={"X-Backend": name})

        return handle

    async def stop(self) -> None:
        await self.api.stop()
        for server in self.servers:
            server.close()
        for runner in self.runners:
            await runner.cleanup()


class PodAdmin:
    """Mixin of a test's pod: its sidecar's admin listener on 127.0.0.1 inside the pod."""

    namespace: str
    admin_port: int
    sidecar: PodSidecar | None

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self.sidecar.process if self.sidecar is not None else None

    async def admin(self, path: str) -> Answer:
        return await http_in(self.namespace, "127.0.0.1", self.admin_port, path)

    async def metric(self, name: str, **labels: str) -> float:
        return metric_value((await self.admin("/metrics")).body.decode(), name, **labels)
