"""Scenario ``grpc-slow-pod``: the seed's bad pod as a gRPC server, real grpcio on both ends.

Five grpcio servers on loopback (the pods, in this process, each on its own thread pool);
pod-4 adds 500 ms to a random half of its calls. Each client is one grpcio channel (``grpc.aio``)
with open-loop unary calls, bounded in count (rate × duration) and time (a deadline per call,
an in-flight cap). Contenders, one after another against the same pods:

- a sidecar routing policy (``round-robin``, ``peak-ewma``, ``equilibrium``, ...): each client's
  channel goes to its own sidecar's outbound listener with ``grpc.default_authority`` naming
  the upstream, and the sidecar routes every call on its own (h2c, docs/grpc.md);
- ``pick-first``: no sidecar, the channel's own default load balancing, which for a plain
  ``host:port`` target is ``pick_first``: each client is pinned to one pod (a seeded draw)
  for the whole run.

It reuses the slow-pod report (:meth:`SlowPod._measure` via :mod:`equilibrium.lab.analysis`):
p50/p99/p99.9, share per pod, bad-pod share, time to < 5 %. It must not measure the sidecar's
HTTP/1.1 path (that is ``slow-pod``), and it runs no load generator subprocess: the grpcio
clients and pods share this process, alike for every contender.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

from equilibrium.lab.bench.harness import LoadResult, StateSample
from equilibrium.lab.bench.report import ms, pct, secs
from equilibrium.lab.bench.scenarios import BenchContext, Scenario, ScenarioResult, Table
from equilibrium.lab.bench.slow_pod import SlowPod
from equilibrium.lab.loadgen import Record
from equilibrium.lab.processes import cpu_pressure_stall
from equilibrium.lab.sidecars import start_sidecars

UPSTREAM = "demo"
SERVICE = "bench.Pod"
METHOD = f"/{SERVICE}/Call"
PICK_FIRST = "pick-first"
CALL_TIMEOUT = 5.0
MAX_IN_FLIGHT = 256


def _handler(name: str, delay: float, fraction: float,
             rng: random.Random | None) -> Callable[[bytes, Any], bytes]:
    def call(request: bytes, context: Any) -> bytes:
        if rng is not None and rng.random() < fraction:
            time.sleep(delay)
        return name.encode()
    return call


def start_pods(count: int, bad: int, delay: float, fraction: float,
               seed: int) -> tuple[list[Any], list[int]]:
    """``count`` grpcio servers on 127.0.0.1; pod ``bad`` sleeps ``delay`` on a share of calls."""
    import grpc

    servers, ports = [], []
    for i in range(count):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
        rng = random.Random(seed) if i == bad else None
        handler = grpc.unary_unary_rpc_method_handler(
            _handler(f"pod-{i}", delay, fraction, rng))
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Call": handler}),))
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        servers.append(server)
    return servers, ports


async def drive_grpc(targets: list[tuple[str, str, str | None]], rate: float,
                     duration: float) -> LoadResult:
    """Open-loop unary calls: ``rate``/s per ``(client, host:port, authority)`` target for
    ``duration`` s, one channel per client. Bounded: rate × duration calls per client, each
    with a deadline, at most :data:`MAX_IN_FLIGHT` per client at once."""
    import grpc

    loop = asyncio.get_running_loop()
    result = LoadResult(t0=0.0, duration=duration)
    channels = []
    for _client, address, authority in targets:
        options = [("grpc.default_authority", authority)] if authority else []
        channels.append(grpc.aio.insecure_channel(address, options=options))
    try:
        await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), 10) for c in channels))
        result.t0 = loop.time() + 0.2
        stall0 = cpu_pressure_stall()
        count = int(rate * duration)

        async def one(client: str, call: Any, seq: int, intended: float,
                      gate: asyncio.Semaphore) -> None:
            async with gate:
                try:
                    reply = await call(b"x", timeout=CALL_TIMEOUT)
                    status, pod, error = 200, reply.decode(), None
                except grpc.aio.AioRpcError as exc:
                    status, pod, error = 0, None, exc.code().name
            result.records.append(Record(client, seq, intended, loop.time() - intended,
                                         status, pod, error))

        async def client(name: str, channel: Any) -> None:
            call = channel.unary_unary(METHOD)
            gate = asyncio.Semaphore(MAX_IN_FLIGHT)
            tasks = []
            for seq in range(count):
                intended = result.t0 + seq / rate
                await asyncio.sleep(max(0.0, intended - loop.time()))
                tasks.append(asyncio.create_task(one(name, call, seq, intended, gate)))
            await asyncio.gather(*tasks)

        await asyncio.gather(*(client(t[0], c) for t, c in zip(targets, channels, strict=True)))
        elapsed = loop.time() - result.t0
        if elapsed > 0:
            result.cpu_pressure = (cpu_pressure_stall() - stall0) / elapsed
        return result
    finally:
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)


class GrpcSlowPod(Scenario):
    name = "grpc-slow-pod"
    summary = "slow-pod over gRPC: grpcio pods and clients, one channel per client"
    default_policies = (PICK_FIRST, "round-robin", "peak-ewma", "equilibrium")
    default_duration = 30.0
    default_rate = 100.0

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--grpc-slow-pod-pods", type=int, default=5, help="pods (5)")
        group.add_argument("--grpc-slow-pod-delay", type=float, default=0.5,
                           help="seconds the bad pod adds (0.5)")
        group.add_argument("--grpc-slow-pod-fraction", type=float, default=0.5,
                           help="share of the bad pod's calls that are slow (0.5)")

    async def run(self, ctx: BenchContext) -> ScenarioResult:
        # grpcio's informational lines (e.g. on each sidecar's fork) would drown the progress
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
        args = ctx.args
        pods = args.grpc_slow_pod_pods
        bad_index = pods - 1
        bad = f"pod-{bad_index}"
        names = [f"pod-{i}" for i in range(pods)]
        params = {
            "pods": pods, "bad_pod": bad, "bad_delay_s": args.grpc_slow_pod_delay,
            "bad_fraction": args.grpc_slow_pod_fraction, "clients": args.clients,
            "rate_per_client": args.rate, "duration_per_policy_s": args.duration,
            "order": " → ".join(args.policies), "strategy": args.strategy or "default",
            "seed": args.seed, "transport": "gRPC unary over h2c, grpcio on both ends",
        }
        per_policy: dict[str, dict[str, Any]] = {}
        for step, policy in enumerate(args.policies, start=1):
            ctx.say(f"[{step}/{len(args.policies)}] {policy}: {args.clients} channels × "
                    f"{args.rate:g} calls/s for {args.duration:g} s")
            # fresh pods per contender: the bad pod's RNG starts from the same seed each time
            servers, ports = start_pods(pods, bad_index, args.grpc_slow_pod_delay,
                                        args.grpc_slow_pod_fraction, args.seed)
            load_average = _load_average()
            try:
                result = await self._one_run(ctx, policy, ports)
            finally:
                for server in servers:
                    server.stop(0)
            m = SlowPod._measure(result, names, bad)
            m["load_average_at_start"] = load_average
            m["pod_shares"] = {p: n / max(1, m["requests"]) for p, n in m["pod_totals"].items()}
            m["error_codes"] = _error_codes(result.records)
            per_policy[policy] = m
            ctx.say(f"    {policy}: p99 {ms(m['latency']['p99'])}, bad share "
                    f"{pct(m['bad_share'])} ({pct(m['bad_share_steady'])} steady), errors "
                    f"{m['errors']}, shift {secs(m['time_to_shift'])}")
        return ScenarioResult(
            parameters=params,
            tables=[self._table(per_policy), self._shares(per_policy, names),
                    *self._targets(per_policy)],
            data={"policies": per_policy},
            notes=self._notes(per_policy),
        )

    @staticmethod
    async def _one_run(ctx: BenchContext, policy: str, ports: list[int]) -> LoadResult:
        args = ctx.args
        clients = [f"{policy}-{c + 1}" for c in range(args.clients)]
        if policy == PICK_FIRST:
            # one pod per client, drawn as a Service VIP's connection would land (seeded)
            pin = random.Random(args.seed)
            pinned: list[tuple[str, str, str | None]] = [
                (c, f"127.0.0.1:{pin.choice(ports)}", None) for c in clients]
            return await drive_grpc(pinned, args.rate, args.duration)
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        sidecars = await start_sidecars(
            clients, {UPSTREAM: urls}, policy=policy, strategy=args.strategy,
            extra=args.sidecar_arg, stderr_path=str(ctx.logs / f"sidecar-{policy}.log"))
        try:
            targets: list[tuple[str, str, str | None]] = [
                (s.id, s.outbound_url.removeprefix("http://"), UPSTREAM) for s in sidecars]
            result = await drive_grpc(targets, args.rate, args.duration)
            states = await asyncio.gather(*(s.state() for s in sidecars))
            result.states = [StateSample(args.duration, s.id, st)
                             for s, st in zip(sidecars, states, strict=True)]
            return result
        finally:
            for s in sidecars:
                await s.stop()

    @staticmethod
    def _table(per_policy: dict[str, dict[str, Any]]) -> Table:
        rows = []
        for policy, m in per_policy.items():
            lat = m["latency"]
            rows.append([policy, str(m["requests"]), ms(lat["p50"]), ms(lat["p99"]),
                         ms(lat["p99.9"]), ms(m["steady_latency"]["p99"]), str(m["errors"]),
                         pct(m["bad_share"]), pct(m["bad_share_steady"]),
                         secs(m["time_to_shift"])])
        return Table(
            title="grpc-slow-pod: call latency from intended start, share sent to the bad pod",
            columns=["contender", "calls", "p50", "p99", "p99.9", "steady p99", "errors",
                     "bad share", "bad share (steady)", "time to < 5 %"],
            rows=rows,
        )

    @staticmethod
    def _shares(per_policy: dict[str, dict[str, Any]], names: list[str]) -> Table:
        rows = [[policy, *(pct(m["pod_shares"].get(n, 0.0)) for n in names)]
                for policy, m in per_policy.items()]
        return Table("grpc-slow-pod: share of calls per pod", ["contender", *names], rows)

    @staticmethod
    def _targets(per_policy: dict[str, dict[str, Any]]) -> list[Table]:
        eq = per_policy.get("equilibrium")
        if eq is None:
            return []
        share = eq["bad_share_steady"]
        rows = [["bad-pod share < 3 % (steady)", pct(share),
                 "met" if share < 0.03 else "missed"]]
        peak = per_policy.get("peak-ewma")
        if peak is not None:
            a, b = eq["latency"]["p99"], peak["latency"]["p99"]
            rows.append(["p99 no worse than peak-ewma's", f"{ms(a)} vs {ms(b)}",
                         "met" if a <= b else "missed"])
        return [Table("targets (issue 11) for equilibrium on grpc-slow-pod",
                      ["target", "measured", "verdict"], rows)]

    @staticmethod
    def _notes(per_policy: dict[str, dict[str, Any]]) -> list[str]:
        notes = [
            "Latency runs from each call's intended start on the open-loop schedule; "
            "percentiles are nearest-rank over all clients. Steady = second half of the run.",
            f"{PICK_FIRST}: no sidecar; each client's channel targets one pod's address (drawn "
            "at random with the seed, as a connection to a Service address lands on one pod), "
            "and grpcio's default pick_first keeps every call on it for the whole run: its bad "
            "share is 0 or 1/clients per pinned client, whichever pods were drawn.",
            "Pods and grpcio clients share the bench process (the pods' handlers run on "
            "thread pools); sidecars are their own processes.",
        ]
        loads = ", ".join(f"{p} {m['load_average_at_start']:.1f} (PSI "
                          f"{pct(m['cpu_pressure'])})" for p, m in per_policy.items())
        notes.append(f"Machine load at each contender's start (1-minute load average, CPU "
                     f"pressure during the run): {loads}.")
        for policy, m in per_policy.items():
            if m["error_codes"]:
                codes = ", ".join(f"{k} {v}" for k, v in sorted(m["error_codes"].items()))
                notes.append(f"{policy}: failed calls by gRPC status: {codes}.")
        return notes


def _error_codes(records: list[Record]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        if r.error:
            out[r.error] = out.get(r.error, 0) + 1
    return out


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


SCENARIO = GrpcSlowPod()
