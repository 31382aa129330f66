"""Real processes and servers on loopback for integration tests (no mocks of our own code).

Owns: free ports, starting any ``python -m equilibrium <subcommand>`` as a subprocess and
waiting for its readiness URL, stopping it (SIGTERM, then SIGKILL after a bound), reading
its output, the sidecar's admin endpoints, real aiohttp backends with configurable latency,
status and body, a raw TCP endpoint that resets every connection, and RSS from /proc.

Everything is bounded in time: waits raise ``TimeoutError`` with the process output attached.
Use from async tests (backends live in the test's event loop; process start/stop are
blocking but short, or use the ``async_*`` wrappers) or from sync code (the demo, benches).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from equilibrium.lab.processes import free_port
from tests.support import REPO_ROOT, child_env, metric_value
from wire.probe import PROBE_PATH

LOOPBACK = "127.0.0.1"


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """A blocking GET without any proxy from the environment; (status, body)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def rss_bytes(pid: int, peak: bool = False) -> int:
    """Resident set size (or its peak, VmHWM) of a process, from /proc."""
    key = "VmHWM:" if peak else "VmRSS:"
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} missing from /proc/{pid}/status")


# ---------------------------------------------------------------- equilibrium subprocesses


@dataclass
class EquilibriumProcess:
    """A running ``python -m equilibrium ...``; output goes to a temp file (no pipe stalls)."""

    args: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send_signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for exit; TimeoutError (with output) if it does not exit in time."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"{self.args} did not exit within {timeout}s; output:\n{self.output()}"
            ) from None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit code."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait(timeout=5)

    def cleanup(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait(timeout=5)
        with contextlib.suppress(OSError):
            self.log_path.unlink()

    def __enter__(self) -> EquilibriumProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.cleanup()


def wait_ready(url: str, proc: EquilibriumProcess | None = None, timeout: float = 20.0) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(
                f"{proc.args} exited with {proc.popen.returncode} before ready:\n{proc.output()}"
            )
        try:
            status, body = http_get(url, timeout=1.0)
            if status == 200:
                return
            last = f"{status} {body[:200]!r}"
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.05)
    output = proc.output() if proc is not None else ""
    raise TimeoutError(f"{url} not ready within {timeout}s (last: {last}); output:\n{output}")


def start_equilibrium(
    *args: str,
    env: Mapping[str, str] | None = None,
    ready_url: str | None = None,
    timeout: float = 20.0,
    cwd: Path | None = None,
) -> EquilibriumProcess:
    """Start ``python -m equilibrium ARGS``; wait for ``ready_url`` to answer 200 if given."""
    fd, log_name = tempfile.mkstemp(prefix="equilibrium-", suffix=".log")
    cmd = [sys.executable, "-m", "equilibrium", *args]
    with os.fdopen(fd, "wb") as log_file:
        popen = subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env(env),
            cwd=str(cwd or REPO_ROOT),
        )
    proc = EquilibriumProcess(cmd, popen, Path(log_name))
    if ready_url is not None:
        try:
            wait_ready(ready_url, proc, timeout)
        except BaseException:
            proc.stop(timeout=2)
            raise
    return proc


def run_equilibrium(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run a short-lived subcommand to completion; stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "equilibrium", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(env),
        cwd=str(REPO_ROOT),
        check=False,
    )


@dataclass
class SidecarProcess(EquilibriumProcess):
    """An ``equilibrium sidecar`` with its outbound and admin ports."""

    outbound_port: int = 0
    admin_port: int = 0

    @property
    def outbound_url(self) -> str:
        return f"http://{LOOPBACK}:{self.outbound_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    def state(self) -> dict[str, Any]:
        status, body = http_get(f"{self.admin_url}/debug/state")
        assert status == 200, body
        return dict(json.loads(body))

    def metrics_text(self) -> str:
        status, body = http_get(f"{self.admin_url}/metrics")
        assert status == 200, body
        return body.decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
        return metric_value(self.metrics_text(), name, **labels)

    def h2_engine(self) -> str:
        """The sidecar's HTTP/2 engine, as it says (``nghttp2`` or ``h2``)."""
        return "nghttp2" if self.metric("equilibrium_h2_engine", engine="nghttp2") else "h2"


def start_sidecar(
    upstreams: Mapping[str, Sequence[str]] | None = None,
    *,
    policy: str | None = None,
    strategy: str | None = None,
    sidecar_id: str | None = None,
    config_file: Path | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 20.0,
    outbound_port: int | None = None,
    admin_port: int | None = None,
) -> SidecarProcess:
    """Start ``equilibrium sidecar`` on loopback (free ports unless given); wait for /readyz.

    Free ports are free when chosen, not when the sidecar binds them: a process of another
    test worker may take one meanwhile (seen: the readiness probe answered by a gRPC pod's
    HTTP/2 server). Then the sidecar is started again on other ports, twice at most."""
    attempts = 1 if outbound_port or admin_port else 3
    for attempt in range(attempts):
        outbound, admin = outbound_port or free_port(), admin_port or free_port()
        args = ["sidecar", "--outbound", f"{LOOPBACK}:{outbound}",
                "--admin", f"{LOOPBACK}:{admin}"]
        for name, urls in (upstreams or {}).items():
            args += ["--upstream", f"{name}={','.join(urls)}"]
        for flag, value in (
            ("--policy", policy), ("--strategy", strategy), ("--id", sidecar_id),
            ("--config", str(config_file) if config_file else None),
        ):
            if value is not None:
                args += [flag, value]
        args += list(extra_args)
        proc = start_equilibrium(*args, env=env)
        sidecar = SidecarProcess(proc.args, proc.popen, proc.log_path, outbound, admin)
        try:
            wait_ready(f"{sidecar.admin_url}/readyz", sidecar, timeout)
            _outbound_listens(sidecar)
        except BaseException as exc:
            sidecar.stop(timeout=2)
            if attempt + 1 < attempts and _port_taken(exc):
                sidecar.cleanup()
                continue
            raise
        return sidecar
    raise AssertionError("unreachable")


class _NotOurs(RuntimeError):
    """The admin port answered ready, but the sidecar's outbound port refuses connections:
    another process (a sidecar of another test worker) answered on that admin port."""


def _outbound_listens(sidecar: SidecarProcess, within: float = 2.0) -> None:
    """A ready sidecar has bound its outbound listener; if it refuses connections for
    ``within`` seconds, the readiness was another process's (:class:`_NotOurs`: a CI run saw
    a test's first connection refused, and its sidecar killed while still starting)."""
    deadline = time.monotonic() + within
    while True:
        try:
            socket.create_connection((LOOPBACK, sidecar.outbound_port), timeout=1.0).close()
            return
        except ConnectionRefusedError:
            if time.monotonic() >= deadline:
                raise _NotOurs(f"port {sidecar.outbound_port} refuses connections after the "
                               f"admin port {sidecar.admin_port} answered ready") from None
            time.sleep(0.05)


def _port_taken(exc: BaseException) -> bool:
    """Whether a sidecar failed to start because another process had one of its ports: it
    could not bind, or something else answered its admin port (not in HTTP/1.1, or while
    this sidecar's outbound port refused connections)."""
    return isinstance(exc, http.client.HTTPException | _NotOurs) or (
        isinstance(exc, RuntimeError) and "address already in use" in str(exc).lower())


async def async_start_sidecar(
    upstreams: Mapping[str, Sequence[str]] | None = None, **kwargs: Any
) -> SidecarProcess:
    """``start_sidecar`` without blocking the event loop (backends keep serving)."""
    return await asyncio.to_thread(start_sidecar, upstreams, **kwargs)


async def async_stop(proc: EquilibriumProcess, timeout: float = 10.0) -> int:
    return await asyncio.to_thread(proc.stop, timeout)


# ---------------------------------------------------------------- backends


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Backend:
    """A real aiohttp server on loopback; behaviour may be changed while it runs.

    Default answer: ``status`` with ``body`` (default: the backend's name) after ``latency``
    seconds (a number or a zero-argument callable), header ``X-Backend: NAME``. ``handler``
    replaces the default for every path; ``routes`` are added before the catch-all.
    """

    name: str
    latency: float | Callable[[], float] = 0.0
    status: int = 200
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    handler: Handler | None = None
    routes: Sequence[web.RouteDef] = ()
    port: int = 0
    methods: Counter[str] = field(default_factory=Counter)
    seen: list[web.Request] = field(default_factory=list)  # requests (headers readable)
    _runner: web.AppRunner | None = None

    @property
    def hits(self) -> int:
        return sum(self.methods.values())

    @property
    def app_hits(self) -> int:
        """The requests callers sent, the sidecars' own probes apart."""
        return sum(r.path != PROBE_PATH for r in self.seen)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    async def _default(self, request: web.Request) -> web.StreamResponse:
        delay = self.latency() if callable(self.latency) else self.latency
        if delay > 0:
            await asyncio.sleep(delay)
        body = self.body if self.body is not None else self.name.encode()
        headers = {"X-Backend": self.name, **self.headers}
        return web.Response(status=self.status, body=body, headers=headers)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if self.handler is not None:
            return await self.handler(request)
        return await self._default(request)

    async def start(self) -> Backend:
        @web.middleware
        async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
            self.methods[request.method] += 1
            self.seen.append(request)
            return await handler(request)

        app = web.Application(client_max_size=1024**3, middlewares=[count])
        app.add_routes(self.routes)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.25)
        await self._runner.setup()
        site = web.TCPSite(self._runner, LOOPBACK, self.port or 0)
        await site.start()
        sockets = getattr(site._server, "sockets", None)
        assert sockets, "backend did not bind"
        self.port = int(sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def start_backend(name: str = "backend", **kwargs: Any) -> Backend:
    return await Backend(name=name, **kwargs).start()


@contextlib.asynccontextmanager
async def backends(count: int, prefix: str = "pod", **kwargs: Any):  # type: ignore[no-untyped-def]
    """``count`` backends named ``prefix-0..``; all stopped on exit."""
    started = [await start_backend(f"{prefix}-{i}", **kwargs) for i in range(count)]
    try:
        yield started
    finally:
        for backend in started:
            await backend.stop()


@dataclass
class ResetServer:
    """A TCP endpoint that reads a request head, counts its method, then resets the connection.

    Stands for a pod that dies mid-request: the client gets ECONNRESET before any response.
    """

    port: int = 0
    methods: Counter[str] = field(default_factory=Counter)
    _server: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                line = await reader.readline()
                if line:
                    self.methods[line.split(b" ", 1)[0].decode(errors="replace")] += 1
                await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            pass
        sock = writer.get_extra_info("socket")
        if sock is not None:  # linger 0: close() sends RST instead of FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def start(self) -> ResetServer:
        self._server = await asyncio.start_server(self._serve, LOOPBACK, self.port or 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


RawEndpointT = TypeVar("RawEndpointT", bound="RawEndpoint")


class RawEndpoint(abc.ABC):
    """An HTTP endpoint on raw loopback sockets, so the bytes it writes are exactly those a
    test chose: a subclass's ``serve`` handles each connection; started by
    :func:`raw_endpoint`."""

    server: asyncio.Server | None = None

    @abc.abstractmethod
    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Handle one connection (each subclass writes its own bytes)."""

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://{LOOPBACK}:{self.server.sockets[0].getsockname()[1]}"


@contextlib.asynccontextmanager
async def raw_endpoint(app: RawEndpointT) -> AsyncIterator[RawEndpointT]:
    """``app`` listening on a free loopback port until the block ends."""
    app.server = await asyncio.start_server(app.serve, LOOPBACK, 0)
    try:
        yield app
    finally:
        app.server.close()


def dead_endpoint() -> str:
    """A loopback URL nobody listens on (connection refused)."""
    return f"http://{LOOPBACK}:{free_port()}"


@dataclass(frozen=True)
class Reply:
    """A whole HTTP answer, read: status, headers (case-insensitive), body."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def fetch(client: Any, method: str, url: Any, **kwargs: Any) -> Reply:
    """One request with an ``aiohttp.ClientSession``, body read in full."""
    async with client.request(method, url, **kwargs) as resp:
        return Reply(resp.status, resp.headers, await resp.read())
