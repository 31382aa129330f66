"""Scenario ``soak``: half an hour of hostile, faulty traffic through real sidecars, watched.

The mesh (all real processes on loopback):

- ``--soak-pods`` fleet pods (3), the last one slow like the seed's bad pod (500 ms added to
  half of its answers), each behind an **inbound sidecar with policing** (mode
  ``equilibrium``, capacity fixed at ``--soak-capacity`` requests/s per pod);
- ``--clients`` **cooperative callers** (3) and one **rogue**, each an open-loop load process
  (:mod:`equilibrium.lab.bench.soak_load`) behind its own **outbound sidecar**, which routes
  ``Host: app`` over the inbound sidecars; ``--rate`` is the *total* offered rate (500 req/s),
  of which the rogue sends ``--soak-rogue-share`` (half: three times each cooperative caller's);
- an **embedded Redis** (a real ``redis-server``) and one **signaler**, joined by every
  sidecar (the mesh key and the Redis URL in their environment, as the demo does). Redis is
  killed (SIGKILL) at 1/3 and 2/3 of the run and started again on the same port after
  ``--soak-redis-down`` seconds.

Every ``--soak-sample-interval`` seconds the parent reads each sidecar's, the signaler's and
the fleet's RSS and open descriptors from ``/proc``, and whether each sidecar and the signaler
answer ``/readyz``. The load processes report, per second, what completed, what succeeded and
the failures per caller by status, reason and who answered.

The verdict is :func:`equilibrium.lab.bench.soak_verdict.judge`: RSS of any sidecar or the
signaler growing more than 10 % from just after the warm-up (the first 20 %) to the end, open
files growing likewise, a checked process exiting, or any cooperative request failing, fails
the run; ``equilibrium bench`` then exits 1 after writing the report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from equilibrium.lab.bench.policing import metric
from equilibrium.lab.bench.scenarios import BenchContext, Scenario, ScenarioResult, Table
from equilibrium.lab.bench.soak_verdict import ResourceSample, Rules, Verdict, judge
from equilibrium.lab.embedded_redis import EmbeddedRedis
from equilibrium.lab.fleet import Fleet
from equilibrium.lab.processes import ChildProcess, cpu_pressure_now, free_port
from equilibrium.lab.sidecars import Sidecar
from equilibrium.lab.signaling_plane import SignalingPlane

UPSTREAM = "app"
ROGUE = "rogue"
LOAD_TIMEOUT = 5.0  # seconds per request in the load processes
START_DELAY = 5.0  # seconds for the load processes to import and connect before the schedule


@dataclass(slots=True)
class Watched:
    """A process whose resources are sampled; ``judged`` ones count in the verdict."""

    name: str
    pid: int
    judged: bool
    ready_url: str | None = None
    samples: list[ResourceSample] = field(default_factory=list)
    ready: list[tuple[float, bool]] = field(default_factory=list)
    exited_at: float | None = None
    #: an inbound sidecar's /metrics: its admission gauges are sampled too
    metrics_url: str | None = None
    gauges: list[tuple[float, dict[str, float]]] = field(default_factory=list)


INBOUND_GAUGES = ("concurrency_limit", "in_flight", "queue_length", "congestion")
"""``equilibrium_inbound_*`` gauges sampled with the resources (why a cooperative request got
a 503 queue-timeout: the limit, what was in flight and queued, the congestion level)."""


def read_proc(pid: int) -> tuple[float, int] | None:
    """(RSS in KiB, open descriptors) of ``pid`` from /proc, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            rss = next((float(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0.0)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return rss, fds


REFUSED_CONNECTIONS = "(connections closed at once)"
"""The row of the inbound table for the connections an inbound listener's caps refused."""


def caller_address(k: int) -> str:
    """The loopback address the ``k``-th caller's sidecar connects from (127.0.0.11, ...)."""
    return f"127.0.0.{11 + k}"


@dataclass(slots=True)
class CallerLog:
    """One caller's per-second bins as its load process reported them."""

    name: str
    cooperative: bool
    rate: float
    bins: list[dict[str, Any]] = field(default_factory=list)
    done: dict[str, Any] = field(default_factory=dict)

    def totals(self, key: str) -> Counter[str]:
        out: Counter[str] = Counter()
        for b in self.bins:
            out.update(b[key])
        return out

    def count(self, key: str) -> int:
        return sum(int(b[key]) for b in self.bins)


class Soak(Scenario):
    name = "soak"
    summary = ("30 min at 500 req/s through policing sidecars: a rogue, a slow pod, Redis "
               "killed twice; RSS, open files and errors over time")
    default_duration = 1800.0
    default_rate = 500.0  # total over all callers
    default_clients = 3  # cooperative callers

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--soak-pods", type=int, default=3,
                           help="pods, each behind an inbound sidecar; the last one slow (3)")
        group.add_argument("--soak-rogue-share", type=float, default=0.5,
                           help="share of --rate the rogue sends (0.5)")
        group.add_argument("--soak-servers", type=int, default=8,
                           help="concurrent servers per pod (8)")
        group.add_argument("--soak-service-rate", type=float, default=25.0,
                           help="requests/s per server, exponential service (25: mean 40 ms; "
                                "a pod serves 200 req/s)")
        group.add_argument("--soak-sample-interval", type=float, default=5.0,
                           help="seconds between resource samples (5)")
        group.add_argument("--soak-redis-down", type=float, default=5.0,
                           help="seconds Redis stays dead at each of its two kills (5)")

    def validate(self, args: argparse.Namespace) -> None:
        if args.soak_pods < 2:
            raise ValueError("--soak-pods: need at least 2 (one of them slow)")
        if not 0 < args.soak_rogue_share < 1:
            raise ValueError("--soak-rogue-share must be in (0, 1)")
        if args.soak_servers < 1 or args.soak_service_rate <= 0 or args.soak_redis_down < 0:
            raise ValueError("--soak-servers must be >= 1, --soak-service-rate > 0 and "
                             "--soak-redis-down >= 0")
        if not 0.5 <= args.soak_sample_interval <= args.duration / 30:
            raise ValueError("--soak-sample-interval must be >= 0.5 s and leave at least 30 "
                             "samples in --duration (3 in each window of the verdict)")

    def policing(self, servers: int, capacity: float) -> dict[str, Any]:
        """Inbound policing as an operator would set it for these pods (as ``retry-flood``
        does): the capacity known, and the concurrency limit never below the pod's servers."""
        return {"policing": {"mode": "equilibrium", "capacity": capacity,
                             "concurrency": {"min_limit": servers,
                                             "initial_limit": max(20, servers)}}}

    async def run(self, ctx: BenchContext) -> ScenarioResult:
        args = ctx.args
        self.validate(args)
        pods = args.soak_pods
        coop_names = [f"coop-{i + 1}" for i in range(args.clients)]
        rogue_rate = args.rate * args.soak_rogue_share
        coop_rate = (args.rate - rogue_rate) / args.clients
        duration = float(args.duration)
        capacity = args.soak_servers * args.soak_service_rate
        params = {"duration_s": duration, "total_rate_rps": args.rate,
                  "cooperative_callers": args.clients, "cooperative_rate_rps": coop_rate,
                  "rogue_rate_rps": rogue_rate, "pods": pods, "slow_pod": f"pod-{pods - 1}",
                  "servers_per_pod": args.soak_servers,
                  "service_rate_per_server": args.soak_service_rate,
                  "pod_capacity_rps": capacity,
                  "redis_kills_at_s": [round(duration / 3, 1), round(2 * duration / 3, 1)],
                  "redis_down_s": args.soak_redis_down,
                  "sample_interval_s": args.soak_sample_interval,
                  "warmup_share": Rules().warmup, "window_share": Rules().window,
                  "max_rss_growth": Rules().max_growth}
        pressure: list[tuple[float, float]] = []  # (t, CPU pressure %) while the load runs
        config = ctx.logs / "soak-config.json"
        config.write_text(json.dumps(self.policing(args.soak_servers, capacity)))
        redis = EmbeddedRedis(password=secrets.token_urlsafe(18))
        fleet: Fleet | None = None
        plane: SignalingPlane | None = None
        sidecars: list[Sidecar] = []
        loaders: list[ChildProcess] = []
        try:
            ctx.say(f"starting Redis, the signaler, {pods} pods (pod-{pods - 1} slow) and "
                    f"{pods + args.clients + 1} sidecars")
            redis.start()
            plane = SignalingPlane(ctx.logs, redis_url=redis.url, signer="soak",
                                   upstreams=[UPSTREAM])
            await plane.start()
            fleet = await Fleet.start(
                ["--pods", str(pods), "--bad", str(pods - 1), "--capacity",
                 str(args.soak_servers), "--service-rate", repr(args.soak_service_rate),
                 "--seed", str(args.seed)],
                stderr_path=str(ctx.logs / "fleet.log"))
            env = plane.sidecar_env()
            common = ["--config", str(config), *plane.sidecar_args(), *args.sidecar_arg]
            log = str(ctx.logs / "sidecars.log")
            inbound_addrs = [f"127.0.0.1:{free_port()}" for _ in range(pods)]
            for i, (addr, url) in enumerate(zip(inbound_addrs, fleet.urls, strict=True)):
                sidecars.append(await Sidecar.start(
                    f"pod-{i}-in", {}, extra=["--inbound", addr, "--app", url, *common],
                    stderr_path=log, env=env))
            upstreams = {UPSTREAM: [f"http://{a}" for a in inbound_addrs]}
            # Each caller's pod has an address of its own, as in a cluster, so the inbound
            # sidecars' cap per peer address (max_connections_per_source) sees four callers,
            # not one 127.0.0.1 that the rogue's connections would fill for everyone.
            for k, name in enumerate([*coop_names, ROGUE]):
                source = ["--source-address", caller_address(k)]
                sidecars.append(await Sidecar.start(
                    name, upstreams, strategy=args.strategy, extra=[*source, *common],
                    stderr_path=log, env=env))
            watched = [Watched(s.id, s.child.pid, True, s.admin_url + "/readyz",
                               metrics_url=s.admin_url + "/metrics" if i < pods else None)
                       for i, s in enumerate(sidecars)]
            assert plane.signaler is not None
            watched.append(Watched("signaler", plane.signaler.pid, True,
                                   f"http://{plane.admin}/readyz"))
            watched.append(Watched("fleet", fleet.child.pid, False))
            callers = [CallerLog(n, True, coop_rate) for n in coop_names]
            callers.append(CallerLog(ROGUE, False, rogue_rate))
            by_sidecar = {s.id: s for s in sidecars}
            loop = asyncio.get_running_loop()
            t0 = loop.time() + START_DELAY
            for c in callers:
                loaders.append(await ChildProcess.start(f"load {c.name}", [
                    sys.executable, "-m", "equilibrium.lab.bench.soak_load",
                    "--url", by_sidecar[c.name].outbound_url, "--host", UPSTREAM,
                    "--caller", c.name, "--own-sidecar", c.name, "--rate", repr(c.rate),
                    "--duration", repr(duration), "--start-at", repr(t0),
                    "--timeout", repr(LOAD_TIMEOUT)],
                    stderr_path=str(ctx.logs / f"load-{c.name}.log")))
            ctx.say(f"load: {args.clients} cooperative × {coop_rate:g} req/s + rogue "
                    f"{rogue_rate:g} req/s for {duration:g} s; Redis killed at "
                    f"{duration / 3:.0f} s and {2 * duration / 3:.0f} s")
            readers = [asyncio.create_task(self._read(c, child))
                       for c, child in zip(callers, loaders, strict=True)]
            stop = asyncio.Event()
            sampler = asyncio.create_task(self._sample(watched, t0, args.soak_sample_interval,
                                                       stop, ctx, callers, pressure))
            events: list[dict[str, Any]] = []
            chaos = asyncio.create_task(self._redis_chaos(redis, plane, t0, duration,
                                                          args.soak_redis_down, events, ctx))
            try:
                async with asyncio.timeout(START_DELAY + duration + 3 * LOAD_TIMEOUT + 60):
                    await asyncio.gather(*readers)
                await chaos
            finally:
                stop.set()
                await sampler
                chaos.cancel()
                for task in readers:
                    task.cancel()
            punishment, outcomes = await self._inbound_counts(sidecars[:pods],
                                                              [c.name for c in callers])
        finally:
            await asyncio.gather(*(c.stop() for c in loaders), return_exceptions=True)
            await asyncio.gather(*(s.stop() for s in sidecars), return_exceptions=True)
            if plane is not None:
                await plane.stop()
            redis.close()
            if fleet is not None:
                await fleet.stop()
        return self._result(ctx, params, duration, watched, callers, events, punishment,
                            outcomes, pressure)

    # ------------------------------------------------------------ during the run

    @staticmethod
    async def _read(caller: CallerLog, child: ChildProcess) -> None:
        while line := await child.readline():
            doc = json.loads(line)
            if doc.get("done") is True:
                caller.done = doc
            else:
                caller.bins.append(doc)

    @staticmethod
    async def _sample(watched: Sequence[Watched], t0: float, interval: float,
                      stop: asyncio.Event, ctx: BenchContext,
                      callers: Sequence[CallerLog],
                      pressure: list[tuple[float, float]]) -> None:
        loop = asyncio.get_running_loop()
        tick = 0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:

            async def ready(url: str) -> bool:
                try:
                    async with session.get(url) as resp:
                        return resp.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    return False

            async def gauges(url: str) -> dict[str, float] | None:
                try:
                    async with session.get(url) as resp:
                        text = await resp.text()
                except (aiohttp.ClientError, TimeoutError):
                    return None
                return {g: metric(text, f"equilibrium_inbound_{g}") for g in INBOUND_GAUGES}

            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, t0 + tick * interval
                                                            - loop.time()))
                if stop.is_set():
                    break
                t = loop.time() - t0
                tick += 1
                if t < 0:
                    continue
                oks = await asyncio.gather(*(ready(w.ready_url) for w in watched
                                             if w.ready_url))
                it = iter(oks)
                readings = await asyncio.gather(*(gauges(w.metrics_url) for w in watched
                                                  if w.metrics_url))
                for w, g in zip([w for w in watched if w.metrics_url], readings, strict=True):
                    if g is not None:
                        w.gauges.append((t, g))
                cpu = cpu_pressure_now()
                if cpu is not None:
                    pressure.append((t, cpu))
                for w in watched:
                    reading = read_proc(w.pid)
                    if reading is None:
                        if w.exited_at is None:
                            w.exited_at = t
                        continue
                    w.samples.append(ResourceSample(t, reading[0], reading[1]))
                    if w.ready_url:
                        w.ready.append((t, next(it)))
                if tick % max(1, round(60 / interval)) == 0:
                    failed = sum(c.count("n") - c.count("ok") - sum(c.totals("shed").values())
                                 for c in callers if c.cooperative)
                    rss = max((w.samples[-1].rss_kib for w in watched
                               if w.judged and w.samples), default=0.0)
                    busy = "" if cpu is None else f", CPU pressure {cpu:.0f} %"
                    ctx.say(f"  t={t:5.0f} s: largest RSS {rss / 1024:.1f} MiB, cooperative "
                            f"failures so far {failed}{busy}")

    @staticmethod
    async def _redis_chaos(redis: EmbeddedRedis, plane: SignalingPlane, t0: float,
                           duration: float, down: float, events: list[dict[str, Any]],
                           ctx: BenchContext) -> None:
        """Kill Redis at 1/3 and 2/3 of the run, start it again ``down`` s later, and time
        how long the signaler takes to answer /readyz 200 again."""
        loop = asyncio.get_running_loop()
        for k in (1, 2):
            await asyncio.sleep(max(0.0, t0 + k * duration / 3 - loop.time()))
            killed = loop.time() - t0
            redis.close()
            ctx.say(f"  t={killed:5.0f} s: Redis killed (SIGKILL)")
            await asyncio.sleep(down)
            redis.start()  # same port: the clients keep their URL
            restarted = loop.time() - t0
            recovered = None
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
                deadline = loop.time() + 120
                while loop.time() < deadline:
                    try:
                        async with s.get(f"http://{plane.admin}/readyz") as resp:
                            if resp.status == 200:
                                recovered = loop.time() - t0 - restarted
                                break
                    except (aiohttp.ClientError, TimeoutError):
                        pass
                    await asyncio.sleep(0.5)
            events.append({"kill": k, "killed_at_s": round(killed, 1),
                           "restarted_at_s": round(restarted, 1),
                           "signaler_ready_after_s": None if recovered is None
                           else round(recovered, 1)})
            ctx.say(f"  t={restarted:5.0f} s: Redis started again; signaler ready after "
                    f"{'never' if recovered is None else f'{recovered:.1f} s'}")

    @staticmethod
    async def _inbound_counts(
        inbound: Sequence[Sidecar], callers: Sequence[str],
    ) -> tuple[dict[str, float], dict[str, dict[str, dict[str, int]]]]:
        """From each inbound sidecar's /metrics at the end: the rogue's punishment level, and
        per caller the requests by outcome (admitted, throttled, queue-timeout, ...)."""
        out: dict[str, float] = {}
        outcomes: dict[str, dict[str, dict[str, int]]] = {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as s:
            for sc in inbound:
                try:
                    async with s.get(sc.admin_url + "/metrics") as resp:
                        text = await resp.text()
                except (aiohttp.ClientError, TimeoutError):
                    continue
                out[sc.id] = metric(text, "equilibrium_inbound_caller_punishment_level",
                                    caller=ROGUE)
                outcomes[sc.id] = {c: _outcomes(text, c) for c in callers}
                # connections its listener closed at once, for any caller (its caps)
                outcomes[sc.id][REFUSED_CONNECTIONS] = {
                    reason: int(metric(text, "equilibrium_inbound_connections_rejected_total",
                                       reason=reason)) for reason in ("cap", "per-source")}
        return out, outcomes

    # ------------------------------------------------------------ the report

    def _result(self, ctx: BenchContext, params: dict[str, Any], duration: float,
                watched: Sequence[Watched], callers: Sequence[CallerLog],
                events: list[dict[str, Any]], punishment: Mapping[str, float],
                outcomes: Mapping[str, Mapping[str, Mapping[str, int]]],
                pressure: Sequence[tuple[float, float]] = ()) -> ScenarioResult:
        judged = {w.name: w.samples for w in watched if w.judged}
        coop_fail = {c.name: dict(c.totals("fail")) for c in callers if c.cooperative}
        for c in callers:
            unaccounted = int(c.done.get("planned", 0)) - c.count("n")
            if c.cooperative and unaccounted > 0:
                coop_fail[c.name]["never completed"] = unaccounted
        exited = [w.name for w in watched if w.judged and w.exited_at is not None]
        verdict = judge(judged, duration, coop_fail, exited)
        missing = [c.name for c in callers if not c.done]
        if missing:
            verdict.passed = False
            verdict.reasons.append(f"load processes ended without their totals: {missing}")
        if len(events) < 2:
            verdict.passed = False
            verdict.reasons.append(f"Redis was restarted {len(events)} times, not 2")
        tables = [self._summary_table(verdict, watched),
                  self._caller_table(callers),
                  self._inbound_table(outcomes),
                  self._time_table(duration, watched, callers, events, pressure),
                  Table(title="soak: Redis kills (SIGKILL) and restarts",
                        columns=["kill", "killed at (s)", "started again at (s)",
                                 "signaler /readyz 200 after (s)"],
                        rows=[[str(e["kill"]), f"{e['killed_at_s']:g}",
                               f"{e['restarted_at_s']:g}",
                               "never" if e["signaler_ready_after_s"] is None
                               else f"{e['signaler_ready_after_s']:g}"] for e in events])]
        data = {
            "verdict": {"passed": verdict.passed, "reasons": verdict.reasons},
            "growth": {n: {"rss_first_kib": g.rss_first, "rss_last_kib": g.rss_last,
                           "rss_growth": g.rss_growth, "fds_first": g.fds_first,
                           "fds_last": g.fds_last, "samples_first": g.samples_first,
                           "samples_last": g.samples_last}
                       for n, g in verdict.growth.items()},
            "processes": {w.name: {"judged": w.judged, "exited_at_s": w.exited_at,
                                   "samples": [[s.t, s.rss_kib, s.fds] for s in w.samples],
                                   "ready": w.ready,
                                   **({"inbound_gauges": w.gauges} if w.metrics_url else {})}
                          for w in watched},
            "callers": {c.name: {"cooperative": c.cooperative, "rate_rps": c.rate,
                                 "totals": c.done, "failed": dict(c.totals("fail")),
                                 "shed": dict(c.totals("shed")), "bins": c.bins}
                        for c in callers},
            "redis_restarts": events,
            "cpu_pressure_some_avg10": [list(x) for x in pressure],
            "rogue_punishment_level_at_end": dict(punishment),
            "inbound_outcomes_by_caller": {k: dict(v) for k, v in outcomes.items()},
        }
        files = []
        plot = self._plot(ctx.out / "soak.png", watched, callers, events)
        if plot:
            files.append(plot)
        notes = [
            f"verdict: {'PASS' if verdict.passed else 'FAIL'}"
            + ("" if verdict.passed else " — " + "; ".join(verdict.reasons)),
            "Memory rule: per sidecar and the signaler, median RSS of the samples in the last "
            "10 % of the run over the median of the samples in the 10 % just after the warm-up "
            "(the first 20 %); more than +10 % fails. Open files fail when the last window is "
            f"more (+10 % and {Rules().fd_slack} descriptors) than both that first window and "
            "any earlier window after the warm-up (a new high at the end), or when they rise "
            "quarter after quarter (a ramp); a pool that grew in a burst and stays (a plateau) "
            "passes.",
            "A cooperative request fails when it gets no HTTP answer within 5 s (transport "
            "error or timeout), any status >= 400 (from its own sidecar, an inbound sidecar "
            "or the app), or is never sent because 512 were outstanding. Not a failure: a 429 "
            "with reason punished-backoff or punished-probation from the caller's own "
            "sidecar (it backs off, then paces its return, by design; nothing is sent); a "
            "cooperative caller should never see one, and the "
            "caller table shows any. A 503/429 that the rogue's flood causes a cooperative "
            "caller is a failure of the policing.",
            "CPU pressure: the share of time some runnable task of the machine waited for a "
            "CPU (/proc/pressure/cpu, some, avg10), "
            + (f"mean {sum(v for _, v in pressure) / len(pressure):.0f} % and highest "
               f"{max(v for _, v in pressure):.0f} % over the run" if pressure else "not read")
            + ". When it stays high the machine is saturated: every process under test "
            "waits for a core, and what fails may be the machine's doing rather than the "
            "mesh's.",
            "Redis is killed with SIGKILL (no shutdown, no persistence) and started again on "
            "the same port; 'signaler ready after' counts from the restart.",
            "rogue punishment level at the end per inbound sidecar: "
            + (", ".join(f"{k} {v:g}" for k, v in punishment.items()) or "not read"),
        ]
        result = ScenarioResult(parameters=params, tables=tables, data=data, notes=notes,
                                files=files)
        ctx.say(f"soak verdict: {'PASS' if verdict.passed else 'FAIL'}")
        for reason in verdict.reasons:
            ctx.say(f"  - {reason}")
        return result

    @staticmethod
    def _summary_table(verdict: Verdict, watched: Sequence[Watched]) -> Table:
        rows = []
        for w in watched:
            g = verdict.growth.get(w.name)
            last = w.samples[-1] if w.samples else None
            if g is None or g.rss_first is None or g.rss_last is None:
                growth_cells = ["—", "—", "—", "—"]
            else:
                growth_cells = [f"{g.rss_first / 1024:.1f}", f"{g.rss_last / 1024:.1f}",
                                f"{(g.rss_growth or 0):+.1%}",
                                f"{g.fds_first:g} → {g.fds_last:g}"]
            peak = max((s.rss_kib for s in w.samples), default=0.0)
            ready = [ok for _, ok in w.ready]
            rows.append([
                w.name, "yes" if w.judged else "no", *growth_cells, f"{peak / 1024:.1f}",
                "—" if last is None else str(last.fds),
                "—" if not ready else f"{sum(ready) / len(ready):.0%}",
                "exited" if w.exited_at is not None else "running",
            ])
        return Table(title="soak: memory and open files per process (MiB; medians of the "
                           "windows)",
                     columns=["process", "judged", "RSS after warm-up", "RSS at end",
                              "growth", "open files", "peak RSS", "fds at end", "/readyz 200",
                              "at end"],
                     rows=rows)

    @staticmethod
    def _inbound_table(outcomes: Mapping[str, Mapping[str, Mapping[str, int]]]) -> Table:
        rows = []
        for inbound, per_caller in outcomes.items():
            for caller, counts in per_caller.items():
                listed = ", ".join(f"{k} {n}" for k, n in sorted(counts.items(),
                                                                key=lambda kv: -kv[1]))
                rows.append([inbound, caller, listed or "—"])
        return Table(title="soak: what each inbound sidecar did with each caller's requests "
                           "(equilibrium_inbound_requests_total at the end)",
                     columns=["inbound sidecar", "caller", "requests by outcome"], rows=rows)

    @staticmethod
    def _caller_table(callers: Sequence[CallerLog]) -> Table:
        rows = []
        for c in callers:
            fail, shed = c.totals("fail"), c.totals("shed")
            done, ok = c.count("n"), c.count("ok")
            rows.append([c.name, "cooperative" if c.cooperative else "rogue",
                         f"{c.rate:g}", str(c.done.get("planned", "—")), str(done), str(ok),
                         str(sum(fail.values())),
                         ", ".join(f"{n} × {k}" for k, n in fail.most_common(4)) or "—",
                         str(sum(shed.values()))])
        return Table(title="soak: requests per caller",
                     columns=["caller", "role", "req/s", "planned", "completed", "ok",
                              "failed", "failures by kind", "shed by own sidecar"],
                     rows=rows)

    @staticmethod
    def _time_table(duration: float, watched: Sequence[Watched],
                    callers: Sequence[CallerLog], events: Sequence[Mapping[str, Any]],
                    pressure: Sequence[tuple[float, float]] = ()) -> Table:
        steps = 12
        step = duration / steps
        sidecars = [w for w in watched if w.judged]
        rows = []
        for k in range(steps):
            a, b = k * step, (k + 1) * step
            coop = [x for c in callers if c.cooperative for x in c.bins if a <= x["bin"] < b]
            rogue = [x for c in callers if not c.cooperative for x in c.bins
                     if a <= x["bin"] < b]
            coop_ok = sum(x["ok"] for x in coop)
            coop_fail = sum(sum(x["fail"].values()) for x in coop)
            rogue_ok = sum(x["ok"] for x in rogue)
            rogue_shed = sum(sum(x["shed"].values()) for x in rogue)
            rogue_fail = sum(sum(x["fail"].values()) for x in rogue)
            p99 = max((x["p99"] for x in coop if x["p99"] is not None), default=None)
            cells = []
            for w in sidecars:
                inside = [s for s in w.samples if a <= s.t < b]
                cells.append("—" if not inside else
                             f"{inside[-1].rss_kib / 1024:.0f}/{inside[-1].fds}")
            marks = "".join(" R✝" for e in events if a <= e["killed_at_s"] < b)
            cpu = [v for t, v in pressure if a <= t < b]
            rows.append([f"{a:.0f}–{b:.0f}{marks}", f"{coop_ok / step:.0f}", str(coop_fail),
                         "—" if p99 is None else f"{p99 * 1000:.0f}",
                         f"{rogue_ok / step:.0f}", f"{rogue_shed / step:.0f}",
                         str(rogue_fail), f"{sum(cpu) / len(cpu):.0f}" if cpu else "—",
                         *cells])
        return Table(
            title="soak over time (R✝: Redis killed in this interval; per process: RSS MiB / "
                  "open files at the interval's last sample)",
            columns=["t (s)", "coop ok/s", "coop failed", "coop worst 1-s p99 (ms)",
                     "rogue ok/s", "rogue shed/s", "rogue failed", "CPU pressure (%)",
                     *(w.name for w in sidecars)],
            rows=rows)

    @staticmethod
    def _plot(path: Path, watched: Sequence[Watched], callers: Sequence[CallerLog],
              events: Sequence[Mapping[str, Any]]) -> str | None:
        try:
            from matplotlib.figure import Figure
        except ImportError:  # the lab extra is missing: the tables still say everything
            return None
        fig = Figure(figsize=(10, 8), layout="constrained")
        ax_rss, ax_fds, ax_req = fig.subplots(3, 1, sharex=True, height_ratios=[3, 2, 2])
        for w in watched:
            if not w.samples:
                continue
            ts = [s.t for s in w.samples]
            ax_rss.plot(ts, [s.rss_kib / 1024 for s in w.samples], label=w.name, lw=1)
            ax_fds.plot(ts, [s.fds for s in w.samples], label=w.name, lw=1)
        for c in callers:
            ts = [x["bin"] for x in c.bins]
            ax_req.plot(ts, [x["ok"] for x in c.bins], lw=0.8, label=f"{c.name} ok/s")
            fails = [sum(x["fail"].values()) for x in c.bins]
            if any(fails):
                ax_req.plot(ts, fails, lw=0.8, ls="--", label=f"{c.name} failed/s")
        for ax in (ax_rss, ax_fds, ax_req):
            for e in events:
                ax.axvline(e["killed_at_s"], color="red", lw=0.8, ls=":")
        ax_rss.set_ylabel("RSS (MiB)")
        ax_fds.set_ylabel("open files")
        ax_req.set_ylabel("requests/s")
        ax_req.set_xlabel("seconds (red: Redis killed)")
        ax_rss.legend(fontsize=7, ncol=3)
        ax_req.legend(fontsize=7, ncol=3)
        fig.suptitle("equilibrium bench --scenario soak")
        fig.savefig(path, dpi=110)
        return str(path)


def _outcomes(text: str, caller: str) -> dict[str, int]:
    """``equilibrium_inbound_requests_total`` of one caller by outcome, from /metrics text."""
    out: dict[str, int] = {}
    head = "equilibrium_inbound_requests_total{"
    for line in text.splitlines():
        if not line.startswith(head) or f'caller="{caller}"' not in line:
            continue
        labels, _, value = line.rpartition(" ")
        _, _, rest = labels.partition('outcome="')
        outcome = rest.split('"', 1)[0]
        with contextlib.suppress(ValueError):
            if outcome and float(value):
                out[outcome] = out.get(outcome, 0) + int(float(value))
    return out


SCENARIO = Soak()
