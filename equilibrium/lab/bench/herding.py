"""Scenario ``herding``: independent learners pile onto the pod that looks fastest; a
correlated equilibrium spreads them.

The fleet: pod-0 is small but quick (one server, 20 ms mean service, about 50 req/s of
capacity); pod-1..3 are big but slower (four servers each, 80 ms mean service, about 50 req/s
each). Service times are exponential and requests queue FIFO (M/M/c), so a pod's latency
climbs steeply as its load nears its capacity. Idle, pod-0 answers four times faster than the
others, so every client that learns on its own moves its traffic there -- and once the clients
together send it more than it can serve, its queue grows, they all flee, and come back: the
herd docs/routing.md §3 defends against (Mitzenmacher's "stale information" effect, with
learners instead of load reports). Four clients send 27.5 req/s each, 55 % of the fleet's capacity.

Why these service times: the same fleet at 10 and 40 ms and twice the rate is the same queueing
game twice as fast, but on the 2-core machines the benchmark runs on it keeps the cores busy
(CPU pressure 20--30 %), and each proxy hop's few milliseconds are then a noise as large as the
whole difference between the policies (on the true curves the best correlated equilibrium
saves about 8 % against the selfish split). ``--herding-small-rate 100 --herding-big-rate 25 --rate
55`` runs it (docs/benchmarks.md has both).

Policies, in one run against the same fleet (reset to the same seed before each):

- ``peak-ewma``: Linkerd's P2C on peak-EWMA RTT x (pending + 1);
- ``equilibrium``: each sidecar's own Hart & Mas-Colell regret matching, anti-herd cap included;
- ``equilibrium-ce``: the same sidecars with ``--redis``: they publish regret summaries, and a
  signaler (started once for the run, with an embedded Redis and a fresh random mesh key) fits
  each pod's latency curve, solves the correlated-equilibrium LP every epoch and sends each
  sidecar its private share of a sampled configuration, which the sidecars follow.

Issue 12's capacity-limited comparison is the same scenario with a uniform fleet:
``--herding-fleet uniform --herding-service fixed --herding-big-rate 50 --clients 3 --rate 150``
runs three pods of four 20 ms servers (M/D/4, 600 req/s in all) under three independent
callers at 150 req/s each (75 % of capacity). Real peers (``--peers``; ``auto`` is HAProxy
``leastconn`` alone, skipped with a note when HAProxy is not installed) run after the policies
against the same pods, one instance per client: independent balancers that each know only
their own connections, as the sidecars do. A table gives every contender as a ratio to
``haproxy-leastconn``, and one checks issue 12's target (``equilibrium``'s mean and p99 no
worse than ``leastconn``'s).

Each policy first runs ``--herding-warmup`` seconds of the same load, reported apart as its
cold start (fresh sidecars learning from nothing; for ``equilibrium-ce`` also a signaler that
has not yet seen this fleet, so its sidecars route on their own until its first plans arrive).
Reported per policy: mean, p50, p99, p99.9 over the measured run, the mean of its second half
(steady state) and of the cold start, errors, the share of requests each pod served in the
steady state, and the flapping index (largest window-to-window change of any pod's share). A
last table checks the issue's target: CE-coordinated routing has a lower mean latency than both
others.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from typing import Any

from equilibrium.lab import analysis
from equilibrium.lab.bench import peers
from equilibrium.lab.bench.harness import LoadResult, LoadTarget, drive_load, final_upstream_states
from equilibrium.lab.bench.report import ms, pct, pp
from equilibrium.lab.bench.scenarios import BenchContext, Scenario, ScenarioResult, Table
from equilibrium.lab.fleet import Fleet
from equilibrium.lab.loadgen import Record, latency_summary
from equilibrium.lab.sidecars import start_sidecars
from equilibrium.lab.signaling_plane import SignalingPlane

UPSTREAM = "demo"
CE_POLICY = "equilibrium-ce"
FLAP_WINDOW = 5.0
#: The signaler runs at this lower CPU priority: on the benchmark's small machine it shares
#: the cores of the data path (fleet, sidecars, load generators), which in a cluster it does not.
CONTROL_NICE = 10
SLOW = 0.5  # a request slower than this (s) is counted per caller and pod in the JSON


def non_negative(text: str) -> float:
    """An argparse type: a finite number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def fleet_spec(small_rate: float, big_servers: int, big_rate: float, big_pods: int,
               *, uniform: bool = False, service: str = "exponential") -> str:
    """The ``--spec`` of the fleet: one small fast pod, then ``big_pods`` big slow ones
    (``uniform``: the big ones only); ``service`` is the pods' service-time distribution."""
    small = {"capacity": 1, "service_rate": small_rate, "service_dist": service}
    big = {"capacity": big_servers, "service_rate": big_rate, "service_dist": service}
    return json.dumps(([] if uniform else [small]) + [big] * big_pods)


def peer_contenders(request: str) -> tuple[list[peers.PeerSpec], list[str]]:
    """The peers ``--peers`` asks for (``auto``: HAProxy ``leastconn`` alone, the reference,
    when it is installed), and a note per skipped server."""
    chosen, notes = peers.select(request)
    if request.strip() == peers.AUTO:
        chosen = [p for p in chosen if p.name == peers.REFERENCE]
    return chosen, notes


class Herding(Scenario):
    name = "herding"
    summary = "one small fast pod, three big slow ones: independent learners herd"
    default_policies = ("peak-ewma", "equilibrium", CE_POLICY)
    default_duration = 60.0
    default_rate = 27.5
    default_clients = 4
    uses_peers = True

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--herding-small-rate", type=float, default=50.0,
                           help="service rate of the small pod's one server, 1/s (50)")
        group.add_argument("--herding-big-pods", type=int, default=3, help="big pods (3)")
        group.add_argument("--herding-big-servers", type=int, default=4,
                           help="servers per big pod (4)")
        group.add_argument("--herding-big-rate", type=float, default=12.5,
                           help="service rate of each big-pod server, 1/s (12.5)")
        group.add_argument("--herding-epoch", type=float, default=1.0,
                           help="signaling epoch, s (1)")
        group.add_argument("--herding-tokens", type=int, default=16,
                           help="tokens of the signaler's LP (16)")
        group.add_argument("--herding-fleet", choices=("mixed", "uniform"), default="mixed",
                           help="mixed: the small fast pod and the big ones; uniform: the big "
                                "ones only (mixed)")
        group.add_argument("--herding-service", choices=("exponential", "fixed"),
                           default="exponential",
                           help="the pods' service times: exponential (M/M/c) or fixed, "
                                "1/rate each (M/D/c) (exponential)")
        group.add_argument("--herding-warmup", type=non_negative, default=5.0,
                           help="seconds of load before each policy's measured run, reported "
                                "apart as its cold start (5)")

    async def run(self, ctx: BenchContext) -> ScenarioResult:
        args = ctx.args
        contenders, notes = peer_contenders(getattr(args, "peers", peers.NONE))
        result = await run_herding(
            ctx, policies=list(args.policies), clients=args.clients, rate=args.rate,
            duration=args.duration, seed=args.seed, strategy=args.strategy,
            small_rate=args.herding_small_rate, big_pods=args.herding_big_pods,
            big_servers=args.herding_big_servers, big_rate=args.herding_big_rate,
            epoch=args.herding_epoch, tokens=args.herding_tokens, warmup=args.herding_warmup,
            uniform=args.herding_fleet == "uniform", service=args.herding_service,
            peer_specs=contenders,
        )
        result.notes.extend(notes)
        return result


async def run_herding(
    ctx: BenchContext,
    *,
    policies: list[str],
    clients: int,
    rate: float,
    duration: float,
    seed: int = 1,
    strategy: str | None = None,
    small_rate: float = 50.0,
    big_pods: int = 3,
    big_servers: int = 4,
    big_rate: float = 12.5,
    epoch: float = 1.0,
    tokens: int = 16,
    warmup: float = 5.0,
    uniform: bool = False,
    service: str = "exponential",
    peer_specs: Sequence[peers.PeerSpec] = (),
) -> ScenarioResult:
    """Run the herding comparison (see the module docstring); usable without the CLI."""
    capacity = (0.0 if uniform else small_rate) + big_pods * big_servers * big_rate
    pods_text = (f"pod-0..{big_pods - 1}: {big_servers} x {big_rate:g}/s" if uniform else
                 f"pod-0: 1 x {small_rate:g}/s; pod-1..{big_pods}: {big_servers} x {big_rate:g}/s")
    params = {
        "pods": f"{pods_text}, {service} service",
        "capacity_req_per_s": capacity, "clients": clients, "rate_per_client": rate,
        "offered_load": f"{clients * rate:g} req/s ({clients * rate / capacity:.0%} of capacity)",
        "duration_per_policy_s": duration, "warmup_per_policy_s": warmup,
        "order": " → ".join([*policies, *(p.name for p in peer_specs)]),
        "peers": ", ".join(f"{p.name} (one per client)" for p in peer_specs) or "none",
        "strategy": strategy or "default", "signaling_epoch_s": epoch, "lp_tokens": tokens,
        "seed": seed,
    }
    fleet = await Fleet.start(
        ["--spec", fleet_spec(small_rate, big_servers, big_rate, big_pods, uniform=uniform,
                              service=service), "--seed", str(seed)],
        stderr_path=str(ctx.logs / "fleet.log"),
    )
    plane: SignalingPlane | None = None
    per_policy: dict[str, dict[str, Any]] = {}
    try:
        if CE_POLICY in policies:
            ctx.say("starting the signaling plane (embedded Redis, signaler)")
            plane = SignalingPlane(ctx.logs, epoch=epoch, tokens=tokens, nice=CONTROL_NICE)
            await plane.start()
        for i, policy in enumerate(policies, 1):
            ctx.say(f"[{i}/{len(policies)}] {policy}: {clients} clients × {rate:g} req/s "
                    f"for {warmup:g} s (cold start) + {duration:g} s")
            await fleet.reset(seed=seed)
            sidecar_policy = "equilibrium" if policy == CE_POLICY else policy
            extra = plane.sidecar_args() if policy == CE_POLICY and plane else []
            env = plane.sidecar_env() if policy == CE_POLICY and plane else None
            sidecars = await start_sidecars(
                [f"{policy}-{c + 1}" for c in range(clients)], {UPSTREAM: fleet.urls},
                policy=sidecar_policy, strategy=strategy, extra=extra, env=env,
                stderr_path=str(ctx.logs / f"sidecar-{policy}.log"),
            )
            signaler: dict[str, Any] = {}
            try:
                targets = [LoadTarget(s.id, s.outbound_url, UPSTREAM) for s in sidecars]
                result = await drive_load(targets, rate, warmup + duration, ctx.logs, sidecars)
                if policy == CE_POLICY and plane is not None:
                    signaler = await plane.state(UPSTREAM)
            finally:
                for s in sidecars:
                    await s.stop()
            per_policy[policy] = measure(result, [p.name for p in fleet.pods], warmup,
                                          fleet.pod_by_url())
            if signaler:
                per_policy[policy]["signaler"] = signaler_summary(signaler, fleet.pod_by_url())
            m = per_policy[policy]
            ctx.say(f"    mean {ms(m['latency']['mean'])}, p99 {ms(m['latency']['p99'])}, "
                    f"steady mean {ms(m['steady_latency']['mean'])}, "
                    f"cold start {ms(m['cold_start_latency']['mean'])}, errors {m['errors']}, "
                    f"following {m['following']}")
            client, pod, worst = slowest_pair(m["by_caller_pod"])
            if worst:
                ctx.say(f"    slowest caller → pod: {client} → {pod}, mean {ms(worst['mean'])} "
                        f"over {worst['requests']} requests, {worst['slow']} slower than "
                        f"{SLOW * 1000:g} ms")
        for i, spec in enumerate(peer_specs, 1):
            ctx.say(f"[peer {i}/{len(peer_specs)}] {spec.name}: one per client, {clients} × "
                    f"{rate:g} req/s for {warmup:g} s (cold start) + {duration:g} s")
            await fleet.reset(seed=seed)
            result = await _peer_run(ctx, spec, fleet.urls, clients, rate, warmup + duration)
            per_policy[spec.name] = measure(result, [p.name for p in fleet.pods], warmup)
            m = per_policy[spec.name]
            ctx.say(f"    mean {ms(m['latency']['mean'])}, p99 {ms(m['latency']['p99'])}, "
                    f"errors {m['errors']}")
    finally:
        if plane is not None:
            await plane.stop()
        await fleet.stop()
    return ScenarioResult(
        parameters=params,
        tables=[latency_table(per_policy), share_table(per_policy, [p.name for p in fleet.pods]),
                *targets_table(per_policy), *peer_tables(per_policy)],
        data={"policies": per_policy},
        notes=[
            "Latency runs from each request's intended start on the open-loop schedule; "
            f"each policy first runs {warmup:g} s of the same load (its cold start, reported "
            "apart: fresh sidecars, and for equilibrium-ce a signaler with no observations of "
            "this fleet yet), then the measured run; steady = the second half of the measured "
            "run.",
            "Pod shares are of the requests answered in the steady state; flapping is the "
            f"largest change of any pod's share between consecutive {FLAP_WINDOW:g} s windows.",
            "equilibrium-ce: `following` counts sidecars that followed a recommendation at the "
            "end of the run. Its signaler runs at nice "
            f"{CONTROL_NICE}: in a cluster the control plane does not share the data path's "
            "cores, here it would otherwise compete with the sidecars for them.",
        ],
    )


async def _peer_run(ctx: BenchContext, spec: peers.PeerSpec, urls: list[str], clients: int,
                    rate: float, seconds: float) -> LoadResult:
    """Every client sends to its own instance of the peer (independent balancers, as the
    sidecars are: each knows only its own connections)."""
    started: list[peers.PeerProxy] = []
    try:
        for c in range(clients):
            started.append(await peers.PeerProxy.start(
                spec, urls, ctx.logs, name=f"{spec.name}-{c + 1}"))
        targets = [LoadTarget(p.name, p.url, UPSTREAM) for p in started]
        return await drive_load(targets, rate, seconds, ctx.logs)
    finally:
        for p in started:
            await p.stop()


def measure(result: LoadResult, pods: list[str], warmup: float = 0.0,
            names: dict[str, str] | None = None) -> dict[str, Any]:
    """The per-policy numbers of the tables; the first ``warmup`` s are the cold start.

    ``names`` maps endpoint URLs to pod names for the sidecars' own failure counts.
    """
    start = result.t0 + warmup
    measured_s = result.duration - warmup
    cold = [r for r in result.records if r.intended < start]
    records = [r for r in result.records if r.intended >= start]
    half = start + measured_s / 2.0
    steady = [r for r in records if r.intended >= half]
    answered = [r for r in steady if r.ok and r.pod]
    width = min(FLAP_WINDOW, measured_s / 2.0 / 3.0)
    wins = analysis.windows(steady, half, width, measured_s / 2.0)
    final = final_upstream_states(result.states, UPSTREAM)
    return {
        "requests": len(records),
        "errors": sum(1 for r in result.records if not r.ok),
        "latency": latency_summary(r.latency for r in records),
        "steady_latency": latency_summary(r.latency for r in steady),
        "cold_start_latency": latency_summary(r.latency for r in cold),
        "steady_shares": {p: sum(1 for r in answered if r.pod == p) / max(len(answered), 1)
                          for p in pods},
        "flapping_pp": analysis.flapping_index(wins, pods),
        "following": sum(1 for up in final.values() if up.get("following")),
        "generator": result.load_counts(),
        "cpu_pressure": result.cpu_pressure,
        "by_pod": {p: latency_summary(r.latency for r in records if r.pod == p) for p in pods},
        "by_caller_pod": by_caller_pod(records, pods),
        "attempt_failures": {
            sidecar: {(names or {}).get(e["endpoint"], e["endpoint"]): e["failures"]
                      for e in up.get("endpoints", []) if e.get("failures")}
            for sidecar, up in sorted(final.items())
        },
    }


def by_caller_pod(records: list[Record], pods: list[str]) -> dict[str, dict[str, Any]]:
    """Per caller and pod: requests, mean latency and requests slower than ``SLOW``.

    A queue that only one sidecar builds towards one pod (a stuck connection, a scheduler
    that over-sends) shows up here and nowhere else: the run's mean hides whose it is.
    """
    seen: dict[str, dict[str, list[float]]] = {}
    for r in records:
        seen.setdefault(r.client, {}).setdefault(r.pod or "none", []).append(r.latency)
    return {
        client: {pod: {"requests": len(lat), "mean": math.fsum(lat) / len(lat),
                       "slow": sum(1 for x in lat if x > SLOW)}
                 for pod in [*pods, "none"] if (lat := by_pod.get(pod))}
        for client, by_pod in sorted(seen.items())
    }


def slowest_pair(table: dict[str, dict[str, Any]]) -> tuple[str, str, dict[str, Any] | None]:
    """The (caller, pod, numbers) with the highest mean latency in a ``by_caller_pod`` table."""
    pairs = [(c, p, v) for c, row in table.items() for p, v in row.items()]
    if not pairs:
        return "", "", None
    return max(pairs, key=lambda cpv: cpv[2]["mean"])


def signaler_summary(state: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """The signaler's fitted models and last plan, with pod names instead of URLs."""
    plan = state.get("plan") or {}
    endpoints = [names.get(e, e) for e in plan.get("endpoints", [])]
    return {
        "models": {names.get(e, e): m for e, m in (state.get("models") or {}).items()},
        "plan": {k: plan.get(k) for k in ("status", "method", "objective", "ce_gap", "tokens",
                                          "variables", "constraints", "solve_seconds")},
        "marginal": dict(zip(endpoints, plan.get("marginal", []), strict=False)),
        "priced": dict(zip(endpoints, plan.get("models", []), strict=False)),
        "regret_gap": state.get("regret_gap"),
        "published": state.get("published"),
    }


def latency_table(per_policy: dict[str, dict[str, Any]]) -> Table:
    rows = []
    for policy, m in per_policy.items():
        lat, steady = m["latency"], m["steady_latency"]
        cold = m.get("cold_start_latency") or {}
        rows.append([policy, ms(lat["mean"]), ms(lat["p50"]), ms(lat["p99"]), ms(lat["p99.9"]),
                     ms(steady["mean"]), ms(steady["p99"]), ms(cold.get("mean", math.nan)),
                     str(m["errors"]), pp(m["flapping_pp"])])
    return Table("herding: latency from intended start",
                 ["policy", "mean", "p50", "p99", "p99.9", "steady mean", "steady p99",
                  "cold start mean", "errors", "flapping"], rows)


def share_table(per_policy: dict[str, dict[str, Any]], pods: list[str]) -> Table:
    rows = [[policy, *(pct(m["steady_shares"].get(p)) for p in pods)]
            for policy, m in per_policy.items()]
    return Table("herding: share of requests per pod (steady state)", ["policy", *pods], rows)


def targets_table(per_policy: dict[str, dict[str, Any]]) -> list[Table]:
    ce = per_policy.get(CE_POLICY)
    if ce is None:
        return []
    rows = []
    for other in ("equilibrium", "peak-ewma"):
        m = per_policy.get(other)
        if m is None:
            continue
        for label, key in (("mean", "latency"), ("steady mean", "steady_latency")):
            a, b = ce[key]["mean"], m[key]["mean"]
            verdict = "not measured" if math.isnan(a) or math.isnan(b) else (
                "met" if a < b else "missed")
            rows.append([f"{label} below {other}'s", f"{ms(a)} vs {ms(b)}", verdict])
    if not rows:
        return []
    return [Table("target (CE issue): equilibrium-ce has the lowest mean latency",
                  ["target", "measured", "verdict"], rows)]


def peer_tables(per_policy: dict[str, dict[str, Any]]) -> list[Table]:
    """Every contender as a ratio to HAProxy ``leastconn`` (when it ran), and issue 12's
    capacity-limited target: equilibrium's mean and p99 no worse than leastconn's."""
    ref = per_policy.get(peers.REFERENCE)
    if ref is None:
        return []
    keys = (("mean", "latency", "mean"), ("p99", "latency", "p99"),
            ("steady mean", "steady_latency", "mean"), ("steady p99", "steady_latency", "p99"))

    def ratio(m: dict[str, Any], key: str, q: str) -> float:
        b = ref[key][q]
        return m[key][q] / b if b and not math.isnan(b) else math.nan

    rows = [[name, *(f"{ratio(m, key, q):.2f}×" for _, key, q in keys)]
            for name, m in per_policy.items()]
    tables = [Table(f"herding: every contender as a ratio to {peers.REFERENCE}",
                    ["contender", *(label for label, _, _ in keys)], rows)]
    ours = per_policy.get("equilibrium")
    if ours is not None:
        target = []
        for label, q in (("mean", "mean"), ("p99", "p99")):
            a, b = ours["latency"][q], ref["latency"][q]
            verdict = "not measured" if math.isnan(a) or math.isnan(b) else (
                "met" if a <= b else "missed")
            target.append([f"equilibrium {label} no worse than {peers.REFERENCE}'s",
                           f"{ms(a)} vs {ms(b)}", verdict])
        tables.append(Table("target (issue 12): capacity-limited pods, independent callers",
                            ["target", "measured", "verdict"], target))
    return tables


SCENARIO = Herding()
