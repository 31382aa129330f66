"""``equilibrium simulate``: the command line, the report and its JSON.

Parses the options, builds the scenario (:mod:`.scenarios`), runs every policy on it with the
same seed (:func:`equilibrium.lab.simulate.engine.simulate`: the same arrivals, pods and
service-time draws), and reports per policy what ``equilibrium bench`` reports (latency
percentiles over the measured run and its steady state, each pod's share, the tracked pod's
share and time to shift, flapping, the sidecars' Wardrop gaps, the signaler's CE gap) beside
the Wardrop equilibrium, social optimum and price of anarchy of the same pods (:mod:`.optimum`).

``--json`` prints one object; it is a function of the command and the seed except for the
``wall`` member (seconds of real time each run took). ``--out DIR`` also writes the JSON, a
Markdown report and PNG plots there.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from equilibrium.lab.bench.report import json_safe, machine_info, ms, pct, pp, render_table, secs
from equilibrium.lab.simulate import metrics
from equilibrium.lab.simulate.engine import CE_POLICY, Knobs, RunResult, simulate
from equilibrium.lab.simulate.optimum import benchmarks
from equilibrium.lab.simulate.scenarios import DEFAULT_POLICIES, SCENARIOS, Setup, Sizes, build
from equilibrium.lab.simulate.windowed import simulate_windowed
from mesh.policies import POLICY_NAMES
from mesh.profile_names import PROFILE_NAMES

KNOWN_POLICIES = (*POLICY_NAMES, CE_POLICY)
DEFAULTS = Knobs()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    p.add_argument("--sidecars", type=_positive_int, default=None,
                   help="simulated sidecars (default: the scenario's)")
    p.add_argument("--endpoints", type=_positive_int, default=None,
                   help="pods of the upstream (default: the scenario's)")
    p.add_argument("--duration", type=_positive, default=None,
                   help="simulated seconds measured (default: the scenario's)")
    p.add_argument("--rate", type=_positive, default=None,
                   help="requests/s each sidecar's client sends (default: the scenario's)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--policies", default=None,
                   help=f"comma-separated, of: {', '.join(KNOWN_POLICIES)} "
                        "(default: the scenario's)")
    p.add_argument("--strategy", choices=PROFILE_NAMES, default="balanced")
    p.add_argument("--distribution", choices=("exponential", "lognormal", "pareto", "constant"),
                   default="exponential", help="service times of queueing pods")
    p.add_argument("--arrivals", choices=("uniform", "poisson"), default="uniform",
                   help="each client's schedule: evenly spaced as the bench's load generator "
                        "(default), or Poisson")
    p.add_argument("--network", type=_non_negative, default=DEFAULTS.network,
                   help=f"one-way sidecar-to-pod delay, s ({DEFAULTS.network})")
    p.add_argument("--overhead", type=_non_negative, default=DEFAULTS.overhead,
                   help="client-to-sidecar hop and proxy work, in the client's latency only, "
                        f"s ({DEFAULTS.overhead})")
    p.add_argument("--jitter", type=_non_negative, default=DEFAULTS.jitter,
                   help="mean of an exponential extra delay on every response, seen by the "
                        "sidecar and the client (proxy and scheduling noise), s (0)")
    p.add_argument("--epoch", type=_positive, default=DEFAULTS.epoch,
                   help="signaling epoch, s (1)")
    p.add_argument("--tokens", type=_positive_int, default=DEFAULTS.tokens,
                   help=f"tokens of the signaler's LP ({DEFAULTS.tokens}, as the herding bench)")
    p.add_argument("--cohort", type=_positive_int, default=DEFAULTS.cohort,
                   help="clients that share one simulated sidecar's routing state (its "
                        "policy, retry budget and signaling); each keeps its own arrivals. "
                        "1 (default): a sidecar per client. Larger: the same load in less "
                        "memory and CPU, at a fidelity docs/simulate.md measures")
    p.add_argument("--workers", type=_positive_int, default=1,
                   help="processes that run the sidecars (1, the default: the event engine in "
                        "this process; 2 on a 2-core machine for large runs). The records are "
                        "the same for any number (docs/simulate.md); equilibrium-ce always "
                        "runs in one")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", type=Path, default=None,
                   help="also write simulate-<scenario>.json/.md and plots here")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "simulate", help="simulate many sidecars in virtual time (the unmodified core)",
        description="A discrete-event simulation of many sidecars running the unmodified "
                    "routing policies (and the signaler) against simulated pods, in "
                    "virtual time. See docs/simulate.md.")
    add_arguments(p)
    p.set_defaults(func=main)


def policies_of(args: argparse.Namespace) -> list[str]:
    if args.policies is None:
        return list(DEFAULT_POLICIES[args.scenario])
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    unknown = [n for n in names if n not in KNOWN_POLICIES]
    if unknown or not names:
        raise ValueError(f"unknown policy {', '.join(unknown) or '(none)'}; choose from "
                         f"{', '.join(KNOWN_POLICIES)}")
    return list(dict.fromkeys(names))


def run(args: argparse.Namespace, progress: Any = None) -> tuple[dict[str, Any], Setup,
                                                                  dict[str, RunResult]]:
    """Every policy on the scenario; the report document and the raw runs."""
    setup = build(args.scenario, Sizes(args.sidecars, args.endpoints, args.rate, args.duration,
                                       args.distribution))
    knobs = Knobs(network=args.network, overhead=args.overhead, jitter=args.jitter,
                  arrivals=args.arrivals,
                  epoch=args.epoch, tokens=args.tokens, strategy=args.strategy,
                  cohort=args.cohort)
    runs: dict[str, RunResult] = {}
    for policy in policies_of(args):
        if progress is not None:
            shared = (f" ({math.ceil(setup.sidecars / knobs.cohort)} routing states, one per "
                      f"{knobs.cohort})" if knobs.cohort > 1 else "")
            progress(f"simulating {policy}: {setup.sidecars} sidecars{shared} x "
                     f"{len(setup.pods)} pods x {setup.total:g} s")
        if args.workers > 1 and policy != CE_POLICY:
            runs[policy] = simulate_windowed(setup, policy, args.seed, knobs, args.workers)
        else:
            runs[policy] = simulate(setup, policy, args.seed, knobs)
    return report(args, setup, knobs, runs), setup, runs


def _end_pods(setup: Setup) -> tuple[list[Any], int]:
    """The pods and sidecars at the end of the run (after the timeline's changes)."""
    pods = dict(enumerate(setup.pods))
    up = {i for i in pods if i not in setup.absent}
    sidecars = setup.sidecars
    for _, what, arg in setup.changes:
        if what == "heal":
            pods[arg] = pods[arg].healed()
        elif what == "pod-leave":
            up.discard(arg)
        elif what == "pod-join":
            up.add(arg)
        elif what == "sidecars-leave":
            sidecars -= min(arg, sidecars)
        elif what == "sidecars-join":
            sidecars += arg
    return [pods[i] for i in sorted(up)], sidecars


def report(args: argparse.Namespace, setup: Setup, knobs: Knobs,
           runs: dict[str, RunResult]) -> dict[str, Any]:
    k = len(setup.pods)
    t0, duration = setup.warmup, setup.duration
    end_pods, end_sidecars = _end_pods(setup)
    fixed = 2 * knobs.network + knobs.overhead + knobs.jitter
    optimum = benchmarks(end_pods, end_sidecars * setup.rate, fixed)
    per_policy: dict[str, Any] = {}
    for policy, result in runs.items():
        m = metrics.run_metrics(result.records, t0, duration, k, setup.tracked)
        m["shares"] = metrics.pod_shares(result.records, t0 + duration / 2, t0 + duration, k)
        if setup.warmup > 0:
            m["cold_latency"] = metrics.latency_summary(
                metrics._arrays(result.records)[1][
                    metrics._arrays(result.records)[0] < t0])
        series = metrics.window_series(result.records, t0, duration, k, setup.tracked)
        m["series"] = series
        healed = [c[0] for c in setup.changes if c[1] == "heal"]
        if healed and setup.tracked is not None:
            m["recovery"] = metrics.recovery_metrics(series, healed[0], k)
        m["sidecars"] = result.sidecars
        m["retries"] = result.retries
        m["events"] = result.events
        if result.plane is not None:
            m["signaler"] = result.plane
        if optimum is not None:
            m["steady_mean_over_optimum"] = m["steady_latency"]["mean"] / optimum["optimum_mean"]
        per_policy[policy] = m
    return {
        "scenario": setup.scenario,
        "command": "equilibrium simulate " + " ".join(shlex.quote(a) for a in recorded_argv(args)),
        "parameters": {
            "sidecars": setup.sidecars, "endpoints": k, "rate_per_sidecar": setup.rate,
            "duration_s": duration, "warmup_s": setup.warmup, "seed": args.seed,
            "strategy": knobs.strategy, "arrivals": knobs.arrivals,
            "network_s": knobs.network, "overhead_s": knobs.overhead,
            "jitter_s": knobs.jitter, "epoch_s": knobs.epoch,
            "tokens": knobs.tokens, "cohort": knobs.cohort,
            "pods": [p.as_dict() for p in setup.pods],
            "tracked_pod": None if setup.tracked is None else f"pod-{setup.tracked}",
            "changes": [list(c) for c in setup.changes], "notes": list(setup.notes),
        },
        "requests": sum(len(r.records) for r in runs.values()),
        "optimum": optimum,
        "policies": per_policy,
        "wall": {"seconds": {p: r.wall_seconds for p, r in runs.items()},
                 "cpu_seconds": {p: r.cpu_seconds for p, r in runs.items()},
                 "workers": args.workers,
                 "machine": machine_info()},
    }


#: every option that changes what is simulated, in the order the recorded command gives them
RECORDED = ("sidecars", "endpoints", "duration", "rate", "strategy", "distribution", "arrivals",
            "network", "overhead", "jitter", "epoch", "tokens", "cohort")


def _number(value: float) -> str:
    """``4`` for 4.0, ``0.0005`` as it is; exact (repr) where ``%g`` would round."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def recorded_argv(args: argparse.Namespace) -> list[str]:
    """The options of the report's ``command``: the scenario, the seed, the policies and every
    other option not at its default, so that running the command again simulates the same
    thing."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = ["--scenario", args.scenario]
    for name in RECORDED:
        value = getattr(args, name)
        if value is not None and value != parser.get_default(name):
            out += [f"--{name}", _number(value) if isinstance(value, float) else str(value)]
    out += ["--seed", str(args.seed)]
    if args.policies:
        out += ["--policies", args.policies]
    return out


def tables(doc: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    tracked = doc["parameters"]["tracked_pod"]
    rows = []
    for policy, m in doc["policies"].items():
        lat, steady = m["latency"], m["steady_latency"]
        sc = m["sidecars"]
        sig = m.get("signaler") or {}
        row = [policy, str(m["requests"]), ms(lat["mean"]), ms(lat["p50"]), ms(lat["p99"]),
               ms(lat["p99.9"]), ms(steady["mean"]), ms(steady["p99"]), str(m["errors"])]
        if tracked:
            row += [pct(m["bad_share"]), pct(m["bad_share_steady"]), secs(m["time_to_shift"])]
        row += [pp(m["flapping_pp"]),
                "—" if sc["nash_gap_mean"] is None else ms(sc["nash_gap_mean"]),
                f"{sc['converged']}/{sc['count']}",
                ms(sig["ce_gap"]) if "ce_gap" in sig else "—",
                f"{m['steady_mean_over_optimum']:.3f}" if "steady_mean_over_optimum" in m
                else "—"]
        rows.append(row)
    cols = ["policy", "requests", "mean", "p50", "p99", "p99.9", "steady mean", "steady p99",
            "errors"]
    if tracked:
        cols += [f"{tracked} share", f"{tracked} share (steady)", "time to < 5 %"]
    cols += ["flapping", "Wardrop gap (mean)", "converged", "plan CE gap",
             "steady mean / optimum"]
    out = [(f"simulate {doc['scenario']}: per policy", cols, rows)]
    k = doc["parameters"]["endpoints"]
    if k <= 12:
        share_rows = [[p, *(pct(s) for s in m["shares"])] for p, m in doc["policies"].items()]
        opt = doc.get("optimum")
        if opt is not None and len(opt["optimum_shares"]) == k:
            share_rows.append(["social optimum", *(pct(s) for s in opt["optimum_shares"])])
            share_rows.append(["Wardrop equilibrium", *(pct(s) for s in opt["wardrop_shares"])])
        out.append(("steady-state share of each pod", ["policy", *(f"pod-{j}" for j in range(k))],
                    share_rows))
    opt = doc.get("optimum")
    if opt is not None:
        out.append(("the same pods' true curves", ["Wardrop mean", "optimum mean",
                                                   "price of anarchy"],
                    [[ms(opt["wardrop_mean"]), ms(opt["optimum_mean"]),
                      f"{opt['price_of_anarchy']:.3f}"]]))
    rec_rows = [[p, secs(r["time_to_readmit"]), pct(r["peak_share_after_heal"]),
                 ms(r["worst_window_p99_after_heal"])]
                for p, m in doc["policies"].items() if (r := m.get("recovery"))]
    if rec_rows:
        out.append(("after the pod heals", ["policy", "time to 80 % of a fair share",
                                            "peak 1 s share", "worst 1 s p99"], rec_rows))
    return out


def render_markdown(doc: dict[str, Any]) -> str:
    lines = [f"## `simulate {doc['scenario']}`", "", f"- command: `{doc['command']}`",
             f"- simulated requests: {doc['requests']}",
             "- wall (CPU) time per policy: " + ", ".join(
                 f"{p} {s:.1f} s ({doc['wall']['cpu_seconds'][p]:.1f} s)"
                 for p, s in doc["wall"]["seconds"].items()),
             f"- load average at the end: {doc['wall']['machine'].get('load_average')}"]
    for title, cols, rows in tables(doc):
        lines += ["", render_table(title, cols, rows)]
    return "\n".join(lines) + "\n"


def write(doc: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"simulate-{doc['scenario']}"
    json_path, md_path = base.with_suffix(".json"), base.with_suffix(".md")
    json_path.write_text(json.dumps(json_safe(doc), indent=2, allow_nan=False) + "\n")
    md_path.write_text(render_markdown(doc))
    from equilibrium.lab.simulate.plots import plot_run

    return [json_path, md_path, plot_run(out / f"simulate-{doc['scenario']}.png", doc)]


def main(args: argparse.Namespace) -> int:
    try:
        policies_of(args)
    except ValueError as exc:
        print(f"equilibrium simulate: {exc}", file=sys.stderr)
        return 2
    if args.workers > 1 and args.network <= 0:
        print("equilibrium simulate: --workers above 1 needs --network above 0 (the delay is "
              "the window in which the sidecars run apart)", file=sys.stderr)
        return 2

    def say(text: str) -> None:
        if not args.json:
            print(text, file=sys.stderr, flush=True)

    doc, _, _ = run(args, say)
    if args.out is not None:
        for path in write(doc, args.out):
            say(f"wrote {path}")
    if args.json:
        print(json.dumps(json_safe(doc), sort_keys=True, allow_nan=False))
    else:
        for title, cols, rows in tables(doc):
            print(render_table(title, cols, rows) + "\n")
    return 0
