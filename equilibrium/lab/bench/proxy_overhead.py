"""Scenario ``proxy-overhead``: the same load straight to a backend and through one sidecar.

One fast pod (no service time, no jitter) and one sidecar in front of it. The run alternates
segments, direct then proxied, ``rounds`` times, each segment a fresh open-loop generator at
the same rate, so slow drifts of the machine (other processes, thermal, caches) hit both
modes alike. One unmeasured segment per mode warms the proxy up first (a long-running proxy
is warm), and the first ``warmup`` seconds of each segment are discarded (connection set-up).
Reported: latency percentiles per mode, the latency the proxy adds (proxied minus direct) at
p50, p99 and p99.9, their ratios, and the added p50/p99 of every round to show the spread.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from equilibrium.lab.bench.harness import LoadTarget, drive_load
from equilibrium.lab.bench.report import ms
from equilibrium.lab.bench.scenarios import BenchContext, Scenario, ScenarioResult, Table
from equilibrium.lab.fleet import Fleet
from equilibrium.lab.loadgen import Record, latency_summary
from equilibrium.lab.processes import cpu_seconds
from equilibrium.lab.sidecars import Sidecar

UPSTREAM = "backend"


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

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--overhead-rounds", type=int, default=4,
                           help="direct/proxied alternations (4)")
        group.add_argument("--overhead-warmup", type=float, default=1.0,
                           help="seconds discarded at the start of each segment (1)")
        group.add_argument("--overhead-warmup-segment", type=float, default=3.0,
                           help="unmeasured seconds per mode before the first round (3)")

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
            "order": "direct → proxied, repeated",
        }
        fleet = await Fleet.start(["--pods", "1", "--service-time", "0", "--jitter", "0",
                                   "--seed", str(args.seed)],
                                  stderr_path=str(ctx.logs / "fleet.log"))
        direct: list[float] = []
        proxied: list[float] = []
        per_round: list[dict[str, Any]] = []
        errors = {"direct": 0, "proxied": 0}
        late = {"direct": 0, "proxied": 0}
        cpu = {mode: {"generator": 0.0, "sidecar": 0.0, "backend": 0.0, "requests": 0}
               for mode in ("direct", "proxied")}
        pressure: dict[str, list[float]] = {"direct": [], "proxied": []}
        try:
            sidecar = await Sidecar.start("overhead", {UPSTREAM: fleet.urls}, policy=policy,
                                          strategy=args.strategy, extra=args.sidecar_arg,
                                          stderr_path=str(ctx.logs / "sidecar.log"))
            try:
                if warmup_segment > 0:
                    ctx.say(f"warm-up: {warmup_segment:g} s direct, {warmup_segment:g} s "
                            "proxied (not measured)")
                    for name, url, host in (("direct", fleet.urls[0], None),
                                            ("proxied", sidecar.outbound_url, UPSTREAM)):
                        await drive_load([LoadTarget(f"warmup-{name}", url, host)], args.rate,
                                         warmup_segment, ctx.logs)
                for r in range(rounds):
                    ctx.say(f"round {r + 1}/{rounds}: {segment:g} s direct, {segment:g} s "
                            f"proxied at {args.rate:g} req/s")
                    samples = {}
                    for mode, target in (
                        ("direct", LoadTarget("direct", fleet.urls[0], None)),
                        ("proxied", LoadTarget("proxied", sidecar.outbound_url, UPSTREAM)),
                    ):
                        before = (cpu_seconds(sidecar.child.pid), cpu_seconds(fleet.child.pid))
                        res = await drive_load([target], args.rate, segment, ctx.logs)
                        cpu[mode]["sidecar"] += cpu_seconds(sidecar.child.pid) - before[0]
                        cpu[mode]["backend"] += cpu_seconds(fleet.child.pid) - before[1]
                        cpu[mode]["generator"] += res.generator_cpu
                        cpu[mode]["requests"] += len(res.records)
                        samples[mode] = _kept(res.records, args.rate, warmup)
                        errors[mode] += sum(1 for x in res.records if not x.ok)
                        late[mode] += res.load_counts()["late_starts"]
                        pressure[mode].append(res.cpu_pressure)
                    direct += samples["direct"]
                    proxied += samples["proxied"]
                    d, p = latency_summary(samples["direct"]), latency_summary(samples["proxied"])
                    per_round.append({"direct": d, "proxied": p,
                                      "added_p50": p["p50"] - d["p50"],
                                      "added_p99": p["p99"] - d["p99"]})
            finally:
                await sidecar.stop()
        finally:
            await fleet.stop()
        d, p = latency_summary(direct), latency_summary(proxied)
        added = {k: p[k] - d[k] for k in ("mean", "p50", "p99", "p99.9")}
        ratio = {k: (p[k] / d[k] if d[k] > 0 else float("nan")) for k in ("p50", "p99", "p99.9")}
        modes = Table(
            title=f"proxy-overhead at {args.rate:g} req/s (latency from intended start)",
            columns=["mode", "requests", "errors", "mean", "p50", "p99", "p99.9", "max"],
            rows=[[mode, str(int(s["count"])), str(errors[mode]), ms(s["mean"]), ms(s["p50"]),
                   ms(s["p99"]), ms(s["p99.9"]), ms(s["max"])]
                  for mode, s in (("direct", d), ("proxied", p))],
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

        cpu_table = Table(
            title="CPU per request (user + system) of each process, by mode",
            columns=["mode", "load generator", "sidecar", "backend pod", "sidecar share of "
                     "one core"],
            rows=[[mode, *(f"{per_request(mode, w) * 1e6:.0f} µs"
                           for w in ("generator", "sidecar", "backend")),
                   f"{cpu[mode]['sidecar'] / (segment * rounds) * 100:.0f} %"]
                  for mode in ("direct", "proxied")],
        )
        cpu_per_request = per_request("proxied", "sidecar")
        targets = Table(
            title="targets (sidecar v0.1 issue)",
            columns=["target", "measured", "verdict"],
            rows=[["added p50 ≤ 1 ms", ms(added["p50"]),
                   "met" if added["p50"] <= 0.001 else "missed"],
                  ["added p99 ≤ 5 ms", ms(added["p99"]),
                   "met" if added["p99"] <= 0.005 else "missed"]],
        )
        notes = [
            "Both modes use the same generator, rate and backend; only the path differs "
            "(loopback TCP to the pod, or to the sidecar's outbound listener with "
            f"`Host: {UPSTREAM}`).",
            "Everything (generator, sidecar, backend) shares the machine's CPUs, so the added "
            "latency includes the sidecar's CPU competing with the generator's.",
        ]
        notes.append(
            "Share of each segment in which some task waited for a CPU (Linux PSI): direct "
            + "/".join(f"{x * 100:.0f} %" for x in pressure["direct"]) + ", proxied "
            + "/".join(f"{x * 100:.0f} %" for x in pressure["proxied"])
            + ". High values mean other work on the machine competed with the measurement.")
        if late["direct"] or late["proxied"]:
            notes.append(f"generator late starts (> 10 ms): direct {late['direct']}, "
                         f"proxied {late['proxied']}; latency still counts from the intended "
                         "start.")
        return ScenarioResult(
            parameters=params,
            tables=[modes, add, rounds_table, cpu_table, targets],
            data={"direct": d, "proxied": p, "added": added, "ratio": ratio,
                  "cpu_s": cpu, "sidecar_cpu_per_request_s": cpu_per_request,
                  "rounds": per_round, "errors": errors, "late_starts": late,
                  "cpu_pressure": pressure},
            notes=notes,
        )


SCENARIO = ProxyOverhead()
