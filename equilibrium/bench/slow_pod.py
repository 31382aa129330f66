"""Scenario ``slow-pod``: the seed's bad pod, every routing policy against the same fleet.

Five pods of one service on loopback; pod-4 adds 500 ms to a random half of its requests.
For each policy, in the order given: the fleet's counters and RNGs are reset (same seed), fresh
sidecars start with ``--policy P``, every client sends the same open-loop load through its
sidecar, the sidecars stop. Policies therefore run one after another against the same pod
processes, never at the same time, so they do not compete for the two CPUs.

Reported per policy (definitions in :mod:`equilibrium.analysis`): mean, p50, p99, p99.9 over
the whole run and p99 in the steady state (second half), errors, the share sent to the bad
pod, the time until that share stays under 5 %, the flapping index, and the sidecars' own
converged flag. A last table checks the targets of the sidecar v0.1 issue.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

from equilibrium import analysis
from equilibrium.bench.harness import LoadResult, LoadTarget, drive_load, final_upstream_states
from equilibrium.bench.report import ms, pct, pp, secs
from equilibrium.bench.scenarios import BenchContext, Scenario, ScenarioResult, Table
from equilibrium.fleet import Fleet
from equilibrium.sidecars import start_sidecars

UPSTREAM = "demo"
SHIFT_WINDOW = 1.0


class SlowPod(Scenario):
    name = "slow-pod"
    summary = "five pods, one adds 500 ms to half of its requests"
    default_policies = ("round-robin", "p2c-least-request", "peak-ewma", "equilibrium")
    default_duration = 30.0
    default_rate = 100.0

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--slow-pod-pods", type=int, default=5, help="pods (5)")
        group.add_argument("--slow-pod-delay", type=float, default=0.5,
                           help="seconds the bad pod adds (0.5)")
        group.add_argument("--slow-pod-fraction", type=float, default=0.5,
                           help="share of the bad pod's requests that are slow (0.5)")

    async def run(self, ctx: BenchContext) -> ScenarioResult:
        args = ctx.args
        pods = args.slow_pod_pods
        bad_index = pods - 1
        bad = f"pod-{bad_index}"
        params = {
            "pods": pods, "bad_pod": bad, "bad_delay_s": args.slow_pod_delay,
            "bad_fraction": args.slow_pod_fraction, "clients": args.clients,
            "rate_per_client": args.rate, "duration_per_policy_s": args.duration,
            "order": " → ".join(args.policies), "strategy": args.strategy or "default",
            "seed": args.seed,
        }
        fleet = await Fleet.start(
            ["--pods", str(pods), "--bad", str(bad_index), "--bad-delay",
             repr(args.slow_pod_delay), "--bad-fraction", repr(args.slow_pod_fraction),
             "--seed", str(args.seed)],
            stderr_path=str(ctx.logs / "fleet.log"),
        )
        per_policy: dict[str, dict[str, Any]] = {}
        series: dict[str, dict[str, list[float]]] = {}
        try:
            for i, policy in enumerate(args.policies, 1):
                ctx.say(f"[{i}/{len(args.policies)}] {policy}: {args.clients} clients × "
                        f"{args.rate:g} req/s for {args.duration:g} s")
                await fleet.reset(seed=args.seed)
                load_average = _load_average()
                sidecars = await start_sidecars(
                    [f"{policy}-{c + 1}" for c in range(args.clients)],
                    {UPSTREAM: fleet.urls}, policy=policy, strategy=args.strategy,
                    stderr_path=str(ctx.logs / f"sidecar-{policy}.log"),
                )
                try:
                    targets = [LoadTarget(s.id, s.outbound_url, UPSTREAM) for s in sidecars]
                    result = await drive_load(targets, args.rate, args.duration, ctx.logs,
                                              sidecars)
                finally:
                    for s in sidecars:
                        await s.stop()
                per_policy[policy] = self._measure(result, fleet.pods, bad)
                per_policy[policy]["load_average_at_start"] = load_average
                wins = analysis.windows(result.records, result.t0, SHIFT_WINDOW, args.duration)
                series[policy] = {"t": [w.start + w.width for w in wins],
                                  "bad_share": analysis.share_series(wins, bad)}
                m = per_policy[policy]
                ctx.say(f"    p99 {ms(m['latency']['p99'])}, steady p99 "
                        f"{ms(m['steady_latency']['p99'])}, bad share "
                        f"{pct(m['bad_share_steady'])} (steady), shift "
                        f"{secs(m['time_to_shift'])}")
        finally:
            await fleet.stop()
        files = []
        if series:
            from equilibrium.plot import plot_bad_share

            png = plot_bad_share(
                ctx.out / "slow-pod-bad-share.png",
                {p: s["t"] for p, s in series.items()},
                {p: s["bad_share"] for p, s in series.items()},
                title=f"slow-pod: share sent to {bad} (1 s windows)",
            )
            files.append(png.name)
        return ScenarioResult(
            parameters=params,
            tables=[self._table(per_policy), *self._targets(per_policy)],
            data={"policies": per_policy, "series": series},
            notes=self._notes(per_policy),
            files=files,
        )

    @staticmethod
    def _measure(result: LoadResult, pods: Any, bad: str) -> dict[str, Any]:
        names = [p.name for p in pods]
        metrics = analysis.run_metrics(
            result.records, result.t0, result.duration, names, bad,
            shift_window=SHIFT_WINDOW,
        )
        out = metrics.as_dict()
        final = final_upstream_states(result.states, UPSTREAM)
        steady = [s for s in result.states if s.t >= result.duration / 2]
        flaps = [
            float(up.get("flapping", math.nan))
            for s in steady
            if (up := ((s.state or {}).get("upstreams") or {}).get(UPSTREAM))
        ]
        out["sidecars"] = {
            sid: {"converged": bool(up.get("converged")),
                  "nash_gap": float(up.get("nash_gap", math.nan)),
                  "flapping": float(up.get("flapping", math.nan))}
            for sid, up in final.items()
        }
        out["sidecar_flapping_steady_max"] = max(flaps, default=math.nan)
        out["generator"] = result.load_counts()
        out["generator"]["max_start_lag"] = result.max_start_lag()
        return out

    @staticmethod
    def _table(per_policy: dict[str, dict[str, Any]]) -> Table:
        rows = []
        for policy, m in per_policy.items():
            lat, steady = m["latency"], m["steady_latency"]
            conv = sum(1 for s in m["sidecars"].values() if s["converged"])
            rows.append([
                policy, ms(lat["mean"]), ms(lat["p50"]), ms(lat["p99"]), ms(lat["p99.9"]),
                ms(steady["p99"]), str(m["errors"]), pct(m["bad_share"]),
                pct(m["bad_share_steady"]), secs(m["time_to_shift"]), pp(m["flapping_pp"]),
                f"{conv}/{len(m['sidecars'])}",
            ])
        return Table(
            title="slow-pod: latency from intended start, share sent to the bad pod",
            columns=["policy", "mean", "p50", "p99", "p99.9", "steady p99", "errors",
                     "bad share", "bad share (steady)", "time to < 5 %", "flapping",
                     "converged"],
            rows=rows,
        )

    @staticmethod
    def _targets(per_policy: dict[str, dict[str, Any]]) -> list[Table]:
        eq = per_policy.get("equilibrium")
        if eq is None:
            return []
        rows = []
        peak = per_policy.get("peak-ewma")
        if peak is not None:
            a, b = eq["steady_latency"]["p99"], peak["steady_latency"]["p99"]
            rows.append(["steady p99 no worse than peak-ewma's", f"{ms(a)} vs {ms(b)}",
                         "met" if a <= b else "missed"])
        share = eq["bad_share_steady"]
        rows.append(["share to the bad pod < 3 % once converged", pct(share),
                     "met" if share < 0.03 else "missed"])
        shift = eq["time_to_shift"]
        rows.append(["shift complete within 10 s", secs(shift),
                     "met" if shift is not None and shift <= 10 else "missed"])
        flap = eq["flapping_pp"]
        rows.append(["no flapping (< 5 pp window to window)",
                     f"{pp(flap)} (noise ~{pp(eq['flapping_noise_pp'])})",
                     "not measured" if math.isnan(flap) else "met" if flap < 5 else "missed"])
        return [Table("targets (sidecar v0.1 issue) for equilibrium",
                      ["target", "measured", "verdict"], rows)]

    @staticmethod
    def _notes(per_policy: dict[str, dict[str, Any]]) -> list[str]:
        notes = [
            "Latency runs from each request's intended start on the open-loop schedule "
            "(no coordinated omission); percentiles are exact nearest-rank over all clients.",
            "Steady state = the second half of each policy's run. Time to < 5 %: end of the "
            "last 1 s window in which the bad pod's share was at or above 5 %.",
            "Flapping: largest change of any pod's share between consecutive windows "
            f"(up to {analysis.FLAP_WINDOW:g} s) of the steady state; randomised routing "
            "shows sampling noise of about the listed 1-sigma even when its weights stay put.",
        ]
        loads = ", ".join(f"{p} {m['load_average_at_start']:.1f}"
                          for p, m in per_policy.items())
        notes.append(f"1-minute load average of the machine when each policy started: {loads}"
                     " (other work on the machine shows up here and in the generator's lag).")
        for policy, m in per_policy.items():
            g = m["generator"]
            if g["delayed_by_cap"] or g["late_starts"]:
                notes.append(
                    f"{policy}: the load generator started {g['late_starts']} requests more "
                    f"than 10 ms late (max lag {ms(g['max_start_lag'])}) and "
                    f"{g['delayed_by_cap']} waited for its in-flight cap; their latency still "
                    "counts from the intended start."
                )
        return notes


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


SCENARIO = SlowPod()
