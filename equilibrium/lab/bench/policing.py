"""Scenarios ``retry-flood`` and ``overload-bids``: the inbound side against its baselines.

One capacity-limited app (a fleet pod with ``c`` servers and exponential service times, an
M/M/c queue) sits behind an inbound sidecar; every caller has its own outbound sidecar
(``--id``, the mesh key). Each run compares, one after another, the
inbound modes (``policing.mode``), each against a fresh app process (a backlog left
in the app by one mode must not slow the next):

- ``off``: a plain reverse proxy (what the app gets without any protection);
- ``token-bucket``: one Envoy-style local rate limit for all callers at 90 % of the app's capacity
  (Envoy's ``local_ratelimit`` filter: a token bucket, 429 when empty);
- ``equilibrium``: identity, folk-theorem reputation and punishment, adaptive concurrency
  limit and the second-price bid queue.

``retry-flood``: two cooperative callers at well under their fair share and one rogue that
sends ten times its fair share and retries every failure at once (twice), as a misbehaving
client does. Reported: the cooperative callers' success and latency, the rogue's goodput and
attempts, who got the 429s, and when the rogue was first refused.

``overload-bids``: two callers at the same rate, together 25 % over the app's capacity; one
bids 5 per request (``X-Equilibrium-Bid``), the other 1. Reported per caller: success,
latency and the prices charged (``X-Equilibrium-Price``).

Load comes from ``python -m equilibrium.lab.bench.policing load ...`` processes (open loop,
latency from the intended start; one per caller, so the flood never shares an event loop
with the callers it is compared with). Unlike :mod:`equilibrium.lab.loadgen` it can retry
failed requests and set request headers, which both scenarios need.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import secrets
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from equilibrium.lab.bench.report import ms, pct
from equilibrium.lab.bench.scenarios import BenchContext, Scenario, ScenarioResult, Table
from equilibrium.lab.fleet import Fleet
from equilibrium.lab.loadgen import latency_summary
from equilibrium.lab.processes import ChildProcess, free_port
from equilibrium.lab.sidecars import Sidecar
from equilibrium.lab.signaling_plane import MESH_KEY_ENV

MODES = ("off", "token-bucket", "equilibrium")
NO_ROGUE = "off, no rogue"  # the cooperative callers' baseline
UPSTREAM = "app"
BID_HEADER = "X-Equilibrium-Bid"
PRICE_HEADER = "X-Equilibrium-Price"
TIMEOUT = 5.0  # per attempt, in the load processes


# ---------------------------------------------------------------- the load process


@dataclass(frozen=True, slots=True)
class Shot:
    """One logical request as its caller saw it (after its own retries)."""

    caller: str
    intended: float
    latency: float
    status: int
    attempts: int
    price: float | None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


async def open_loop(session: aiohttp.ClientSession, url: str, *, caller: str, rate: float,
                    duration: float, host: str = UPSTREAM, retries: int = 0,
                    headers: Mapping[str, str] | Callable[[], Mapping[str, str]] | None = None,
                    ) -> list[Shot]:
    """``rate`` requests/s to ``url`` for ``duration`` s on a fixed schedule (open loop:
    latency counts from the intended start); a failed attempt (status >= 400 or no answer
    within ``TIMEOUT``) is retried at once, up to ``retries`` times, as a misbehaving client
    does. The integration tests drive the same loop in their own event loop. ``headers`` may
    be a function, called for every attempt (a signed identity is good for one request)."""
    loop = asyncio.get_running_loop()
    def send() -> dict[str, str]:
        return {"Host": host, **((headers() if callable(headers) else headers) or {})}

    shots: list[Shot] = []
    count = max(1, math.floor(rate * duration))

    async def one(intended: float) -> None:
        status, attempts, price = 0, 0, None
        while attempts <= retries:
            attempts += 1
            try:
                async with asyncio.timeout(TIMEOUT):
                    async with session.get(url + "/", headers=send()) as resp:
                        await resp.read()
                        status = resp.status
                        raw = resp.headers.get(PRICE_HEADER)
                        price = float(raw) if raw is not None else None
            except (aiohttp.ClientError, TimeoutError, ValueError):
                status = 0
            if 0 < status < 400:
                break
        shots.append(Shot(caller, intended, loop.time() - intended, status, attempts, price))

    t0 = loop.time() + 0.05
    tasks = []
    for i in range(count):
        intended = t0 + i / rate
        delay = intended - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(intended)))
    await asyncio.gather(*tasks)
    return shots


async def _load(args: argparse.Namespace, headers: dict[str, str]) -> list[Shot]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        return await open_loop(session, args.url, caller=args.caller, rate=args.rate,
                               duration=args.duration, host=args.host, retries=args.retries,
                               headers=headers)


def load_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m equilibrium.lab.bench.policing load")
    p.add_argument("--url", required=True)
    p.add_argument("--host", default=UPSTREAM)
    p.add_argument("--caller", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--retries", type=int, default=0)
    p.add_argument("--header", action="append", default=[], metavar="NAME=VALUE")
    args = p.parse_args(argv)
    if not (0 < args.rate <= 5000 and 0 < args.duration <= 600 and 0 <= args.retries <= 5):
        p.error("need 0 < rate <= 5000, 0 < duration <= 600, 0 <= retries <= 5")
    headers = dict(h.split("=", 1) for h in args.header)
    shots = asyncio.run(_load(args, headers))
    for s in shots:
        sys.stdout.write(json.dumps([s.intended, s.latency, s.status, s.attempts, s.price])
                         + "\n")
    return 0


async def run_load(url: str, caller: str, rate: float, duration: float, logs: Path,
                   retries: int = 0, headers: dict[str, str] | None = None,
                   host: str = UPSTREAM) -> list[Shot]:
    """Run one ``load`` process to the end and collect its shots (bounded in time)."""
    argv = [sys.executable, "-m", "equilibrium.lab.bench.policing", "load", "--url", url,
            "--host", host, "--caller", caller, "--rate", repr(rate),
            "--duration", repr(duration),
            "--retries", str(retries),
            *(f"--header={k}={v}" for k, v in (headers or {}).items())]
    child = await ChildProcess.start(f"load {caller}", argv,
                                     stderr_path=str(logs / f"load-{caller}.log"))
    shots = []
    try:
        async with asyncio.timeout(duration + 3 * TIMEOUT * (retries + 1) + 30):
            while line := await child.readline():
                t, lat, status, attempts, price = json.loads(line)
                shots.append(Shot(caller, t, lat, status, attempts, price))
    finally:
        await child.stop()
    return shots


# ---------------------------------------------------------------- the mesh


@dataclass
class Mesh:
    inbound: Sidecar
    callers: dict[str, Sidecar]

    async def metrics(self) -> str:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as s, \
                s.get(self.inbound.admin_url + "/metrics") as resp:
            return await resp.text()

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop() for s in [self.inbound, *self.callers.values()]),
                             return_exceptions=True)


async def start_mesh(ctx: BenchContext, app_url: str, callers: Sequence[str],
                     policing: dict[str, Any], tag: str) -> Mesh:
    # The mesh key reaches the sidecars only through their environment: no file, no argv.
    env = {MESH_KEY_ENV: secrets.token_hex(32)}
    config = ctx.logs / f"policing-{tag}.json"
    config.write_text(json.dumps({"policing": policing}))
    common = ["--config", str(config), "--max-attempts", "1"]
    inbound_addr = f"127.0.0.1:{free_port()}"
    log = str(ctx.logs / f"sidecars-{tag}.log")
    inbound = await Sidecar.start(f"app-{tag}", {}, extra=[
        "--inbound", inbound_addr, "--app", app_url, *common], stderr_path=log, env=env)
    try:
        started = await asyncio.gather(*(
            Sidecar.start(name, {UPSTREAM: [f"http://{inbound_addr}"]}, extra=common,
                          stderr_path=log, env=env) for name in callers), return_exceptions=True)
        failed = [r for r in started if isinstance(r, BaseException)]
        ok = [r for r in started if isinstance(r, Sidecar)]
        if failed:
            await asyncio.gather(*(s.stop() for s in ok), return_exceptions=True)
            raise failed[0]
    except BaseException:
        await inbound.stop()
        raise
    return Mesh(inbound, dict(zip(callers, ok, strict=True)))


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{", 1)[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def summarize(shots: Sequence[Shot]) -> dict[str, Any]:
    lat = latency_summary([s.latency for s in shots])
    prices = [s.price for s in shots if s.price is not None]
    return {
        "requests": len(shots),
        "success": sum(s.ok for s in shots) / max(1, len(shots)),
        "status": {str(k): sum(1 for s in shots if s.status == k)
                   for k in sorted({s.status for s in shots})},
        "attempts": sum(s.attempts for s in shots),
        "latency": lat,
        "mean_price": math.fsum(prices) / len(prices) if prices else None,
        "max_price": max(prices) if prices else None,
    }


# ---------------------------------------------------------------- scenarios


class PolicingScenario(Scenario):
    """Common options: the app, and the inbound modes compared (in order)."""

    default_duration = 20.0

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        prefix = f"--{self.name}"
        group.add_argument(f"{prefix}-modes", default=",".join(MODES),
                           help=f"inbound modes compared, in order ({','.join(MODES)})")
        group.add_argument(f"{prefix}-servers", type=int, default=8,
                           help="the app's concurrent servers (8)")
        group.add_argument(f"{prefix}-service-rate", type=float, default=5.0,
                           help="requests/s per server, exponential service (5: mean 200 ms)")

    def options(self, args: argparse.Namespace) -> tuple[list[str], int, float]:
        attr = self.name.replace("-", "_")
        modes = [m.strip() for m in getattr(args, f"{attr}_modes").split(",") if m.strip()]
        unknown = [m for m in modes if m not in MODES]
        if unknown or not modes:
            raise ValueError(f"--{self.name}-modes: choose from {', '.join(MODES)}")
        servers = getattr(args, f"{attr}_servers")
        service_rate = getattr(args, f"{attr}_service_rate")
        if servers < 1 or service_rate <= 0:
            raise ValueError("the app needs at least one server and a positive service rate")
        return modes, servers, service_rate

    def policing(self, mode: str, capacity: float, servers: int) -> dict[str, Any]:
        """Each mode configured with what an operator knows about the app: the token bucket
        at 90 % of its capacity; the concurrency limit never below its number of workers
        (with exponential service times minRTT is far below the median RTT, and a gradient
        limiter left alone shrinks the limit under the app's parallelism)."""
        rate = round(0.9 * capacity, 3)
        return {"mode": mode, "token_bucket": {"rate": rate, "burst": rate},
                "concurrency": {"min_limit": servers, "initial_limit": max(20, servers)}}

    async def with_app(self, ctx: BenchContext, servers: int, service_rate: float) -> Fleet:
        return await Fleet.start(
            ["--pods", "1", "--capacity", str(servers), "--service-rate", repr(service_rate),
             "--seed", str(ctx.args.seed)], stderr_path=str(ctx.logs / "fleet.log"))


class RetryFlood(PolicingScenario):
    name = "retry-flood"
    summary = "a rogue caller floods at 10x its fair share with retries; two cooperate"
    default_rate = 5.0  # per cooperative caller

    async def run(self, ctx: BenchContext) -> ScenarioResult:
        args = ctx.args
        modes, servers, mu = self.options(args)
        capacity = servers * mu
        fair = capacity / 3
        rogue_rate = 10 * fair
        params = {"app_capacity_rps": capacity, "servers": servers, "service_rate": mu,
                  "cooperative_rate_rps": args.rate, "rogue_rate_rps": round(rogue_rate, 1),
                  "rogue_retries": 2, "duration_per_mode_s": args.duration,
                  "runs": " → ".join([NO_ROGUE, *modes]), "token_bucket_rate_rps": 0.9 * capacity}
        per_mode: dict[str, Any] = {}
        runs = [(NO_ROGUE, "off", 0.0), *((mode, mode, rogue_rate) for mode in modes)]
        for i, (label, mode, flood) in enumerate(runs, 1):
            ctx.say(f"[{i}/{len(runs)}] {label}: 2 cooperative callers × {args.rate:g} "
                    f"req/s, rogue {flood:.0f} req/s + retries, {args.duration:g} s")
            fleet = await self.with_app(ctx, servers, mu)
            try:
                mesh = await start_mesh(ctx, fleet.urls[0], ["coop-a", "coop-b", "rogue"],
                                        self.policing(mode, capacity, servers), f"run{i}-{mode}")
                try:
                    await self._warm_up(ctx, mesh)
                    loads = [run_load(mesh.callers[c].outbound_url, c, args.rate,
                                      args.duration, ctx.logs) for c in ("coop-a", "coop-b")]
                    if flood:
                        loads.append(run_load(mesh.callers["rogue"].outbound_url, "rogue",
                                              flood, args.duration, ctx.logs, retries=2))
                    coop_a, coop_b, *rest = await asyncio.gather(*loads)
                    rogue = rest[0] if rest else []
                    text = await mesh.metrics()
                finally:
                    await mesh.stop()
            finally:
                await fleet.stop()
            per_mode[label] = self._measure(coop_a + coop_b, rogue, text, args.duration)
            m = per_mode[label]
            ctx.say(f"    cooperative success {pct(m['coop']['success'])}, p99 "
                    f"{ms(m['coop']['latency']['p99'])}; rogue goodput "
                    f"{m['rogue_goodput_rps']:.1f} req/s")
        return ScenarioResult(parameters=params, tables=[self._table(per_mode)],
                              data={"modes": per_mode}, notes=self._notes())

    @staticmethod
    async def _warm_up(ctx: BenchContext, mesh: Mesh) -> None:
        """A few calm seconds so the concurrency limiter has measured the app."""
        await asyncio.gather(*(run_load(mesh.callers[c].outbound_url, c, 5.0, 2.0, ctx.logs)
                               for c in ("coop-a", "coop-b")))

    @staticmethod
    def _measure(coop: list[Shot], rogue: list[Shot], text: str,
                 duration: float) -> dict[str, Any]:
        start = min((s.intended for s in rogue), default=0.0)
        refused = [s.intended + s.latency - start for s in rogue if s.status == 429]
        return {
            "coop": summarize(coop),
            "rogue": summarize(rogue),
            "rogue_goodput_rps": sum(s.ok for s in rogue) / duration,
            "rogue_attempts_rps": sum(s.attempts for s in rogue) / duration,
            "coop_429": sum(1 for s in coop if s.status == 429),
            "rogue_first_429_s": min(refused) if refused else None,
            "rogue_level": metric(text, "equilibrium_inbound_caller_punishment_level",
                                  caller="rogue"),
            "app_requests": metric(text, "equilibrium_inbound_requests_total",
                                   outcome="admitted"),
        }

    @staticmethod
    def _table(per_mode: dict[str, Any]) -> Table:
        rows = []
        for mode, m in per_mode.items():
            c = m["coop"]
            first = m["rogue_first_429_s"]
            quiet = mode == NO_ROGUE
            rows.append([
                mode, pct(c["success"]), ms(c["latency"]["p50"]), ms(c["latency"]["p99"]),
                ms(c["latency"]["p99.9"]), str(m["coop_429"]),
                "—" if quiet else f"{m['rogue_goodput_rps']:.1f}",
                "—" if quiet else f"{m['rogue_attempts_rps']:.0f}",
                "—" if quiet else pct(m["rogue"]["success"]),
                "—" if quiet else ("never" if first is None else f"{first:.1f} s"),
            ])
        return Table(
            title="retry-flood: cooperative callers vs a rogue with retries",
            columns=["inbound mode", "coop success", "coop p50", "coop p99", "coop p99.9",
                     "coop 429s", "rogue goodput (req/s)", "rogue attempts/s",
                     "rogue success", "rogue first refused"],
            rows=rows,
        )

    @staticmethod
    def _notes() -> list[str]:
        return [
            f"'{NO_ROGUE}' is the cooperative callers' baseline: the same load with the rogue "
            "silent. The app's service times are exponential (mean 200 ms), so its own p99 is "
            "about 0.9 s before any queueing.",
            "Latency runs from each request's intended start (open loop), over the whole run, "
            "including the seconds before the rogue is detected; a failed cooperative "
            "request counts at the time it failed.",
            "Rogue attempts/s counts its retries and, in equilibrium mode, the requests its "
            "own sidecar answered 429 locally while backing off (they never reach the app).",
            "token-bucket is one shared bucket at 90 % of the app's capacity (Envoy local rate "
            "limit): it cannot tell callers apart, so the cooperative callers pay for the flood.",
        ]


class OverloadBids(PolicingScenario):
    name = "overload-bids"
    summary = "two callers 25 % over capacity; one bids 5, the other 1"
    default_rate = 25.0  # per caller

    HIGH, LOW = 5.0, 1.0

    def policing(self, mode: str, capacity: float, servers: int) -> dict[str, Any]:
        # budgets that cover a whole run of bidding, so the queue's order is what is measured
        return {**super().policing(mode, capacity, servers),
                "auction": {"budget_rate": 200, "budget_cap": 2000},
                "reputation": {"rate_tolerance": 10}}

    async def run(self, ctx: BenchContext) -> ScenarioResult:
        args = ctx.args
        modes, servers, mu = self.options(args)
        capacity = servers * mu
        rate = args.rate
        params = {"app_capacity_rps": capacity, "servers": servers, "service_rate": mu,
                  "rate_per_caller_rps": rate, "load_vs_capacity": round(2 * rate / capacity, 2),
                  "bids": {"high": self.HIGH, "low": self.LOW},
                  "duration_per_mode_s": args.duration, "modes": " → ".join(modes)}
        per_mode: dict[str, Any] = {}
        for i, mode in enumerate(modes, 1):
            ctx.say(f"[{i}/{len(modes)}] {mode}: high and low bidder × {rate:g} req/s "
                    f"(capacity {capacity:g}), {args.duration:g} s")
            fleet = await self.with_app(ctx, servers, mu)
            try:
                mesh = await start_mesh(ctx, fleet.urls[0], ["high", "low"],
                                        self.policing(mode, capacity, servers), f"bids-{mode}")
                try:
                    await asyncio.gather(*(run_load(mesh.callers[c].outbound_url, c, 5.0, 2.0,
                                                    ctx.logs) for c in ("high", "low")))
                    high, low = await asyncio.gather(*(
                        run_load(mesh.callers[c].outbound_url, c, rate, args.duration,
                                 ctx.logs, headers={BID_HEADER: f"{bid:g}"})
                        for c, bid in (("high", self.HIGH), ("low", self.LOW))))
                finally:
                    await mesh.stop()
            finally:
                await fleet.stop()
            per_mode[mode] = {"high": summarize(high), "low": summarize(low)}
            h, lo = per_mode[mode]["high"], per_mode[mode]["low"]
            ctx.say(f"    high p99 {ms(h['latency']['p99'])} ({pct(h['success'])} ok), "
                    f"low p99 {ms(lo['latency']['p99'])} ({pct(lo['success'])} ok)")
        rows = []
        for mode, m in per_mode.items():
            for who, bid in (("high", self.HIGH), ("low", self.LOW)):
                s = m[who]
                price = "—" if s["mean_price"] is None else f"{s['mean_price']:.2f}"
                top = "—" if s["max_price"] is None else f"{s['max_price']:g}"
                rows.append([mode, f"{who} (bid {bid:g})", pct(s["success"]),
                             ms(s["latency"]["p50"]), ms(s["latency"]["p99"]), price, top])
        table = Table(
            title="overload-bids: who is served under overload, and what it costs",
            columns=["inbound mode", "caller", "success", "p50", "p99", "mean price",
                     "max price"],
            rows=rows,
        )
        notes = [
            "Prices are the second price the inbound side charged (X-GT-Price, handed to the "
            "app as X-Equilibrium-Price): the highest losing bid, 0 when uncongested; the "
            "baselines charge nothing and send no price.",
            "Failures are 503s (no slot within policing.max_wait, 2 s) in equilibrium mode, "
            "429s in token-bucket mode, and timeouts (5 s) without policing.",
        ]
        return ScenarioResult(parameters=params, tables=[table], data={"modes": per_mode},
                              notes=notes)


RETRY_FLOOD = RetryFlood()
OVERLOAD_BIDS = OverloadBids()


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["load"]:
        return load_main(argv[1:])
    print("usage: python -m equilibrium.lab.bench.policing load --url URL --caller NAME ...",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
