"""Scenario ``h2-overhead``: CPU per unary gRPC call through the sidecar and through HAProxy.

One grpcio server (the pod, in this process, answering ``bench.Pod/Call`` with a few bytes)
and, in front of it, one sidecar (its outbound listener; h2c in, h2c out, ``:authority``
naming the upstream) and HAProxy (one thread, ``proto h2`` on its bind line and its server:
h2c on both sides, each stream balanced on its own). ``h2load`` (nghttp2) sends the same
unary calls to each at the same fixed rate (``--rps`` per client, ``-c`` connections, ``-m``
streams each; every call a POST with a gRPC-framed message, ``content-type:
application/grpc``, ``te: trailers``); ``direct`` (h2load straight to the pod) is the
baseline for latency. The modes alternate ``rounds`` times so that a drift of the machine
hits all alike; the CPU of each proxy (its process tree, from ``/proc``) over its segments
divided by the calls it completed is its CPU per call, reported as a ratio to HAProxy's (the
issue's target: at most 2×).

Where the sidecar's HTTP/2 engine is libnghttp2 (the default where the library loads,
:mod:`sidecar.nghttp2`), a second sidecar on the pure-Python ``h2`` engine
(``EQUILIBRIUM_H2_ENGINE=h2``) is measured beside it, as the mode ``sidecar-h2``.

It measures the HTTP/2 path only (``proxy-overhead`` is HTTP/1.1's) and starts no other load
generator. Without ``h2load`` it reports nothing but a note; without HAProxy, the sidecar
alone.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import shutil
import struct
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from equilibrium.lab.bench import peers
from equilibrium.lab.bench.report import ms
from equilibrium.lab.bench.scenarios import BenchContext, Scenario, ScenarioResult, Table
from equilibrium.lab.processes import cpu_pressure_stall, cpu_seconds, free_port
from equilibrium.lab.sidecars import Sidecar
from sidecar import nghttp2

UPSTREAM = "backend"
SERVICE = "bench.Pod"
PATH = f"/{SERVICE}/Call"
HAPROXY = "haproxy-h2"
MESSAGE = b"x" * 16  # the request message: a unary call with a small payload
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


@dataclass(frozen=True, slots=True)
class H2loadResult:
    """What one ``h2load`` run reports."""

    requests: int
    succeeded: int
    failed: int
    non_2xx: int
    seconds: float
    mean: float  # time for request, mean (s)
    max: float


def _seconds(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if m is None:
        raise ValueError(f"not an h2load duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_h2load(text: str) -> H2loadResult:
    """The numbers of an ``h2load`` report; ValueError when it has none."""
    done = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, "
                     r"(\d+) failed", text)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    finished = re.search(r"finished in ([\d.]+(?:us|ms|s)),", text)
    timing = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", text)
    if not (done and codes and finished and timing):
        raise ValueError("h2load printed no result: " + text.strip()[-300:])
    return H2loadResult(
        requests=int(done.group(2)), succeeded=int(done.group(3)), failed=int(done.group(4)),
        non_2xx=sum(int(codes.group(i)) for i in (2, 3, 4)),
        seconds=_seconds(finished.group(1)), mean=_seconds(timing.group(3)),
        max=_seconds(timing.group(2)),
    )


async def run_h2load(url: str, *, calls: int, clients: int, streams: int, rate: float,
                     body: Path, authority: str | None = None,
                     log: Path | None = None) -> H2loadResult:
    """``calls`` unary gRPC calls at ``rate``/s in all (killed if it overruns by 10 s)."""
    clients = max(1, min(clients, calls))
    argv = ["h2load", "-n", str(calls), "-c", str(clients), "-m", str(max(1, streams)),
            "--rps", f"{max(rate / clients, 0.1):g}", "-d", str(body),
            "-H", "content-type: application/grpc", "-H", "te: trailers"]
    if authority:
        argv += ["-H", f":authority: {authority}"]
    proc = await asyncio.create_subprocess_exec(
        *argv, url + PATH, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), calls / max(rate, 1.0) + 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode(errors="replace")
    if log is not None:
        log.write_text(text)
    return parse_h2load(text)


def start_pod() -> tuple[Any, int]:
    """The grpcio pod on 127.0.0.1: ``bench.Pod/Call`` answers ``ok`` at once."""
    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: b"ok")
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Call": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


async def start_haproxy(pod_url: str, logs: Path) -> peers.PeerProxy:
    home = logs / HAPROXY
    home.mkdir(parents=True, exist_ok=True)
    listen = f"127.0.0.1:{free_port()}"
    conf = home / "haproxy.cfg"
    conf.write_text(peers.haproxy_h2_config(listen, [pod_url]))
    return await peers.PeerProxy.launch(HAPROXY, ["haproxy", "-db", "-f", str(conf)], listen,
                                        home / "stderr.log")


class H2Overhead(Scenario):
    name = "h2-overhead"
    summary = ("unary gRPC calls (h2load) through the sidecar and HAProxy, h2c both sides: "
               "CPU per call")
    default_policies = ("equilibrium",)
    default_duration = 20.0
    default_rate = 500.0

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--h2-rounds", type=int, default=4,
                           help="alternations of the modes (4)")
        group.add_argument("--h2-connections", type=int, default=4,
                           help="h2load connections (-c, 4)")
        group.add_argument("--h2-streams", type=int, default=16,
                           help="h2load concurrent streams per connection (-m, 16)")
        group.add_argument("--h2-warmup-calls", type=int, default=500,
                           help="unmeasured calls per proxy before the first round (500)")

    async def run(self, ctx: BenchContext) -> ScenarioResult:
        args = ctx.args
        rounds = max(1, args.h2_rounds)
        segment = args.duration / rounds
        calls = max(1, round(args.rate * segment))
        params: dict[str, Any] = {
            "rate": args.rate, "duration_per_mode_s": args.duration, "rounds": rounds,
            "calls_per_segment": calls, "connections": args.h2_connections,
            "streams_per_connection": args.h2_streams, "sidecar_policy": args.policies[0],
            "message_bytes": len(MESSAGE),
        }
        if shutil.which("h2load") is None:
            return ScenarioResult(params, [], {}, notes=[
                "h2-overhead skipped: needs h2load (apt-get install -y nghttp2-client)"])
        body = ctx.logs / "call.bin"
        body.write_bytes(struct.pack(">BI", 0, len(MESSAGE)) + MESSAGE)  # one gRPC message
        notes: list[str] = []
        server, port = start_pod()
        pod_url = f"http://127.0.0.1:{port}"
        running: list[peers.PeerProxy] = []
        totals = {"direct": _Totals(), "sidecar": _Totals()}
        stall_before = cpu_pressure_stall()
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            sidecar = await Sidecar.start("h2-overhead", {UPSTREAM: [pod_url]},
                                          policy=args.policies[0], strategy=args.strategy,
                                          extra=args.sidecar_arg,
                                          stderr_path=str(ctx.logs / "sidecar.log"))
            sidecars = [sidecar]
            try:
                targets: dict[str, tuple[str, str | None, Any]] = {
                    "direct": (pod_url, None, lambda: 0.0),
                    "sidecar": (sidecar.outbound_url, UPSTREAM,
                                lambda: cpu_seconds(sidecar.child.pid)),
                }
                engine = _engine()
                params["sidecar_h2_engine"] = engine
                if engine == "nghttp2":  # the pure-Python engine beside it
                    pure = await Sidecar.start(
                        "h2-overhead-h2", {UPSTREAM: [pod_url]}, policy=args.policies[0],
                        strategy=args.strategy, extra=args.sidecar_arg,
                        env={nghttp2.ENGINE_VARIABLE: "h2"},
                        stderr_path=str(ctx.logs / "sidecar-h2.log"))
                    sidecars.append(pure)
                    targets["sidecar-h2"] = (pure.outbound_url, UPSTREAM,
                                             lambda: cpu_seconds(pure.child.pid))
                    totals["sidecar-h2"] = _Totals()
                else:
                    notes.append(f"the sidecar's HTTP/2 engine is {engine}: libnghttp2 "
                                 f"({nghttp2.SONAME}) does not load here or was not chosen")
                if peers.installed("haproxy"):
                    haproxy = await start_haproxy(pod_url, ctx.logs)
                    running.append(haproxy)
                    targets[HAPROXY] = (haproxy.url, None, haproxy.cpu_seconds)
                    totals[HAPROXY] = _Totals()
                else:
                    notes.append("haproxy is not installed: no reference to compare with "
                                 "(apt-get install -y haproxy)")
                params["modes"] = list(targets)
                if args.h2_warmup_calls > 0:
                    ctx.say(f"warm-up: {args.h2_warmup_calls} calls per mode (not measured)")
                    for url, authority, _ in targets.values():
                        await run_h2load(url, calls=args.h2_warmup_calls,
                                         clients=args.h2_connections, streams=args.h2_streams,
                                         rate=args.rate, body=body, authority=authority)
                for r in range(rounds):
                    ctx.say(f"round {r + 1}/{rounds}: {calls} calls each of "
                            f"{', '.join(targets)} at {args.rate:g}/s")
                    for mode, (url, authority, read_cpu) in targets.items():
                        before = read_cpu()
                        res = await run_h2load(
                            url, calls=calls, clients=args.h2_connections,
                            streams=args.h2_streams, rate=args.rate, body=body,
                            authority=authority, log=ctx.logs / f"h2load-{mode}-{r + 1}.txt")
                        totals[mode].add(res, read_cpu() - before)
            finally:
                for peer in running:
                    await peer.stop()
                for each in sidecars:
                    await each.stop()
        finally:
            server.stop(0)
        elapsed = loop.time() - started
        pressure = (cpu_pressure_stall() - stall_before) / elapsed if elapsed > 0 else math.nan
        reference = totals.get(HAPROXY)
        ref_cpu = reference.cpu_per_call() if reference is not None else math.nan

        def to_reference(mode: str) -> str:
            if mode == "direct" or not ref_cpu > 0:
                return "–"
            return f"{totals[mode].cpu_per_call() / ref_cpu:.2f}×"

        table = Table(
            title=f"h2-overhead: unary gRPC calls at {args.rate:g}/s (h2load -c "
                  f"{args.h2_connections} -m {args.h2_streams}); CPU of the proxy's process "
                  "tree per completed call",
            columns=["mode", "calls", "failed", "non-2xx", "mean time per call",
                     "max", "proxy CPU per call", "CPU / HAProxy's"],
            rows=[[mode, str(t.calls), str(t.failed), str(t.non_2xx), ms(t.mean()),
                   ms(t.max), "–" if mode == "direct" else f"{t.cpu_per_call() * 1e6:.0f} µs",
                   to_reference(mode)] for mode, t in totals.items()],
        )
        tables = [table]
        ratio = totals["sidecar"].cpu_per_call() / ref_cpu if ref_cpu > 0 else math.nan
        if reference is not None:
            tables.append(Table(
                "target (issue 11), as a ratio to HAProxy in this run",
                ["target", "measured", "verdict"],
                [["CPU per unary gRPC call ≤ 2× HAProxy's", f"{ratio:.2f}×",
                  "met" if ratio <= 2 else "missed"]]))
        if "sidecar-h2" in totals and reference is not None:
            tables[-1].rows.append([
                "(the same, the sidecar on pure-Python h2)",
                f"{totals['sidecar-h2'].cpu_per_call() / ref_cpu:.2f}×", "–"])
        notes += [
            f"sidecar: its HTTP/2 engine is {params['sidecar_h2_engine']}"
            + ("; sidecar-h2: the same on pure-Python h2 (EQUILIBRIUM_H2_ENGINE=h2)"
               if "sidecar-h2" in totals else "") + ".",
            "Every mode gets the same h2load schedule and the same pod; h2load's own time per "
            "call includes waiting for a CPU on a busy machine.",
            f"Share of the run in which some task waited for a CPU (Linux PSI): "
            f"{pressure * 100:.0f} %.",
        ]
        return ScenarioResult(
            parameters=params, tables=tables,
            data={"modes": {m: t.as_dict() for m, t in totals.items()},
                  "cpu_ratio_to_haproxy": ratio, "cpu_pressure": pressure},
            notes=notes,
        )


def _engine() -> str:
    """The HTTP/2 engine a sidecar started here gets (the bench's environment decides)."""
    try:
        return nghttp2.engine()
    except ValueError:
        return "h2"


class _Totals:
    """One mode's sums over its segments."""

    def __init__(self) -> None:
        self.calls = self.failed = self.non_2xx = 0
        self.cpu = 0.0
        self.weighted_mean = 0.0
        self.max = 0.0

    def add(self, res: H2loadResult, cpu: float) -> None:
        self.calls += res.succeeded
        self.failed += res.failed
        self.non_2xx += res.non_2xx
        self.cpu += cpu
        self.weighted_mean += res.mean * res.requests
        self.max = max(self.max, res.max)

    def mean(self) -> float:
        return self.weighted_mean / self.calls if self.calls else math.nan

    def cpu_per_call(self) -> float:
        return self.cpu / self.calls if self.calls else math.nan

    def as_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "failed": self.failed, "non_2xx": self.non_2xx,
                "cpu_s": self.cpu, "cpu_per_call_s": self.cpu_per_call(),
                "mean_s": self.mean(), "max_s": self.max}


SCENARIO = H2Overhead()
