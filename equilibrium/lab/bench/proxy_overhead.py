"""Scenario ``proxy-overhead``: the same load straight to a backend and through one sidecar.

One fast pod (no service time, no jitter) and one sidecar in front of it. The run alternates
segments, direct then proxied, ``rounds`` times, each segment a fresh open-loop generator at
the same rate, so slow drifts of the machine (other processes, thermal, caches) hit both
modes alike. One unmeasured segment per mode warms the proxy up first (a long-running proxy
is warm), and the first ``warmup`` seconds of each segment are discarded (connection set-up).
Reported: latency percentiles per mode, the latency the proxy adds (proxied minus direct) at
p50, p99 and p99.9, their ratios, and the added p50/p99 of every round to show the spread.

Real peers (``--peers``, :mod:`equilibrium.lab.bench.peers`): HAProxy and nginx, one worker
each, stand in front of the same pod as further modes of every round, so the CPU per request
of each proxy (its process tree, from ``/proc``) and its added latency come out side by side,
as ratios to HAProxy's. Then the most requests per second one core sustains: each proxy pinned
to one CPU in front of a static backend (nginx ``return 200``), ``wrk`` on the other CPU for
``--overhead-max-duration`` seconds (needs nginx and wrk; skipped with a note otherwise).

``--overhead-listener inbound`` measures the sidecar's other half instead: its inbound
listener in front of the pod (``--inbound``/``--app``, policing as configured, the load an
anonymous caller), the place where HAProxy and nginx usually stand as reverse proxies.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
from typing import Any

from equilibrium.lab.bench import peers
from equilibrium.lab.bench.harness import LoadTarget, drive_load
from equilibrium.lab.bench.report import ms
from equilibrium.lab.bench.scenarios import BenchContext, Scenario, ScenarioResult, Table
from equilibrium.lab.fleet import Fleet
from equilibrium.lab.loadgen import Record, latency_summary
from equilibrium.lab.processes import cpu_seconds, free_port
from equilibrium.lab.sidecars import Sidecar

UPSTREAM = "backend"


async def _start_sidecar(ctx: BenchContext, name: str, pod: str, policy: str,
                         log: str) -> tuple[Sidecar, str, str | None]:
    """The measured sidecar in front of ``pod``, and the URL and ``Host`` the load uses: its
    outbound listener (routing by ``Host``), or its inbound listener (``--overhead-listener
    inbound``: the pod is its app)."""
    args = ctx.args
    if args.overhead_listener == "inbound":
        port = free_port()
        sidecar = await Sidecar.start(
            name, {}, policy=policy, strategy=args.strategy,
            extra=[*args.sidecar_arg, "--inbound", f"127.0.0.1:{port}", "--app", pod],
            stderr_path=str(ctx.logs / log))
        return sidecar, f"http://127.0.0.1:{port}", None
    sidecar = await Sidecar.start(name, {UPSTREAM: [pod]}, policy=policy,
                                  strategy=args.strategy, extra=args.sidecar_arg,
                                  stderr_path=str(ctx.logs / log))
    return sidecar, sidecar.outbound_url, UPSTREAM


def _kept(records: list[Record], rate: float, warmup: float) -> list[float]:
    """Latencies of answered requests scheduled after the first ``warmup`` seconds."""
    skip = round(warmup * rate)
    return [r.latency for r in records if r.ok and r.seq >= skip]


class ProxyOverhead(Scenario):
    name = "proxy-overhead"
    summary = "the same open-loop load direct to a backend and through one sidecar"
    default_policies = ("equilibrium",)
    default_duration = 20.0
    default_rate = 500.0
    uses_peers = True

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--overhead-rounds", type=int, default=4,
                           help="direct/proxied alternations (4)")
        group.add_argument("--overhead-warmup", type=float, default=1.0,
                           help="seconds discarded at the start of each segment (1)")
        group.add_argument("--overhead-warmup-segment", type=float, default=3.0,
                           help="unmeasured seconds per mode before the first round (3)")
        group.add_argument("--overhead-max-duration", type=float, default=5.0,
                           help="seconds of wrk per proxy for the one-core maximum (5; 0: "
                                "skip it)")
        group.add_argument("--overhead-max-connections", type=int, default=32,
                           help="wrk connections for the one-core maximum (32)")
        group.add_argument("--overhead-listener", choices=("outbound", "inbound"),
                           default="outbound",
                           help="the sidecar's listener measured: outbound (a caller's "
                                "sidecar, by Host) or inbound (in front of the pod)")

    async def run(self, ctx: BenchContext) -> ScenarioResult:
        args = ctx.args
        rounds = max(1, args.overhead_rounds)
        segment = args.duration / rounds
        warmup = min(args.overhead_warmup, segment / 2)
        policy = args.policies[0]
        warmup_segment = max(0.0, args.overhead_warmup_segment)
        params = {
            "rate": args.rate, "duration_per_mode_s": args.duration, "rounds": rounds,
            "segment_s": round(segment, 3), "warmup_s": warmup,
            "warmup_segment_s": warmup_segment, "sidecar_policy": policy,
            "order": "direct → proxied, repeated", "listener": args.overhead_listener,
        }
        contenders, peer_notes = peers.select(getattr(args, "peers", peers.NONE),
                                              first_of_each=True)
        params["peers"] = [c.name for c in contenders]
        modes = ["direct", "proxied", *(c.name for c in contenders)]
        params["order"] = " → ".join(modes) + ", repeated"
        fleet = await Fleet.start(["--pods", "1", "--service-time", "0", "--jitter", "0",
                                   "--seed", str(args.seed)],
                                  stderr_path=str(ctx.logs / "fleet.log"))
        if len(fleet.urls) != 1:
            raise RuntimeError(f"expected one pod, the fleet has {len(fleet.urls)}")
        samples_by_mode: dict[str, list[float]] = {m: [] for m in modes}
        per_round: list[dict[str, Any]] = []
        errors = dict.fromkeys(modes, 0)
        late = dict.fromkeys(modes, 0)
        cpu = {mode: {"generator": 0.0, "proxy": 0.0, "sidecar": 0.0, "backend": 0.0,
                      "requests": 0} for mode in modes}
        pressure: dict[str, list[float]] = {m: [] for m in modes}
        running: list[peers.PeerProxy] = []
        throughput: dict[str, Any] = {}
        try:
            sidecar, sidecar_url, sidecar_host = await _start_sidecar(
                ctx, "overhead", fleet.urls[0], policy, "sidecar.log")
            try:
                for spec in contenders:
                    running.append(await peers.PeerProxy.start(spec, fleet.urls, ctx.logs))
                load_targets = {"direct": LoadTarget("direct", fleet.urls[0], None),
                           "proxied": LoadTarget("proxied", sidecar_url, sidecar_host),
                           **{p.name: LoadTarget(p.name, p.url, UPSTREAM) for p in running}}
                proxy_cpu = {"direct": lambda: 0.0,
                             "proxied": lambda: cpu_seconds(sidecar.child.pid),
                             **{p.name: p.cpu_seconds for p in running}}
                if warmup_segment > 0:
                    ctx.say(f"warm-up: {warmup_segment:g} s per mode (not measured)")
                    for mode in modes:
                        t = load_targets[mode]
                        await drive_load([LoadTarget(f"warmup-{mode}", t.url, t.host)],
                                         args.rate, warmup_segment, ctx.logs)
                for r in range(rounds):
                    ctx.say(f"round {r + 1}/{rounds}: {segment:g} s each of "
                            f"{', '.join(modes)} at {args.rate:g} req/s")
                    samples = {}
                    for mode in modes:
                        before = (proxy_cpu[mode](), cpu_seconds(sidecar.child.pid),
                                  cpu_seconds(fleet.child.pid))
                        res = await drive_load([load_targets[mode]], args.rate, segment, ctx.logs)
                        cpu[mode]["proxy"] += proxy_cpu[mode]() - before[0]
                        cpu[mode]["sidecar"] += cpu_seconds(sidecar.child.pid) - before[1]
                        cpu[mode]["backend"] += cpu_seconds(fleet.child.pid) - before[2]
                        cpu[mode]["generator"] += res.generator_cpu
                        cpu[mode]["requests"] += len(res.records)
                        samples[mode] = _kept(res.records, args.rate, warmup)
                        errors[mode] += sum(1 for x in res.records if not x.ok)
                        late[mode] += res.load_counts()["late_starts"]
                        pressure[mode].append(res.cpu_pressure)
                        samples_by_mode[mode] += samples[mode]
                    d, p = latency_summary(samples["direct"]), latency_summary(samples["proxied"])
                    per_round.append({"direct": d, "proxied": p,
                                      "added_p50": p["p50"] - d["p50"],
                                      "added_p99": p["p99"] - d["p99"]})
            finally:
                for peer in running:
                    await peer.stop()
                await sidecar.stop()
        finally:
            await fleet.stop()
        if args.overhead_max_duration > 0:
            throughput = await _one_core_maximum(ctx, policy, contenders)
        direct, proxied = samples_by_mode["direct"], samples_by_mode["proxied"]
        d, p = latency_summary(direct), latency_summary(proxied)
        added = {k: p[k] - d[k] for k in ("mean", "p50", "p99", "p99.9")}
        ratio = {k: (p[k] / d[k] if d[k] > 0 else float("nan")) for k in ("p50", "p99", "p99.9")}
        summaries = {mode: latency_summary(samples_by_mode[mode]) for mode in modes}
        mode_table = Table(
            title=f"proxy-overhead at {args.rate:g} req/s (latency from intended start)",
            columns=["mode", "requests", "errors", "mean", "p50", "p99", "p99.9", "max"],
            rows=[[mode, str(int(s["count"])), str(errors[mode]), ms(s["mean"]), ms(s["p50"]),
                   ms(s["p99"]), ms(s["p99.9"]), ms(s["max"])]
                  for mode, s in summaries.items()],
        )
        add = Table(
            title="added by the sidecar (proxied − direct)",
            columns=["", "mean", "p50", "p99", "p99.9"],
            rows=[["added", ms(added["mean"]), ms(added["p50"]), ms(added["p99"]),
                   ms(added["p99.9"])],
                  ["ratio", "", f"{ratio['p50']:.2f}×", f"{ratio['p99']:.2f}×",
                   f"{ratio['p99.9']:.2f}×"]],
        )
        rounds_table = Table(
            title="per round",
            columns=["round", "direct p50", "proxied p50", "added p50", "direct p99",
                     "proxied p99", "added p99"],
            rows=[[str(i + 1), ms(x["direct"]["p50"]), ms(x["proxied"]["p50"]),
                   ms(x["added_p50"]), ms(x["direct"]["p99"]), ms(x["proxied"]["p99"]),
                   ms(x["added_p99"])] for i, x in enumerate(per_round)],
        )
        def per_request(mode: str, who: str) -> float:
            n = cpu[mode]["requests"]
            return cpu[mode][who] / n if n else math.nan

        reference = peers.REFERENCE if peers.REFERENCE in cpu else None

        def to_reference(mode: str) -> str:
            if reference is None or mode == "direct":
                return "–"
            ref = per_request(reference, "proxy")
            return f"{per_request(mode, 'proxy') / ref:.2f}×" if ref > 0 else "–"

        cpu_table = Table(
            title="CPU per request (user + system, whole process tree) by mode; the proxy is "
                  "the mode's own (the sidecar, HAProxy or nginx)",
            columns=["mode", "requests", "load generator", "proxy", "backend pod",
                     "proxy share of one core", "proxy CPU / HAProxy's", "added p50",
                     "added p99"],
            rows=[[mode, str(cpu[mode]["requests"]),
                   *(f"{per_request(mode, w) * 1e6:.0f} µs" if mode != "direct" or w != "proxy"
                     else "–" for w in ("generator", "proxy", "backend")),
                   "–" if mode == "direct"
                   else f"{cpu[mode]['proxy'] / (segment * rounds) * 100:.0f} %",
                   to_reference(mode),
                   ms(summaries[mode]["p50"] - d["p50"]), ms(summaries[mode]["p99"] - d["p99"])]
                  for mode in modes],
        )
        cpu_per_request = per_request("proxied", "proxy")
        targets = Table(
            title="targets (sidecar v0.1 issue)",
            columns=["target", "measured", "verdict"],
            rows=[["added p50 ≤ 1 ms", ms(added["p50"]),
                   "met" if added["p50"] <= 0.001 else "missed"],
                  ["added p99 ≤ 5 ms", ms(added["p99"]),
                   "met" if added["p99"] <= 0.005 else "missed"]],
        )
        notes = [
            "Every mode uses the same generator, rate and backend; only the path differs "
            "(loopback TCP to the pod, or to the sidecar's "
            + (f"outbound listener with `Host: {UPSTREAM}`" if args.overhead_listener
               == "outbound" else "inbound listener in front of the pod (an anonymous caller, "
               "policed as configured)")
            + ", or to a peer proxy with one worker). `proxied` is the sidecar.",
            "Everything (generator, sidecar, backend) shares the machine's CPUs, so the added "
            "latency includes the sidecar's CPU competing with the generator's.",
        ]
        notes.append(
            "Share of each segment in which some task waited for a CPU (Linux PSI): "
            + ", ".join(f"{mode} " + "/".join(f"{x * 100:.0f} %" for x in pressure[mode])
                        for mode in modes)
            + ". High values mean other work on the machine competed with the measurement.")
        if any(late.values()):
            notes.append("generator late starts (> 10 ms): "
                         + ", ".join(f"{mode} {n}" for mode, n in late.items())
                         + "; latency still counts from the intended start.")
        notes += peer_notes
        tables = [mode_table, add, rounds_table, cpu_table, targets]
        if throughput.get("table") is not None:
            tables.append(throughput.pop("table"))
        if reference is not None:
            tables.append(_peer_targets(args.rate, per_request("proxied", "proxy"),
                                        per_request(reference, "proxy"), added["p99"],
                                        throughput.get("results", {})))
        notes += throughput.pop("notes", [])
        return ScenarioResult(
            parameters=params,
            tables=tables,
            data={"direct": d, "proxied": p, "added": added, "ratio": ratio,
                  "cpu_s": cpu, "sidecar_cpu_per_request_s": cpu_per_request,
                  "proxy_cpu_per_request_s": {m: per_request(m, "proxy") for m in modes
                                              if m != "direct"},
                  "latency": summaries,
                  "rounds": per_round, "errors": errors, "late_starts": late,
                  "cpu_pressure": pressure, "one_core": throughput.get("results", {})},
            notes=notes,
        )


async def _one_core_maximum(ctx: BenchContext, policy: str,
                            contenders: list[peers.PeerSpec]) -> dict[str, Any]:
    """Each proxy pinned to one CPU before a static nginx backend, driven by ``wrk`` as hard
    as ``--overhead-max-connections`` connections go for ``--overhead-max-duration`` s."""
    args = ctx.args
    lacking = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]
    if lacking:
        return {"notes": [f"one-core maximum skipped: needs {' and '.join(lacking)} "
                          f"(apt-get install -y {' '.join(lacking)})"]}
    cpus = sorted(os.sched_getaffinity(0))
    proxy_cpu, load_cpus = [cpus[0]], (cpus[1:] or cpus[:1])
    duration = args.overhead_max_duration
    conns = max(1, args.overhead_max_connections)
    results: dict[str, dict[str, Any]] = {}
    backend = await peers.PeerProxy.start(None, [], ctx.logs, name="static-backend")
    try:
        backend.pin(load_cpus)
        sidecar, sidecar_url, _ = await _start_sidecar(ctx, "one-core", backend.url, policy,
                                                       "sidecar-one-core.log")
        running: list[tuple[str, str, Any, Any]] = [
            ("sidecar", sidecar_url, lambda: cpu_seconds(sidecar.child.pid),
             lambda: peers.pin(sidecar.child.pid, proxy_cpu))]
        started: list[peers.PeerProxy] = []
        try:
            for spec in contenders:
                peer = await peers.PeerProxy.start(spec, [backend.url], ctx.logs,
                                                   name=f"{spec.name}-one-core")
                started.append(peer)
                running.append((spec.name, peer.url, peer.cpu_seconds,
                                lambda peer=peer: peer.pin(proxy_cpu)))
            for name, url, read_cpu, pin_it in running:
                pin_it()
                ctx.say(f"one core: {name} pinned to CPU {proxy_cpu[0]}, wrk -c{conns} for "
                        f"{duration:g} s")
                await peers.run_wrk(url, duration=1, connections=conns, host=UPSTREAM,
                                    cpus=load_cpus)  # warm-up, not measured
                before = read_cpu()
                res = await peers.run_wrk(url, duration=duration, connections=conns,
                                          host=UPSTREAM, cpus=load_cpus,
                                          log=ctx.logs / f"wrk-{name}.txt")
                used = read_cpu() - before
                results[name] = {
                    "requests_per_s": res.requests_per_s, "requests": res.requests,
                    "p50_s": res.p50, "p99_s": res.p99, "errors": res.non_2xx
                    + res.socket_errors, "cpu_s": used,
                    "cpu_per_request_s": used / res.requests if res.requests else math.nan,
                    "core_share": used / res.seconds if res.seconds else math.nan,
                }
        finally:
            for peer in started:
                await peer.stop()
            await sidecar.stop()
    finally:
        await backend.stop()
    ref = results.get(peers.REFERENCE)

    def ratio(name: str, key: str) -> str:
        if ref is None or not ref[key]:
            return "–"
        return f"{results[name][key] / ref[key]:.2f}×"

    table = Table(
        title=f"one core: most req/s each proxy sustains, pinned to CPU {proxy_cpu[0]}, static "
              f"nginx backend and wrk (-t1 -c{conns}, {duration:g} s) on CPU "
              f"{','.join(map(str, load_cpus))}",
        columns=["proxy", "req/s", "req/s / HAProxy's", "CPU per request",
                 "CPU / HAProxy's", "share of its core", "wrk p50", "wrk p99", "errors"],
        rows=[[name, f"{r['requests_per_s']:,.0f}", ratio(name, "requests_per_s"),
               f"{r['cpu_per_request_s'] * 1e6:.0f} µs", ratio(name, "cpu_per_request_s"),
               f"{r['core_share'] * 100:.0f} %", ms(r["p50_s"]), ms(r["p99_s"]),
               str(r["errors"])] for name, r in results.items()],
    )
    notes = [f"One-core maximum: a proxy whose share of its core stays well under 100 % was "
             f"held back by wrk or the backend on CPU {','.join(map(str, load_cpus))}, not by "
             "its own CPU."]
    if len(cpus) < 2:
        notes.append("Only one CPU is available: proxy, backend and wrk share it.")
    return {"table": table, "results": results, "notes": notes}


SCENARIO = ProxyOverhead()


def _peer_targets(rate: float, sidecar_cpu: float, haproxy_cpu: float, added_p99: float,
                  one_core: dict[str, dict[str, Any]]) -> Table:
    """The targets of issue 11 that this scenario measures, as ratios to HAProxy's."""
    cpu_ratio = sidecar_cpu / haproxy_cpu if haproxy_cpu > 0 else math.nan
    rows = [[f"CPU per proxied request ≤ 1.5× HAProxy's at {rate:g} req/s",
             f"{cpu_ratio:.2f}×", "met" if cpu_ratio <= 1.5 else "missed"],
            [f"added p99 ≤ 1 ms at {rate:g} req/s", ms(added_p99),
             "met" if added_p99 <= 0.001 else "missed"]]
    side, ref = one_core.get("sidecar"), one_core.get(peers.REFERENCE)
    if side and ref and ref["requests_per_s"] > 0:
        share = side["requests_per_s"] / ref["requests_per_s"]
        rows.append(["one core: ≥ 1/3 of HAProxy's req/s (static backend)", f"{share:.2f}×",
                     "met" if share >= 1 / 3 else "missed"])
    return Table("targets (issue 11), as ratios to HAProxy in this run",
                 ["target", "measured", "verdict"], rows)
