"""Scenario ``slow-pod``: the seed's bad pod, every routing policy against the same fleet.

Five pods of one service on loopback; pod-4 adds 500 ms to a random half of its requests.
For each policy, in the order given: the fleet's counters and RNGs are reset (same seed), fresh
sidecars start with ``--policy P``, every client sends the same open-loop load through its
sidecar, the sidecars stop. Beside the policies, ``--policies`` may name the contenders of
:mod:`equilibrium.lab.bench.mesh_pods`: ``equilibrium+probes`` (every pod behind its own
inbound sidecar, so the clients probe them), ``oracle`` (``equilibrium`` given only the good
pods), ``peak-ewma+sidecars`` (``peak-ewma`` in front of the same inbound sidecars),
``oracle+sidecars`` (the good pods behind their inbound sidecars) and ``equilibrium+hedging``
(pods reached directly, hedged exploration on); the last table checks issue 12's targets per
group against its own references. Policies therefore run one after another against the same pod
processes, never at the same time, so they do not compete for the two CPUs; ``--slow-pod-repeat``
interleaves several such rounds. ``--slow-pod-mode concurrent`` instead runs all policies at
once, each on its own five pods of the one fleet process, so other work on the machine hits
them alike (at the price of multiplying the benchmark's own load).

Reported per policy (definitions in :mod:`equilibrium.lab.analysis`): mean, p50, p99, p99.9 over
the whole run and p99 in the steady state (second half), errors, the share sent to the bad
pod, the time until that share stays under 5 %, the flapping index, and the sidecars' own
converged flag. A last table checks the targets of the sidecar v0.1 issue.

Real peers (``--peers``, :mod:`equilibrium.lab.bench.peers`): when HAProxy and nginx are
installed, HAProxy ``leastconn`` and ``random(2)`` and nginx ``least_conn`` and ``random two
least_conn`` run as further contenders against the same pods under the same load, each client
sending straight to the one peer (a shared proxy, one worker), and a table gives every
contender's latency as a ratio to HAProxy ``leastconn``'s from the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Any

from equilibrium.lab import analysis
from equilibrium.lab.bench import mesh_pods, peers
from equilibrium.lab.bench.harness import LoadResult, LoadTarget, drive_load, final_upstream_states
from equilibrium.lab.bench.report import ms, pct, pp, secs
from equilibrium.lab.bench.scenarios import BenchContext, Scenario, ScenarioResult, Table
from equilibrium.lab.fleet import Fleet
from equilibrium.lab.loadgen import Record
from equilibrium.lab.sidecars import start_sidecars

UPSTREAM = "demo"
SHIFT_WINDOW = 1.0


class SlowPod(Scenario):
    name = "slow-pod"
    summary = "five pods, one adds 500 ms to half of its requests"
    default_policies = ("round-robin", "p2c-least-request", "peak-ewma", "equilibrium")
    default_duration = 30.0
    default_rate = 100.0
    uses_peers = True

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--slow-pod-pods", type=int, default=5, help="pods (5)")
        group.add_argument("--slow-pod-delay", type=float, default=0.5,
                           help="seconds the bad pod adds (0.5)")
        group.add_argument("--slow-pod-fraction", type=float, default=0.5,
                           help="share of the bad pod's requests that are slow (0.5)")
        group.add_argument("--slow-pod-repeat", type=int, default=1,
                           help="run the policy list this many times, interleaved (1)")
        group.add_argument("--slow-pod-mode", choices=("sequential", "concurrent"),
                           default="sequential",
                           help="policies one after another on the same pods (default), or "
                                "all at once, each on its own pods, so that other work on "
                                "the machine hits them alike")

    async def run(self, ctx: BenchContext) -> ScenarioResult:
        args = ctx.args
        pods = args.slow_pod_pods
        bad_index = pods - 1
        bad = f"pod-{bad_index}"
        repeat = max(1, args.slow_pod_repeat)
        order = " → ".join(args.policies)
        params = {
            "pods": pods, "bad_pod": bad, "bad_delay_s": args.slow_pod_delay,
            "bad_fraction": args.slow_pod_fraction, "clients": args.clients,
            "rate_per_client": args.rate, "duration_per_policy_s": args.duration,
            "mode": args.slow_pod_mode,
            "order": order if repeat == 1 else f"({order}) × {repeat}",
            "strategy": args.strategy or "default", "seed": args.seed,
        }
        contenders, peer_notes = peers.select(getattr(args, "peers", peers.NONE))
        params["peers"] = [p.name for p in contenders]
        concurrent = args.slow_pod_mode == "concurrent"
        if concurrent and set(args.policies) & set(mesh_pods.PSEUDO):
            raise ValueError(f"slow-pod: {' and '.join(mesh_pods.PSEUDO)} run in sequential "
                             "mode only")
        groups = len(args.policies) + len(contenders) if concurrent else 1
        fleet_args = ["--pods", str(pods * groups)]
        for g in range(groups):
            fleet_args += ["--bad", str(g * pods + bad_index)]
        fleet = await Fleet.start(
            [*fleet_args, "--bad-delay", repr(args.slow_pod_delay), "--bad-fraction",
             repr(args.slow_pod_fraction), "--seed", str(args.seed)],
            stderr_path=str(ctx.logs / "fleet.log"),
        )
        everyone = [*args.policies, *(p.name for p in contenders)]
        runs: dict[str, list[dict[str, Any]]] = {p: [] for p in everyone}
        pooled: dict[str, list[Record]] = {p: [] for p in everyone}
        series: dict[str, dict[str, list[float]]] = {}
        names = [f"pod-{i}" for i in range(pods)]

        def record(policy: str, result: LoadResult, load_average: float, rep: int) -> None:
            m = self._measure(result, names, bad)
            m["load_average_at_start"] = load_average
            runs[policy].append(m)
            pooled[policy] += [dataclasses.replace(r, intended=r.intended - result.t0)
                               for r in result.records]
            if rep == 0:
                wins = analysis.windows(result.records, result.t0, SHIFT_WINDOW, args.duration)
                series[policy] = {"t": [w.start + w.width for w in wins],
                                  "bad_share": analysis.share_series(wins, bad)}
            ctx.say(f"    {policy}: p99 {ms(m['latency']['p99'])}, steady p99 "
                    f"{ms(m['steady_latency']['p99'])}, bad share "
                    f"{pct(m['bad_share_steady'])} (steady), shift {secs(m['time_to_shift'])}")

        try:
            step = 0
            for rep in range(repeat):
                if concurrent:
                    ctx.say(f"[{rep + 1}/{repeat}] all {len(everyone)} contenders at once, "
                            f"each on its own {pods} pods: {args.clients} clients × "
                            f"{args.rate:g} req/s each for {args.duration:g} s")
                    outcomes = await self._concurrent_run(ctx, fleet, pods, contenders)
                    for policy, (result, load_average) in outcomes.items():
                        record(policy, result, load_average, rep)
                    continue
                for policy in args.policies:
                    step += 1
                    ctx.say(f"[{step}/{repeat * len(everyone)}] {policy}: "
                            f"{args.clients} clients × {args.rate:g} req/s for "
                            f"{args.duration:g} s")
                    result, load_average = await self._one_run(ctx, fleet, policy)
                    record(policy, result, load_average, rep)
                for spec in contenders:
                    step += 1
                    ctx.say(f"[{step}/{repeat * len(everyone)}] {spec.name} (peer): "
                            f"{args.clients} clients × {args.rate:g} req/s for "
                            f"{args.duration:g} s")
                    result, load_average = await self._peer_run(ctx, fleet, spec)
                    record(spec.name, result, load_average, rep)
        finally:
            await fleet.stop()
        per_policy = {
            policy: self._pool(pooled[policy], runs[policy], args.duration, names, bad)
            for policy in args.policies if runs[policy]
        }
        per_peer = {
            spec.name: self._pool(pooled[spec.name], runs[spec.name], args.duration, names, bad)
            for spec in contenders if runs[spec.name]
        }
        everything = {**per_policy, **per_peer}
        ratio_tables = [self._ratios(everything)] if peers.REFERENCE in per_peer else []
        files = []
        if series:
            from equilibrium.lab.plot import plot_bad_share

            png = plot_bad_share(
                ctx.out / "slow-pod-bad-share.png",
                {p: s["t"] for p, s in series.items()},
                {p: s["bad_share"] for p, s in series.items()},
                title=f"slow-pod: share sent to {bad} (1 s windows, first run of each policy)",
            )
            files.append(png.name)
        return ScenarioResult(
            parameters=params,
            tables=[self._table(everything), *ratio_tables, *self._targets(per_policy)],
            data={"policies": per_policy, "peers": per_peer, "series": series},
            notes=[*self._notes(everything, repeat), *peer_notes,
                   *(self._peer_notes(args.clients) if per_peer else [])],
            files=files,
        )

    @staticmethod
    async def _one_run(ctx: BenchContext, fleet: Fleet, policy: str) -> tuple[LoadResult, float]:
        """Reset the fleet, start fresh sidecars with ``policy``, drive the load, stop them."""
        args = ctx.args
        await fleet.reset(seed=args.seed)
        load_average = _load_average()
        # equilibrium+probes and oracle are contenders beside the policies (mesh_pods)
        real, urls, inbound, env = await mesh_pods.setup(ctx, policy, fleet.urls,
                                                         [len(fleet.urls) - 1])
        try:
            sidecars = await start_sidecars(
                [mesh_pods.client_id(policy, c) for c in range(args.clients)],
                {UPSTREAM: urls}, policy=real, strategy=args.strategy,
                extra=args.sidecar_arg, stderr_path=str(ctx.logs / f"sidecar-{policy}.log"),
                env=env,
            )
        except BaseException:
            for s in inbound:
                await s.stop()
            raise
        try:
            targets = [LoadTarget(s.id, s.outbound_url, UPSTREAM) for s in sidecars]
            result = await drive_load(targets, args.rate, args.duration, ctx.logs, sidecars)
        finally:
            for s in [*sidecars, *inbound]:
                await s.stop()
        return result, load_average

    @staticmethod
    async def _peer_run(ctx: BenchContext, fleet: Fleet,
                        spec: peers.PeerSpec) -> tuple[LoadResult, float]:
        """Reset the fleet, start the peer in front of it, every client sends to the peer."""
        args = ctx.args
        await fleet.reset(seed=args.seed)
        load_average = _load_average()
        peer = await peers.PeerProxy.start(spec, fleet.urls, ctx.logs)
        try:
            targets = [LoadTarget(f"{spec.name}-{c + 1}", peer.url, UPSTREAM)
                       for c in range(args.clients)]
            result = await drive_load(targets, args.rate, args.duration, ctx.logs)
        finally:
            await peer.stop()
        return result, load_average

    @staticmethod
    async def _concurrent_run(
        ctx: BenchContext, fleet: Fleet, pods: int, contenders: list[peers.PeerSpec]
    ) -> dict[str, tuple[LoadResult, float]]:
        """Every contender at once, contender i on pods [i·pods, (i+1)·pods) of the one fleet
        (the policies first, then the peers).

        Each contender's records are renamed to its local pod names (pod-0 … pod-{pods-1}), so
        the reports read the same as in sequential mode.
        """
        args = ctx.args
        await fleet.reset(seed=args.seed)
        load_average = _load_average()
        groups: dict[str, list[Any]] = {}
        started: list[peers.PeerProxy] = []
        clients = {name: [f"{name}-{c + 1}" for c in range(args.clients)]
                   for name in [*args.policies, *(p.name for p in contenders)]}
        try:
            targets = []
            for g, policy in enumerate(args.policies):
                urls = fleet.urls[g * pods:(g + 1) * pods]
                groups[policy] = await start_sidecars(
                    clients[policy], {UPSTREAM: urls},
                    policy=policy, strategy=args.strategy, extra=args.sidecar_arg,
                    stderr_path=str(ctx.logs / f"sidecar-{policy}.log"),
                )
                targets += [LoadTarget(s.id, s.outbound_url, UPSTREAM) for s in groups[policy]]
            for g, spec in enumerate(contenders, start=len(args.policies)):
                peer = await peers.PeerProxy.start(spec, fleet.urls[g * pods:(g + 1) * pods],
                                                   ctx.logs)
                started.append(peer)
                targets += [LoadTarget(c, peer.url, UPSTREAM) for c in clients[spec.name]]
            every = [s for group in groups.values() for s in group]
            result = await drive_load(targets, args.rate, args.duration, ctx.logs, every)
        finally:
            for group in groups.values():
                for s in group:
                    await s.stop()
            for peer in started:
                await peer.stop()
        out = {}
        for g, policy in enumerate(clients):
            ids = set(clients[policy])
            local = {f"pod-{g * pods + i}": f"pod-{i}" for i in range(pods)}
            view = LoadResult(
                t0=result.t0, duration=result.duration,
                records=[dataclasses.replace(r, pod=local.get(r.pod or "", r.pod))
                         for r in result.records if r.client in ids],
                summaries=[x for x in result.summaries if x.client in ids],
                states=[x for x in result.states if x.sidecar in ids],
                cpu_pressure=result.cpu_pressure,
            )
            out[policy] = (view, load_average)
        return out

    @staticmethod
    def _measure(result: LoadResult, names: list[str], bad: str) -> dict[str, Any]:
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
        out["cpu_pressure"] = result.cpu_pressure
        generator: dict[str, float] = {**result.load_counts(),
                                       "max_start_lag": result.max_start_lag()}
        out["generator"] = generator
        return out

    @staticmethod
    def _pool(records: list[Record], runs: list[dict[str, Any]], duration: float,
              names: list[str], bad: str) -> dict[str, Any]:
        """One policy's numbers: latencies and shares over all runs pooled, the rest per run.

        The time to shift is the worst run's (None if any run never shifted); flapping is
        the largest of any run; ``runs`` keeps every run's own numbers.
        """
        if len(runs) == 1:
            return {**runs[0], "runs": runs}
        pooled = analysis.run_metrics(records, 0.0, duration, names, bad,
                                      shift_window=SHIFT_WINDOW).as_dict()
        shifts = [r["time_to_shift"] for r in runs]
        flaps = [r["flapping_pp"] for r in runs if not math.isnan(r["flapping_pp"])]
        generator = {k: sum(r["generator"][k] for r in runs) for k in runs[0]["generator"]}
        generator["max_start_lag"] = max(r["generator"]["max_start_lag"] for r in runs)
        pooled.update(
            time_to_shift=None if None in shifts else max(shifts),
            relapses=sum(r["relapses"] for r in runs),
            flapping_pp=max(flaps, default=math.nan),
            flapping_noise_pp=max(r["flapping_noise_pp"] for r in runs),
            sidecars={f"{sid} (run {i + 1})": v for i, r in enumerate(runs)
                      for sid, v in r["sidecars"].items()},
            generator=generator,
            cpu_pressure=max(r["cpu_pressure"] for r in runs),
            load_average_at_start=max(r["load_average_at_start"] for r in runs),
            runs=runs,
        )
        return pooled

    @staticmethod
    def _table(per_policy: dict[str, dict[str, Any]]) -> Table:
        rows = []
        for policy, m in per_policy.items():
            lat, steady = m["latency"], m["steady_latency"]
            conv = sum(1 for s in m["sidecars"].values() if s["converged"])
            converged = f"{conv}/{len(m['sidecars'])}" if m["sidecars"] else "–"
            runs = m["runs"]
            shift = " / ".join(secs(r["time_to_shift"]) for r in runs)
            first = " / ".join(f"{secs(r['first_under'])} ({r['relapses']})" for r in runs)
            rows.append([
                policy, ms(lat["mean"]), ms(lat["p50"]), ms(lat["p99"]), ms(lat["p99.9"]),
                ms(steady["p99"]), ms(steady.get("p99.9")), str(m["errors"]),
                pct(m["bad_share"]),
                pct(m["bad_share_steady"]), shift, first, pp(m["flapping_pp"]),
                converged,
            ])
        return Table(
            title="slow-pod: latency from intended start, share sent to the bad pod",
            columns=["policy", "mean", "p50", "p99", "p99.9", "steady p99", "steady p99.9",
                     "errors",
                     "bad share", "bad share (steady)", "time to < 5 %",
                     "first < 5 % (relapses)", "flapping", "converged"],
            rows=rows,
        )

    @staticmethod
    def _ratios(everything: dict[str, dict[str, Any]]) -> Table:
        ref = everything[peers.REFERENCE]

        def ratio(a: float, b: float) -> str:
            return f"{a / b:.2f}×" if b > 0 else "–"

        rows = []
        for name, m in everything.items():
            lat, steady = m["latency"], m["steady_latency"]
            rows.append([name, ratio(lat["p50"], ref["latency"]["p50"]),
                         ratio(lat["p99"], ref["latency"]["p99"]),
                         ratio(steady["p99"], ref["steady_latency"]["p99"]),
                         ratio(lat["mean"], ref["latency"]["mean"]),
                         f"{pct(m['bad_share_steady'])} vs {pct(ref['bad_share_steady'])}"])
        return Table(
            title=f"slow-pod: every contender as a ratio to {peers.REFERENCE} (same pods, same "
                  "load, one run)",
            columns=["contender", "p50", "p99", "steady p99", "mean", "bad share (steady)"],
            rows=rows,
        )

    @staticmethod
    def _peer_notes(clients: int) -> list[str]:
        return [
            f"Peers: each is one shared proxy (HAProxy nbthread 1, nginx worker_processes 1) "
            f"in front of the same pods; the {clients} clients all send to it, so it sees "
            "every client's requests, where each sidecar sees only its own client's. Their "
            "default retries (connection failures only), no health checks, no access log "
            "(configs in the log folder).",
        ]

    @staticmethod
    def _targets(per_policy: dict[str, dict[str, Any]]) -> list[Table]:
        peak = per_policy.get("peak-ewma")
        return [*SlowPod._v01_targets(per_policy.get("equilibrium"), peak),
                *SlowPod._probe_targets(per_policy, peak)]

    @staticmethod
    def _v01_targets(eq: dict[str, Any] | None, peak: dict[str, Any] | None) -> list[Table]:
        if eq is None:
            return []
        rows = []
        if peak is not None:
            a, b = eq["steady_latency"]["p99"], peak["steady_latency"]["p99"]
            rows.append(["steady p99 no worse than peak-ewma's", f"{ms(a)} vs {ms(b)}",
                         "met" if a <= b else "missed"])
        rows += _convergence_rows(eq, "< 3 %", 0.03, "shift complete within 10 s", 10)
        return [Table("targets (sidecar v0.1 issue) for equilibrium",
                      ["target", "measured", "verdict"], rows)]

    @staticmethod
    def _probe_targets(per_policy: dict[str, dict[str, Any]],
                       peak: dict[str, Any] | None) -> list[Table]:
        """Issue 12's targets, per group, each against its own references: the mesh case
        (pods behind inbound sidecars) against ``oracle+sidecars`` and ``peak-ewma+sidecars``;
        hedging (pods reached directly) against ``oracle`` and ``peak-ewma``."""
        tables: list[Table] = []
        groups = (
            (mesh_pods.PROBES, mesh_pods.MESH_ORACLE, mesh_pods.MESH_PEAK),
            (mesh_pods.HEDGING, mesh_pods.ORACLE, "peak-ewma"),
        )
        for subject, oracle_name, peak_name in groups:
            m = per_policy.get(subject)
            if m is None:
                continue
            if subject == mesh_pods.PROBES and oracle_name not in per_policy \
                    and mesh_pods.ORACLE in per_policy:
                oracle_name = mesh_pods.ORACLE  # the older, not like-for-like reference
            if subject == mesh_pods.PROBES and peak_name not in per_policy:
                peak_name = "peak-ewma"
            tail = m["steady_latency"]["p99.9"]
            rows = []
            for name, limit, what in ((oracle_name, 1.25, "within 1.25×"),
                                      (peak_name, 1.0, "no worse than")):
                ref_m = per_policy.get(name)
                if ref_m is None:
                    continue
                ref = ref_m["steady_latency"]["p99.9"]
                rows.append([f"steady p99.9 {what} {name}'s",
                             f"{ms(tail)} vs {ms(ref)} ({tail / ref:.2f}×)" if ref > 0
                             else f"{ms(tail)} vs {ms(ref)}",
                             "met" if tail <= limit * ref else "missed"])
            rows += _convergence_rows(m, "< 0.1 %", 0.001, "shift within 5 s", 5)
            tables.append(Table(f"targets (issue 12) for {subject}",
                                ["target", "measured", "verdict"], rows))
        return tables

    @staticmethod
    def _notes(per_policy: dict[str, dict[str, Any]], repeat: int) -> list[str]:
        notes = [
            "Latency runs from each request's intended start on the open-loop schedule "
            "(no coordinated omission); percentiles are exact nearest-rank over all clients"
            + (f" and all {repeat} runs of a policy (runs interleaved across policies)."
               if repeat > 1 else "."),
            "Steady state = the second half of each policy's run. Time to < 5 %: end of the "
            "last 1 s window in which the bad pod's share was at or above 5 % (one value per "
            "run). First < 5 %: start of the first 1 s window under 5 %; in brackets the "
            "number of later windows at or above 5 % (relapses).",
            "Flapping: largest change of any pod's share between consecutive windows "
            f"(up to {analysis.FLAP_WINDOW:g} s) of the steady state; randomised routing "
            "shows sampling noise of about the listed 1-sigma even when its weights stay put.",
        ]
        loads = ", ".join(
            f"{p} " + "/".join(f"{r['load_average_at_start']:.1f}" for r in m["runs"])
            for p, m in per_policy.items())
        stalls = ", ".join(
            f"{p} " + "/".join(pct(r["cpu_pressure"]) for r in m["runs"])
            for p, m in per_policy.items())
        notes.append(f"Machine load while each policy ran: 1-minute load average at its start "
                     f"{loads}; share of the run in which some task waited for a CPU (Linux "
                     f"PSI) {stalls}. Runs with high values measure the machine as much as the "
                     "policy, above all at p99 and beyond.")
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


def _convergence_rows(m: dict[str, Any], share_label: str, share_limit: float,
                      shift_label: str, shift_limit: float) -> list[list[str]]:
    """The bad pod's share once converged, the time to shift and flapping: target rows."""
    share, shift, flap = m["bad_share_steady"], m["time_to_shift"], m["flapping_pp"]
    return [
        [f"share to the bad pod {share_label} once converged", pct(share),
         "met" if share < share_limit else "missed"],
        [shift_label, secs(shift),
         "met" if shift is not None and shift <= shift_limit else "missed"],
        ["no flapping (< 5 pp window to window)",
         f"{pp(flap)} (noise ~{pp(m['flapping_noise_pp'])})",
         "not measured" if math.isnan(flap) else "met" if flap < 5 else "missed"],
    ]
