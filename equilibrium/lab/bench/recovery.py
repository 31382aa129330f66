"""Scenario ``recovery``: the bad pod heals mid-run; how fast and how gently traffic comes back.

Three pods of one service on loopback (``--recovery-pods``); the last adds 500 ms to half of
its requests until ``--recovery-heal-at`` of the run, when the fleet's control endpoint heals
it (``--recovery-fault hang``: it answers none of them, each taking 30 s, past the sidecars'
15 s request timeout, as a pod that accepts requests and never answers; those still held
when it heals stay held). Several client sidecars send the same open-loop load. Contenders,
one after another on the same pods (fleet reset, same seed):

- with every pod behind its own inbound sidecar (mesh key, idle check
  ``policing.app_check_path: /``): ``equilibrium+probes`` — the mesh case, the clients'
  sidecars probe the pods (docs/protocol.md, "Probes"), so nothing explores the bad pod with
  user requests; ``peak-ewma+sidecars`` — Linkerd's balancer through the same hop;
  ``oracle+sidecars`` — ``equilibrium`` given only the good pods, through the same hop;
  ``equilibrium-ce+probes`` — the mesh as deployed: ``equilibrium+probes`` with the client
  sidecars following a signaler (embedded Redis, started once for the run when named);
- with the pods reached directly (nothing answers a probe): ``equilibrium+hedging`` — the
  exploration floor, hedged (docs/routing.md, "Hedged exploration"); ``equilibrium`` — the
  floor unhedged, as before issue 12; ``peak-ewma``; ``oracle`` — ``equilibrium`` given only
  the good pods (what routing could do knowing it).

Reported per contender: the requests that failed (a 5xx, or none within the load generator's
timeout) of all sent, p99 and p99.9 before the heal (the slow-pod story), the bad pod's share
then, the time from the heal until the healed pod's share of a 1 s window reaches 80 % of a
fair share, the largest share any pod got in any 1 s window after the heal (the herd), the
largest number of requests in flight at the healed pod (sampled every 0.5 s), p99 during the 10
s after the heal and its ratio to the steady p99 of the last quarter of the run, probes per
second per client sidecar, and hedges sent and won (all client sidecars together).
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Any

import aiohttp

from equilibrium.lab import analysis
from equilibrium.lab.bench import mesh_pods
from equilibrium.lab.bench.harness import LoadResult, LoadTarget, drive_load
from equilibrium.lab.bench.herding import CONTROL_NICE
from equilibrium.lab.bench.report import ms, pct, secs
from equilibrium.lab.bench.scenarios import BenchContext, Scenario, ScenarioResult, Table
from equilibrium.lab.fleet import Fleet
from equilibrium.lab.loadgen import percentile
from equilibrium.lab.sidecars import Sidecar, start_sidecars
from equilibrium.lab.signaling_plane import SignalingPlane

UPSTREAM = "demo"
CONTENDERS = (*mesh_pods.MESH_GROUP, *mesh_pods.DIRECT_GROUP)
DEFAULT_CONTENDERS = CONTENDERS
RECOVERY_WINDOW = 10.0
FAULTS: dict[str, dict[str, float]] = {
    "slow": {"bad_delay": 0.5, "bad_fraction": 0.5},  # the seed's bad pod
    "hang": {"bad_delay": 30.0, "bad_fraction": 1.0},  # accepts, answers nothing in time
}


class Recovery(Scenario):
    name = "recovery"
    summary = "the bad pod heals mid-run: time to fair share, herd, queue, p99 during recovery"
    default_policies = DEFAULT_CONTENDERS
    default_duration = 40.0
    default_rate = 50.0
    default_clients = 4

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--recovery-pods", type=int, default=3, help="pods (3)")
        group.add_argument("--recovery-heal-at", type=float, default=0.5,
                           help="when the bad pod heals, as a share of the run (0.5)")
        group.add_argument("--recovery-fault", choices=sorted(FAULTS), default="slow",
                           help="what ails the bad pod until it heals: slow (500 ms on half "
                                "its requests, the default) or hang (no answer within 30 s)")

    async def run(self, ctx: BenchContext) -> ScenarioResult:
        args = ctx.args
        unknown = [p for p in args.policies if p not in CONTENDERS]
        if unknown:
            raise ValueError(f"recovery: unknown contender(s) {unknown}; choose from "
                             f"{', '.join(CONTENDERS)}")
        pods = args.recovery_pods
        if pods < 2:
            raise ValueError("recovery: --recovery-pods must be at least 2")
        heal_at = args.duration * args.recovery_heal_at
        bad = pods - 1
        names = [f"pod-{i}" for i in range(pods)]
        fault = FAULTS[args.recovery_fault]
        params = {"pods": pods, "bad_pod": names[bad], "fault": args.recovery_fault,
                  "bad_delay_s": fault["bad_delay"], "bad_fraction": fault["bad_fraction"],
                  "heal_at_s": heal_at, "clients": args.clients, "rate_per_client": args.rate,
                  "duration_per_contender_s": args.duration, "order": " → ".join(args.policies),
                  "seed": args.seed}
        fleet = await Fleet.start(["--pods", str(pods), "--bad", str(bad), "--seed",
                                   str(args.seed)], stderr_path=str(ctx.logs / "fleet.log"))
        results: dict[str, dict[str, Any]] = {}
        plane: SignalingPlane | None = None
        try:
            if set(args.policies) & set(mesh_pods.SIGNALED):
                ctx.say("starting the signaling plane (embedded Redis, signaler)")
                plane = SignalingPlane(ctx.logs, mesh_key=mesh_pods.MESH_KEY,
                                       nice=CONTROL_NICE)
                await plane.start()
            for step, contender in enumerate(args.policies, start=1):
                ctx.say(f"[{step}/{len(args.policies)}] {contender}: {args.clients} clients × "
                        f"{args.rate:g} req/s for {args.duration:g} s, {names[bad]} heals at "
                        f"{heal_at:g} s")
                m = await self._one_run(ctx, fleet, contender, bad, heal_at, plane)
                results[contender] = m
                ctx.say(f"    {contender}: to fair share {secs(m['time_to_fair'])}, largest "
                        f"share {pct(m['largest_share'])}, p99 recovery "
                        f"{ms(m['p99_recovery'])} vs steady {ms(m['p99_steady'])}")
        finally:
            if plane is not None:
                await plane.stop()
            await fleet.stop()
        return ScenarioResult(
            parameters=params, tables=[self._table(results), *self._targets(results)],
            data={"contenders": results},
            notes=self._notes(heal_at),
        )

    async def _one_run(self, ctx: BenchContext, fleet: Fleet, contender: str, bad: int,
                       heal_at: float, plane: SignalingPlane | None) -> dict[str, Any]:
        args = ctx.args
        await fleet.reset(seed=args.seed)
        # it healed in the previous contender's run
        await fleet.control(bad, bad=True, **FAULTS[args.recovery_fault])
        policy, urls, inbound, env = await mesh_pods.setup(ctx, contender, fleet.urls, [bad],
                                                               plane)
        try:
            clients = await start_sidecars(
                [mesh_pods.client_id(contender, c) for c in range(args.clients)],
                {UPSTREAM: urls}, policy=policy, strategy=args.strategy, extra=args.sidecar_arg,
                stderr_path=str(ctx.logs / f"sidecar-{contender}.log"), env=env)
        except BaseException:
            for s in inbound:
                await s.stop()
            raise
        healed: list[float] = []
        queue: list[tuple[float, int]] = []

        async def on_tick(result: LoadResult, elapsed: float, _: Any) -> None:
            if not healed and elapsed >= heal_at:
                await fleet.control(bad, bad=False)
                healed.append(elapsed)
            if healed:
                stats = await fleet.stats()
                queue.append((elapsed, int(stats[bad]["in_flight"])))

        try:
            targets = [LoadTarget(s.id, s.outbound_url, UPSTREAM) for s in clients]
            result = await drive_load(targets, args.rate, args.duration, ctx.logs, clients,
                                      poll_interval=0.5, on_tick=on_tick)
            probes = [await _probes_sent(s) for s in clients]
            hedges = [await _hedges(s) for s in clients]
        finally:
            for s in [*clients, *inbound]:
                await s.stop()
        return _measure(result, fleet.pods[bad].name, len(fleet.pods),
                        healed[0] if healed else math.nan, queue, probes, args.duration,
                        oracle=contender.startswith("oracle"),
                        hedges=(sum(h[0] for h in hedges), sum(h[1] for h in hedges)))

    @staticmethod
    def _table(results: dict[str, dict[str, Any]]) -> Table:
        rows = []
        for name, m in results.items():
            rows.append([
                name, f"{m['errors']} / {m['requests']}", ms(m["p99_before"]),
                ms(m["p999_before"]), pct(m["bad_share_before"]),
                secs(m["time_to_fair"]) if m["time_to_fair"] is not None or not m["oracle"]
                else "–",
                pct(m["largest_share"]), str(m["queue_max"]), ms(m["p99_recovery"]),
                ms(m["p99_steady"]),
                f"{m['p99_recovery'] / m['p99_steady']:.2f}×" if m["p99_steady"] else "–",
                f"{m['probes_per_s']:.1f}",
                f"{m['hedges_sent']:g} / {m['hedges_won']:g}",
            ])
        return Table(
            title="recovery: before the heal, and the 10 s after it",
            columns=["contender", "failed / requests", "p99 before", "p99.9 before",
                     "bad share before",
                     "to 80 % of fair share", "largest share after", "max in flight at healed",
                     "p99 recovery", "p99 steady", "recovery / steady", "probes/s/sidecar",
                     "hedges sent / won"],
            rows=rows,
        )

    @staticmethod
    def _targets(results: dict[str, dict[str, Any]]) -> list[Table]:
        """Issue 12's recovery targets for each group's subject, against its own references
        (the mesh case against the contenders behind the same inbound sidecars; hedging
        against the ones that reach the pods directly)."""
        tables = []
        for subject, oracle_name, peak_name in (
                (mesh_pods.PROBES, mesh_pods.MESH_ORACLE, mesh_pods.MESH_PEAK),
                (mesh_pods.CE_PROBES, mesh_pods.MESH_ORACLE, mesh_pods.MESH_PEAK),
                (mesh_pods.HEDGING, mesh_pods.ORACLE, "peak-ewma")):
            m = results.get(subject)
            if m is None:
                continue
            fair = m["time_to_fair"]
            rows = [
                ["healed pod back to ≥ 80 % of its fair share within 10 s", secs(fair),
                 "met" if fair is not None and fair <= RECOVERY_WINDOW else "missed"],
                ["largest share of any pod ≤ the cap (80 %)", pct(m["largest_share"]),
                 "met" if m["largest_share"] <= 0.8 else "missed"],
            ]
            if m["p99_steady"]:
                ratio = m["p99_recovery"] / m["p99_steady"]
                rows.append(["p99 during recovery within 1.25× of steady", f"{ratio:.2f}×",
                             "met" if ratio <= 1.25 else "missed"])
            tail = m["p999_before"]
            for name, limit, what in ((oracle_name, 1.25, "within 1.25×"),
                                      (peak_name, 1.0, "no worse than")):
                ref_m = results.get(name)
                if ref_m is None or not ref_m["p999_before"]:
                    continue
                ref = ref_m["p999_before"]
                rows.append([f"p99.9 before the heal {what} {name}'s",
                             f"{ms(tail)} vs {ms(ref)} ({tail / ref:.2f}×)",
                             "met" if tail <= limit * ref else "missed"])
            share = m["bad_share_before"]
            rows.append(["share to the bad pod before the heal < 0.1 %", pct(share),
                         "met" if share < 0.001 else "missed"])
            tables.append(Table(f"targets (issue 12) for {subject}",
                                ["target", "measured", "verdict"], rows))
        return tables

    @staticmethod
    def _notes(heal_at: float) -> list[str]:
        return [
            "Latency runs from each request's intended start on the open-loop schedule. "
            f"'Before': requests started in [{heal_at / 2:g}, {heal_at:g}) s (the learned "
            "state before the heal). 'Recovery': the 10 s after the heal. 'Steady': the last "
            "quarter of the run.",
            "To 80 % of fair share: end of the first 1 s window after the heal in which the "
            "healed pod's share reached 0.8 / pods ('never' if no window did; '–' for the "
            "oracle, which never routes to it). Largest share: any pod, any 1 s window after "
            "the heal (the cap is 80 %). Max in flight at the healed pod: the fleet's own count, "
            "sampled every 0.5 s.",
            "The machine is shared (other engineers' tests and benchmarks run beside it): "
            "compare the contenders of one run as ratios, not the absolute numbers.",
        ]


_OK_PROBES = re.compile(r'^equilibrium_probes_total\{[^}]*result="ok"[^}]*\} ([0-9.e+]+)$',
                        re.MULTILINE)


_HEDGES = re.compile(r'^equilibrium_hedges_total\{[^}]*result="(sent|won)"[^}]*\} ([0-9.e+]+)$',
                     re.MULTILINE)


async def _metrics_text(sidecar: Sidecar) -> str | None:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as s, \
                s.get(sidecar.admin_url + "/metrics") as resp:
            return await resp.text()
    except (aiohttp.ClientError, TimeoutError):
        return None


async def _probes_sent(sidecar: Sidecar) -> float:
    """Answered probes this sidecar counted (0 when probes are off)."""
    text = await _metrics_text(sidecar)
    if text is None:
        return math.nan
    return sum(float(v) for v in _OK_PROBES.findall(text))


async def _hedges(sidecar: Sidecar) -> tuple[float, float]:
    """(hedges sent, hedges won) this sidecar counted (0 when hedging is off)."""
    text = await _metrics_text(sidecar)
    if text is None:
        return math.nan, math.nan
    found = _HEDGES.findall(text)
    return (sum(float(v) for k, v in found if k == "sent"),
            sum(float(v) for k, v in found if k == "won"))


def _p(records: list[Any], t0: float, start: float, end: float, q: float) -> float:
    lat = [r.latency for r in records if start <= r.intended - t0 < end]
    return percentile(lat, q) if lat else math.nan


def _measure(result: LoadResult, healed_pod: str, pods: int, heal: float,
             queue: list[tuple[float, int]], probes: list[float], duration: float, *,
             oracle: bool, hedges: tuple[float, float] = (0.0, 0.0)) -> dict[str, Any]:
    records, t0 = result.records, result.t0
    wins = analysis.windows(records, t0, 1.0, duration)
    after = [w for w in wins if w.start >= heal] if not math.isnan(heal) else []
    fair = 0.8 / pods
    to_fair = next((w.start + w.width - heal for w in after
                    if not math.isnan(w.share(healed_pod)) and w.share(healed_pod) >= fair),
                   None)
    largest = max((max(w.counts.values()) / w.answered for w in after if w.answered),
                  default=math.nan)
    before = [r for r in records if heal / 2 <= r.intended - t0 < heal and r.ok and r.pod]
    return {
        "oracle": oracle,
        "p99_before": _p(records, t0, heal / 2, heal, 99),
        "p999_before": _p(records, t0, heal / 2, heal, 99.9),
        "bad_share_before": (sum(1 for r in before if r.pod == healed_pod) / len(before)
                             if before else math.nan),
        "time_to_fair": to_fair,
        "largest_share": largest,
        "queue_max": max((q for t, q in queue if t <= heal + RECOVERY_WINDOW), default=0),
        "p99_recovery": _p(records, t0, heal, heal + RECOVERY_WINDOW, 99),
        "p99_steady": _p(records, t0, 0.75 * duration, duration, 99),
        "probes_per_s": (sum(probes) / len(probes) / duration
                         if probes and not any(math.isnan(p) for p in probes) else math.nan),
        "hedges_sent": hedges[0],
        "hedges_won": hedges[1],
        "healed_share_series": [round(w.share(healed_pod), 4) for w in after],
        # requests the bad pod got, second by second, before it healed: when they came
        "bad_requests_series": [w.counts.get(healed_pod, 0) for w in wins
                                if math.isnan(heal) or w.start < heal],
        "requests": len(records),
        "errors": sum(1 for r in records if not r.ok),
    }


SCENARIO = Recovery()
