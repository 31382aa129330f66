"""Where a proxied request's CPU goes: the sidecar against its own plumbing and a bare relay.

HTTP/1.1 relays in front of one static nginx backend, each pinned to CPU 0 and driven in
turn by the same open-loop load (``--rate`` requests a second over 4 keep-alive connections,
from a generator pinned to CPU 1), for ``--rounds`` rounds; CPU per request is read from
``/proc`` (user + system, the relay's process tree) over a fixed number of requests:

- ``sidecar``: ``equilibrium sidecar`` with one upstream (everything a request goes through);
- ``plumbing``: the sidecar's own HTTP/1.1 server and client (:mod:`sidecar.http1`) and its
  answer relay (:func:`sidecar.forward.relay_answer`), with a handler that only forwards: no
  routing, policy, phases, metrics or retries. What the request path costs before the mesh
  does anything;
- ``lean``: the bare relay's shape (below) doing the sidecar's own per-request work with the
  sidecar's own objects (its upstream table and ticked policy, phases, header rules and
  metrics, called as the outbound proxy calls them): what a request path rebuilt on
  callbacks would cost if the mesh's work per request stayed as it is;
- ``bare``: a relay of protocol callbacks alone (``httptools`` both ways, one upstream
  connection per app connection, no task or future per request): what uvloop and the kernel
  cost, the floor of any Python relay;
- ``haproxy``: HAProxy ``leastconn`` (``nbthread 1``), when installed;
- ``baseline`` (with ``--baseline DIR``): the sidecar of another checkout (say, ``git
  worktree add DIR HEAD~1``), so a change is measured against the code before it in one run.

``--opcodes`` instead counts the CPython bytecode instructions each request executes in the
sidecar, the plumbing or the lean relay (``sys.settrace`` with opcode events, at 100 req/s):
a measure of the interpreter's work per request that does not depend on the machine's speed
or noise, by function (``--lines``: by source line). Pure Python only (compiled modules run
no bytecode). With ``--grpc`` it counts them per unary gRPC call through the sidecar instead
(``h2load``, h2c both sides, to the ``h2-overhead`` benchmark's grpcio pod; the sidecar's
HTTP/2 engine as it loads, or as ``EQUILIBRIUM_H2_ENGINE`` says).

Needs nginx (and haproxy for its row). Loopback only; every load is bounded by ``--seconds``.

    python scripts/request_cost.py --rate 500 --seconds 10 --rounds 2
    python scripts/request_cost.py --opcodes
    python scripts/request_cost.py --opcodes --grpc
    python scripts/request_cost.py --relays sidecar,baseline,haproxy --baseline /tmp/before
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from equilibrium.lab.bench import peers  # noqa: E402
from equilibrium.lab.processes import free_port  # noqa: E402
from equilibrium.lab.sidecars import sidecar_argv  # noqa: E402

CONNECTIONS = 4
REQUEST = b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n"
TRACED_RATE = 100.0  # the tracer slows the interpreter about 20-fold
TRACED_SECONDS = 5.0


# ---------------------------------------------------------------- the load (a child process)

async def generate(port: int, rate: float, seconds: float) -> str:
    """Open loop: request i leaves at i / rate over CONNECTIONS keep-alive connections; the
    answers (Content-Length framed) are read by one task per connection."""
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CONNECTIONS)]
    sent: list[asyncio.Queue[float | None]] = [asyncio.Queue() for _ in conns]
    latencies: list[float] = []

    async def read(reader: asyncio.StreamReader, queue: asyncio.Queue[float | None]) -> None:
        while (started := await queue.get()) is not None:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)

    readers = [asyncio.create_task(read(r, q)) for (r, _), q in zip(conns, sent, strict=True)]
    total, start = int(rate * seconds), time.perf_counter()
    for i in range(total):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent[i % CONNECTIONS].put_nowait(time.perf_counter())
        conns[i % CONNECTIONS][1].write(REQUEST)
    for queue in sent:
        queue.put_nowait(None)
    await asyncio.wait_for(asyncio.gather(*readers), 30)
    latencies.sort()
    return (f"{len(latencies)} answers, p50 {latencies[len(latencies) // 2] * 1e3:.2f} ms, "
            f"p99 {latencies[int(len(latencies) * 0.99)] * 1e3:.2f} ms")


# ---------------------------------------------------------------- the two reference relays

async def serve_plumbing(port: int, backend: str) -> None:
    from multidict import CIMultiDict
    from yarl import URL

    from sidecar.forward import relay_answer, response_headers_from_wire
    from sidecar.http1.client import H1Transport
    from sidecar.http1.server import H1Connection, H1Exchange, H1Limits
    from sidecar.transport import UpstreamRequest
    from sidecar.watchdog import Watchdog

    transport = H1Transport(connect_timeout=2.0)

    async def handler(exchange: H1Exchange) -> None:
        upstream: Any = await transport.handle_request(UpstreamRequest(
            exchange.method, URL(backend + exchange.raw_path, encoded=True),
            CIMultiDict(exchange.headers)))
        try:
            headers, _ = response_headers_from_wire(upstream.wire_fields, "1.1 plumbing")
            await relay_answer(exchange, upstream, headers, bodiless=False,
                               watchdog=Watchdog(30.0), on_dropped=lambda names: None)
        finally:
            upstream.release()

    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: H1Connection(handler, limits=H1Limits()), "127.0.0.1", port)
    await asyncio.Event().wait()


async def serve_bare(port: int, backend: str) -> None:
    import httptools

    host, _, backend_port = backend.split("//", 1)[1].rstrip("/").rpartition(":")
    loop = asyncio.get_running_loop()

    class Upstream(asyncio.Protocol):
        def __init__(self, app: App) -> None:
            self.app, self.parser = app, httptools.HttpResponseParser(self)
            self.head: list[bytes] = []
            self.body: list[bytes] = []

        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_begin(self) -> None:
            self.head.clear()
            self.body.clear()

        def on_header(self, name: bytes, value: bytes) -> None:
            self.head.append(b"%s: %s\r\n" % (name, value))

        def on_body(self, data: bytes) -> None:
            self.body.append(data)

        def on_message_complete(self) -> None:
            status = b"HTTP/1.1 %d \r\n" % self.parser.get_status_code()
            self.app.transport.write(status + b"".join(self.head) + b"\r\n" + b"".join(self.body))

    class App(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport, self.parser = transport, httptools.HttpRequestParser(self)
            self.upstream: Upstream | None = None
            self.waiting: list[bytes] = []
            self.connecting = loop.create_task(self.connect())

        async def connect(self) -> None:
            _, self.upstream = await loop.create_connection(
                lambda: Upstream(self), host, int(backend_port))
            for request in self.waiting:
                self.upstream.transport.write(request)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_begin(self) -> None:
            self.head: list[bytes] = []

        def on_url(self, url: bytes) -> None:
            self.url = url

        def on_header(self, name: bytes, value: bytes) -> None:
            self.head.append(b"%s: %s\r\n" % (name, value))

        def on_message_complete(self) -> None:
            request = (b"%s %s HTTP/1.1\r\n" % (self.parser.get_method(), self.url)
                       + b"".join(self.head) + b"Via: 1.1 bare\r\n\r\n")
            if self.upstream is None:
                self.waiting.append(request)
            else:
                self.upstream.transport.write(request)

    await loop.create_server(App, "127.0.0.1", port)
    await asyncio.Event().wait()


async def serve_lean(port: int, backend: str) -> None:
    """The bare relay's shape (protocol callbacks, no task, future, exchange or watchdog per
    request) doing the sidecar's own per-request work, with the sidecar's own objects: its
    upstream table and policy (ticked as the sidecar ticks it), phases, header rules and
    metrics, called in the order :class:`sidecar.outbound.OutboundProxy` calls them. What a
    rebuilt request path would cost if the mesh's work per request stayed as it is."""
    import httptools
    from multidict import CIMultiDict, CIMultiDictProxy

    from sidecar.cli import CONFIG_OPTIONS, add_options, flags_from_args
    from sidecar.config import ConfigSource
    from sidecar.forward import request_headers_to_upstream, response_headers_from_wire
    from sidecar.outbound import upstream_name
    from sidecar.phases import RequestContext
    from sidecar.runner import SidecarRunner

    parser = argparse.ArgumentParser()
    add_options(parser, CONFIG_OPTIONS)
    argv = sidecar_argv("cost", f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}",
                        {"backend": [backend]})[4:]
    source = ConfigSource.from_sources(flags_from_args(parser.parse_args(argv)))
    runner = SidecarRunner(source, source.load())
    proxy, table, clock = runner.proxy, runner.table, runner.clock
    phases, metrics, via, rng = proxy.phases, proxy.metrics, proxy.via, proxy.rng
    table.apply(runner.config.upstreams, clock())
    loop = asyncio.get_running_loop()
    tasks = {loop.create_task(runner._tick_loop())}  # learning, as in the sidecar
    gc.collect()
    gc.freeze()  # as the sidecar does once it is ready

    class Upstream(asyncio.Protocol):
        def __init__(self, app: App) -> None:
            self.app, self.parser = app, httptools.HttpResponseParser(self)
            self.fields: list[tuple[bytes, bytes]] = []
            self.body: list[bytes] = []

        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_begin(self) -> None:
            self.fields = []
            self.body = []

        def on_header(self, name: bytes, value: bytes) -> None:
            self.fields.append((name, value))

        def on_body(self, data: bytes) -> None:
            self.body.append(data)

        def on_message_complete(self) -> None:
            app = self.app
            ctx, sent = app.ctx, app.sent
            status = self.parser.get_status_code()
            headers, game = response_headers_from_wire(self.fields, via)
            proxy._observe_head(ctx, status, phases.response_signals(ctx, game), sent)
            phases.response_filter(ctx, headers)
            head = "\r\n".join([f"HTTP/1.1 {status} OK",
                                 *[f"{k}: {v}" for k, v in headers.items()]])
            app.transport.write(head.encode("utf-8", "surrogateescape") + b"\r\n\r\n"
                                + b"".join(self.body))
            assert ctx.group is not None
            metrics.request_in_flight(ctx.group.name, -1)
            phases.logging(ctx, clock())

    class App(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport, self.parser = transport, httptools.HttpRequestParser(self)
            self.upstream: Upstream | None = None
            self.waiting: list[bytes] = []
            self.remote = transport.get_extra_info("peername")[0]

        async def connect(self, endpoint: str) -> None:
            host, _, port = endpoint.split("//", 1)[1].rstrip("/").rpartition(":")
            _, self.upstream = await loop.create_connection(
                lambda: Upstream(self), host, int(port))
            for request in self.waiting:
                self.upstream.transport.write(request)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_begin(self) -> None:
            self.fields: list[tuple[bytes, bytes]] = []

        def on_url(self, url: bytes) -> None:
            self.url = url

        def on_header(self, name: bytes, value: bytes) -> None:
            self.fields.append((name, value))

        def on_message_complete(self) -> None:
            received = CIMultiDictProxy(CIMultiDict([
                (n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
                for n, v in self.fields]))
            method = self.parser.get_method().decode("ascii")
            authority = received.get("Host", "")
            ctx = self.ctx = RequestContext(started=clock(), method=method,
                                            target=self.url.decode("latin-1"),
                                            authority=authority)
            ctx.upstream = upstream_name(authority)
            group = ctx.group = table.get(ctx.upstream)
            assert group is not None
            metrics.request_in_flight(group.name, 1)
            assert phases.request_check(received, ctx) is None
            base, _ = request_headers_to_upstream(received, client_ip=self.remote,
                                                  proto="http", via=via)
            base["Host"] = authority
            now = clock()
            group.budget.deposit(now)
            endpoint = ctx.endpoint = phases.upstream_pick(ctx, rng, now)
            assert endpoint is not None
            ctx.tried.append(endpoint)
            headers = CIMultiDict(base)
            phases.upstream_request_filter(ctx, headers)
            self.sent = clock()
            group.policy.on_start(endpoint, self.sent)
            head = "\r\n".join([f"{method} {ctx.target} HTTP/1.1",
                                 *[f"{k}: {v}" for k, v in headers.items()]])
            request = head.encode("utf-8", "surrogateescape") + b"\r\n\r\n"
            if self.upstream is None:
                self.waiting.append(request)
                if len(self.waiting) == 1:
                    tasks.add(loop.create_task(self.connect(endpoint)))
            else:
                self.upstream.transport.write(request)

    await loop.create_server(App, "127.0.0.1", port)
    await asyncio.Event().wait()


# ---------------------------------------------------------------- opcode counting

_BY_LINE = "REQUEST_COST_BY_LINE"  # --lines, as the traced child process sees it


class OpcodeCounter:
    """Counts the bytecode instructions run in this thread, by function (or by source line),
    between ``SIGUSR1`` (start) and ``SIGUSR2`` (stop, and write ``path``)."""

    def __init__(self, path: str, lines: bool = False) -> None:
        self.path = path
        self.counts: collections.Counter[Any] = collections.Counter()
        self._local = self._by_line if lines else self._by_function

    def _by_function(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "opcode":
            self.counts[frame.f_code, 0] += 1
        return self._by_function

    def _by_line(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "opcode":
            self.counts[frame.f_code, frame.f_lineno] += 1
        return self._by_line

    def _global(self, frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        return self._local

    def start(self, *_: Any) -> None:
        self.counts.clear()
        sys.settrace(self._global)

    def stop(self, *_: Any) -> None:
        sys.settrace(None)
        with open(self.path, "w") as out:
            for (code, line), n in self.counts.most_common():
                where = f"{code.co_filename}:{line or code.co_firstlineno}({code.co_name})"
                out.write(f"{n}\t{where}\n")

    def install(self) -> None:
        signal.signal(signal.SIGUSR1, self.start)
        signal.signal(signal.SIGUSR2, self.stop)


# ---------------------------------------------------------------- the driver

BASELINE: Path | None = None  # --baseline: the checkout whose sidecar is the baseline relay


async def child(*args: str, cpu: int | None = None, checkout: Path | None = None,
                **kw: Any) -> asyncio.subprocess.Process:
    """This script in a role; ``checkout``: that checkout's copy, importing its code."""
    argv = [sys.executable, __file__, *args]
    if checkout is not None:
        argv[1] = str(checkout / "scripts" / Path(__file__).name)
        kw["env"] = {**os.environ, "PYTHONPATH": str(checkout)}
        kw["cwd"] = str(checkout)
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    return await asyncio.create_subprocess_exec(*argv, **kw)


async def load(port: int, rate: float, seconds: float, cpu: int | None) -> str:
    proc = await child("--generate", str(port), str(rate), str(seconds), cpu=cpu,
                       stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), seconds + 60)
    return out.decode().strip()


async def until_listening(port: int) -> None:
    for _ in range(100):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


class RelayFailed(Exception):
    """A relay did not start listening: what its log says is in the message."""


async def start_relays(relays: dict[str, tuple[int, int, Any]], names: list[str],
                       backend: str, logs: Path, opcodes: bool, proxy_cpu: int | None) -> None:
    """Fills ``relays`` (name -> (pid, port, stop)) as each starts, so that the caller stops
    those that did even when a later one fails; each relay pinned to ``proxy_cpu``."""
    for name in dict.fromkeys(names):  # once each: a name may repeat in the turn order
        port = free_port()
        if name == "haproxy":
            peer = await peers.PeerProxy.start(peers.PEERS[0], [backend], logs)
            if proxy_cpu is not None:
                peer.pin([proxy_cpu])
            relays[name] = (peer.child.pid, int(peer.url.rstrip("/").rsplit(":", 1)[1]),
                            peer.stop)
            continue
        trace = ["--trace", str(logs / f"opcodes.{name}")] if opcodes else []
        if name in ("sidecar", "baseline"):
            role = ["--sidecar", *sidecar_argv(  # after "python -m equilibrium"
                "cost", f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}",
                {"backend": [backend]})[3:]]
        else:
            role = ["--serve", name, str(port), backend]
        checkout = BASELINE if name == "baseline" else None
        with open(logs / f"{name}.log", "w") as log_file:
            proc = await child(*trace, *role, cpu=proxy_cpu, checkout=checkout,
                               stderr=log_file)

        async def stop(proc: asyncio.subprocess.Process = proc) -> None:
            if proc.returncode is not None:
                return
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()

        relays[name] = (proc.pid, port, stop)
        try:
            await until_listening(port)
        except RuntimeError:
            tail = (logs / f"{name}.log").read_text(errors="replace").strip().splitlines()[-5:]
            raise RelayFailed(f"the {name} relay did not start (its log, "
                              f"{logs / f'{name}.log'}, ends: {' | '.join(tail) or 'empty'})"
                              ) from None


async def measure_cpu(rate: float, seconds: float, rounds: int, names: list[str],
                      sample: bool = False) -> None:
    logs = Path(tempfile.mkdtemp(prefix="equilibrium-request-cost-"))
    cpus = sorted(os.sched_getaffinity(0))
    proxy_cpu, load_cpu = (cpus[0], cpus[1]) if len(cpus) > 1 else (None, None)
    backend = await peers.PeerProxy.start(None, [], logs, name="static-backend")
    relays: dict[str, tuple[int, int, Any]] = {}
    try:
        if load_cpu is not None:
            backend.pin([load_cpu])
        await start_relays(relays, names, backend.url.rstrip("/"), logs, False, proxy_cpu)
        print(f"{rate:g} req/s over {CONNECTIONS} connections, {seconds:g} s a turn; relays "
              f"on CPU {proxy_cpu}, generator and nginx on CPU {load_cpu}; logs in {logs}")
        print("| round | relay | CPU per request | load |\n| ---: | --- | ---: | --- |")
        turn = 0  # the sample files' numbers: a name may have several turns a round
        for round_ in range(1, rounds + 1):
            for name in names:
                pid, port, _ = relays[name]
                await load(port, rate, 2.0, load_cpu)  # warm-up, not measured
                turn += 1
                sampler = await start_sampler(pid, logs / f"perf.{name}.{turn}", seconds) \
                    if sample else None
                before = peers.tree_cpu_seconds(pid)
                result = await load(port, rate, seconds, load_cpu)
                used = peers.tree_cpu_seconds(pid) - before
                print(f"| {round_} | {name} | {used / (rate * seconds) * 1e6:.0f} µs | "
                      f"{result} |", flush=True)
                if sampler is not None and await sampler.wait() != 0:
                    print(f"perf record failed for {name} (turn {turn}): see "
                          f"{logs / f'perf.{name}.{turn}.log'}", file=sys.stderr)
    finally:
        for _, _, stop in relays.values():
            await stop()
        await backend.stop()
    if sample:
        report_samples(logs, names)


async def start_sampler(pid: int, path: Path, seconds: float) -> asyncio.subprocess.Process:
    """``perf record`` of the relay's process for the turn: the kernel's CPU clock at 999 Hz
    (the only event these VMs give: no hardware counters), by shared object."""
    with open(path.with_name(path.name + ".log"), "w") as log:
        return await asyncio.create_subprocess_exec(
            "perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "-p", str(pid),
            "-o", str(path), "--", "sleep", f"{seconds:g}",
            stdout=asyncio.subprocess.DEVNULL, stderr=log)


def report_samples(logs: Path, names: list[str]) -> None:
    """Each relay's samples by shared object (all its turns together), as shares."""
    for name in dict.fromkeys(names):
        counts: collections.Counter[str] = collections.Counter()
        for data in sorted(logs.glob(f"perf.{name}.*")):
            if data.suffix == ".log":
                continue
            out = subprocess.run(
                ["perf", "report", "-i", str(data), "--stdio", "--sort", "dso", "-F",
                 "sample,dso", "--no-children"], capture_output=True, text=True, check=False)
            for line in out.stdout.splitlines():
                parts = line.split(None, 1)
                if len(parts) == 2 and parts[0].isdigit():
                    counts[parts[1].strip()] += int(parts[0])
        total = sum(counts.values()) or 1
        print(f"\n{name}: {total} samples (cpu-clock, 999 Hz)\n| where | share |\n| --- | ---: |")
        for dso, n in counts.most_common(12):
            print(f"| `{dso}` | {100 * n / total:.1f} % |")


async def measure_opcodes(names: list[str], top: int) -> None:
    logs = Path(tempfile.mkdtemp(prefix="equilibrium-request-cost-"))
    backend = await peers.PeerProxy.start(None, [], logs, name="static-backend")
    relays: dict[str, tuple[int, int, Any]] = {}
    try:
        await start_relays(relays, names, backend.url.rstrip("/"), logs, True, None)
        for name in names:
            pid, port, _ = relays[name]
            await load(port, 200.0, 2.0, None)  # warm-up: connections, caches, first tick
            os.kill(pid, signal.SIGUSR1)
            await asyncio.sleep(0.5)
            result = await load(port, TRACED_RATE, TRACED_SECONDS, None)
            await asyncio.sleep(0.5)
            os.kill(pid, signal.SIGUSR2)
            path = logs / f"opcodes.{name}"
            for _ in range(50):
                await asyncio.sleep(0.1)
                if path.exists() and path.stat().st_size:
                    break
            report_opcodes(name, path, int(TRACED_RATE * TRACED_SECONDS), result, top)
    finally:
        for _, _, stop in relays.values():
            await stop()
        await backend.stop()


async def measure_grpc_opcodes(top: int) -> None:
    """:func:`measure_opcodes` for unary gRPC calls (module docstring, ``--grpc``)."""
    from equilibrium.lab.bench import h2_overhead

    logs = Path(tempfile.mkdtemp(prefix="equilibrium-request-cost-"))
    server, pod_port = h2_overhead.start_pod()
    body = logs / "call.bin"
    body.write_bytes(struct.pack(">BI", 0, len(h2_overhead.MESSAGE)) + h2_overhead.MESSAGE)
    port = free_port()
    argv = sidecar_argv("cost", f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}",
                        {h2_overhead.UPSTREAM: [f"http://127.0.0.1:{pod_port}"]})[3:]
    trace = logs / "opcodes.sidecar"
    with open(logs / "sidecar.log", "w") as log_file:
        proc = await child("--trace", str(trace), "--sidecar", *argv, stderr=log_file)
    try:
        await until_listening(port)
        url = f"http://127.0.0.1:{port}"
        calls = int(TRACED_RATE * TRACED_SECONDS)

        async def load(n: int, rate: float) -> str:
            result = await h2_overhead.run_h2load(
                url, calls=n, clients=CONNECTIONS, streams=16, rate=rate, body=body,
                authority=h2_overhead.UPSTREAM)
            return (f"{result.succeeded} of {result.requests} answered, mean "
                    f"{result.mean * 1e3:.2f} ms")

        await load(calls, 200.0)  # warm-up: connections, caches, first tick
        os.kill(proc.pid, signal.SIGUSR1)
        await asyncio.sleep(0.5)
        result = await load(calls, TRACED_RATE)
        await asyncio.sleep(0.5)
        os.kill(proc.pid, signal.SIGUSR2)
        for _ in range(50):
            await asyncio.sleep(0.1)
            if trace.exists() and trace.stat().st_size:
                break
        report_opcodes("sidecar, unary gRPC calls", trace, calls, result, top)
    finally:
        proc.terminate()
        await proc.wait()
        server.stop(0)


def report_opcodes(name: str, path: Path, requests: int, result: str, top: int) -> None:
    rows = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines()]
    total = sum(int(n) for n, _ in rows)
    print(f"\n{name}: {total / requests:,.0f} bytecode instructions per request "
          f"({requests} requests: {result})")
    by_file: collections.Counter[str] = collections.Counter()
    for n, where in rows:
        by_file[short(where.rsplit(":", 1)[0])] += int(n)
    print("| file | per request |\n| --- | ---: |")
    for file, count in by_file.most_common(top):
        print(f"| `{file}` | {count / requests:,.0f} |")
    print(f"| {'line' if os.environ.get(_BY_LINE) == '1' else 'function'} | per request |\n"
          "| --- | ---: |")
    for n, where in rows[:top]:
        print(f"| `{short(where)}` | {int(n) / requests:,.1f} |")


def short(where: str) -> str:
    for prefix in (str(ROOT) + "/", "site-packages/"):
        if prefix in where:
            where = where.split(prefix, 1)[1]
    return where


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=500.0, help="requests a second (500)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds a turn (10)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of turns (2)")
    p.add_argument("--relays", default="sidecar,plumbing,bare,haproxy",
                   help="which relays, in turn order; a name may repeat (default: all four)")
    p.add_argument("--opcodes", action="store_true",
                   help="count bytecode instructions per request instead (sidecar, plumbing, lean)")
    p.add_argument("--grpc", action="store_true",
                   help="with --opcodes: per unary gRPC call through the sidecar (needs h2load)")
    p.add_argument("--top", type=int, default=25, help="rows of the opcode tables (25)")
    p.add_argument("--lines", action="store_true",
                   help="with --opcodes: count by source line instead of by function")
    p.add_argument("--sample", action="store_true",
                   help="also sample each turn with perf record, and report by shared object")
    p.add_argument("--baseline", type=Path, metavar="DIR",
                   help="another checkout, whose sidecar is the relay named baseline")
    # the child processes' roles
    p.add_argument("--generate", nargs=3, metavar=("PORT", "RATE", "SECONDS"),
                   help=argparse.SUPPRESS)
    p.add_argument("--serve", nargs=3, metavar=("KIND", "PORT", "BACKEND"),
                   help=argparse.SUPPRESS)
    p.add_argument("--trace", metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("--sidecar", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trace:
        OpcodeCounter(args.trace, os.environ.get(_BY_LINE) == "1").install()
    if args.generate:
        target, rate, seconds = args.generate
        print(asyncio.run(generate(int(target), float(rate), float(seconds))))
        return 0
    if args.serve:
        import uvloop

        kind, listen, backend = args.serve
        serve = {"plumbing": serve_plumbing, "lean": serve_lean}.get(kind, serve_bare)
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # ends quietly
        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(serve(int(listen), backend))
        return 0
    if args.sidecar is not None:
        from equilibrium.cli import main as equilibrium_main

        sys.argv = ["equilibrium", *args.sidecar]
        return int(equilibrium_main() or 0)
    if args.lines:
        if not args.opcodes:
            p.error("--lines counts instructions: it goes with --opcodes")
        os.environ[_BY_LINE] = "1"  # the traced children inherit it
    if args.grpc:
        if not args.opcodes:
            p.error("--grpc counts instructions: it goes with --opcodes")
        if shutil.which("h2load") is None:
            print("needs h2load (apt-get install -y nghttp2-client)", file=sys.stderr)
            return 2
        asyncio.run(measure_grpc_opcodes(args.top))
        return 0
    names = [n.strip() for n in args.relays.split(",") if n.strip()]
    if not names:
        p.error("--relays names no relay")
    if args.opcodes and args.sample:
        p.error("--sample samples the CPU turns; --opcodes counts instructions instead")
    if args.opcodes and not set(names) & {"sidecar", "plumbing", "lean", "baseline"}:
        p.error("--opcodes counts in sidecar, plumbing, lean or baseline: name one in --relays")
    unknown = set(names) - {"sidecar", "plumbing", "lean", "bare", "haproxy", "baseline"}
    if unknown:
        p.error(f"unknown relay(s): {', '.join(sorted(unknown))}")
    if ("baseline" in names) != (args.baseline is not None):
        p.error("the baseline relay and --baseline DIR go together")
    if args.baseline is not None:
        global BASELINE
        BASELINE = args.baseline.resolve()
        if not (BASELINE / "scripts" / Path(__file__).name).exists():
            p.error(f"{BASELINE} is not a checkout with {Path(__file__).name}")
    if shutil.which("nginx") is None:
        print("needs nginx (the static backend)", file=sys.stderr)
        return 2
    if "haproxy" in names and shutil.which("haproxy") is None:
        names = [name for name in names if name != "haproxy"]
        print("haproxy is not installed: its row is skipped", file=sys.stderr)
    if not names:
        print("no relay left to measure", file=sys.stderr)
        return 2
    try:
        if args.opcodes:
            asyncio.run(measure_opcodes(
                [n for n in names if n in ("sidecar", "plumbing", "lean", "baseline")], args.top))
            return 0
        if not (0 < args.rate <= 5000 and 0 < args.seconds <= 120 and 1 <= args.rounds <= 10):
            p.error("--rate in (0, 5000], --seconds in (0, 120], --rounds in [1, 10]")
        if args.sample and shutil.which("perf") is None:
            p.error("--sample needs perf (Debian's linux-perf)")
        if args.sample and os.geteuid() != 0:
            print("note: not root, so perf may drop the kernel's samples (see "
                  "/proc/sys/kernel/perf_event_paranoid): the kernel's share would read low",
                  file=sys.stderr)
        asyncio.run(measure_cpu(args.rate, args.seconds, args.rounds, names, args.sample))
    except RelayFailed as exc:
        print(f"request_cost: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
