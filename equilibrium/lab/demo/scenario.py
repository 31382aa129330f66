"""Scenario ``demo``: the demo's run on the benchmark harness (``bench --scenario demo``).

Owns running :func:`~equilibrium.lab.demo.run.run_demo` once per policy (``--policies``,
default ``equilibrium``) with the bench's common options (duration, rate, clients, seed,
strategy, sidecar flags) and turning each summary into one row of a table; every run's PNG and
JSON land in ``<--out>/demo-<policy>/``. With the ``equilibrium`` policy the sidecars follow a
correlated-equilibrium signaler over an embedded Redis (as ``equilibrium demo`` does), unless
``--demo-no-signaler``. No live view: the harness prints the demo's summary and the table.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from equilibrium.lab.bench.report import json_safe, ms, pct, pp, secs
from equilibrium.lab.bench.scenarios import BenchContext, Scenario, ScenarioResult, Table
from equilibrium.lab.demo.plan import default_phases, signaling_for
from equilibrium.lab.demo.run import DemoConfig, run_demo

_DEFAULT = DemoConfig()


class DemoScenario(Scenario):
    name = "demo"
    summary = "the demo: five pods, one bad; sidecars following the CE signaler"
    default_policies = ("equilibrium",)
    default_duration = _DEFAULT.duration
    default_rate = _DEFAULT.rate
    default_clients = _DEFAULT.clients

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--demo-pods", type=int, default=_DEFAULT.pods,
                           help="pods of the demo service; the last one is bad (5)")
        group.add_argument("--demo-no-signaler", action="store_true",
                           help="no Redis, no signaler: each sidecar learns alone")

    def config(self, args: argparse.Namespace, policy: str, ctx: BenchContext) -> DemoConfig:
        pods = getattr(args, "demo_pods", _DEFAULT.pods)
        return DemoConfig(
            pods=pods, bad=pods - 1, clients=args.clients, rate=args.rate,
            duration=args.duration, policy=policy, strategy=args.strategy, seed=args.seed,
            out=ctx.out / f"demo-{policy}", sidecar_args=list(args.sidecar_arg))

    async def run(self, ctx: BenchContext) -> ScenarioResult:
        args = ctx.args
        rows: list[list[str]] = []
        runs: dict[str, Any] = {}
        files: list[str] = []
        for policy in args.policies:
            config = self.config(args, policy, ctx)
            config.validate()
            signaling = signaling_for(
                config, no_signaler=bool(getattr(args, "demo_no_signaler", False)),
                redis_url=None, environ=os.environ)
            if signaling.warning:
                ctx.say(f"demo: warning: {signaling.warning}")
            ctx.say(f"demo: policy {policy}, {args.duration:g} s")
            summary = await run_demo(config, default_phases(config, signaling),
                                     stream=ctx.stream, live=False)
            runs[policy] = json_safe(summary)
            files += [summary["plot"], summary["json"]]
            rows.append(self.row(policy, summary))
        params = {"pods": getattr(args, "demo_pods", _DEFAULT.pods),
                  "signaler": not getattr(args, "demo_no_signaler", False)}
        table = Table(
            title="demo: share sent to the bad pod, latency from intended start",
            columns=["policy", "coordination", "bad share (first 5 s)", "bad share (steady)",
                     "time to < 5 %", "p50", "p99", "steady p99", "flapping", "errors",
                     "bad < each good"],
            rows=rows)
        return ScenarioResult(parameters=params, tables=[table], data={"runs": runs},
                              files=files)

    @staticmethod
    def row(policy: str, summary: dict[str, Any]) -> list[str]:
        m = summary["metrics"]
        return [
            policy,
            "CE signaler" if summary["config"]["signaler"] else "alone",
            pct(m["bad_share_first"]), pct(m["bad_share_steady"]),
            secs(m["time_to_shift"]), ms(m["latency"]["p50"]), ms(m["latency"]["p99"]),
            ms(m["steady_latency"]["p99"]), pp(m["flapping_pp"]), str(m["errors"]),
            "yes" if summary["bad_pod_less_than_each_good_pod"] else "no",
        ]


SCENARIO = DemoScenario()
