"""Scenario ``signaler-scale``: the signaler's CPU against the number of sidecars publishing to
one upstream it leads (issue 15, "the control plane at scale").

Real processes: an embedded Redis, one ``equilibrium signaler`` (epoch 1 s) serving the
upstream ``scale``. This process plays N *phantom* sidecars: every second it appends one signed
summary per phantom (the same summary a real sidecar sends, each with its own id, demand and
epoch, in the encoding of ``--scale-encodings``) to the upstream's stream with one pipelined
``XADD`` per phantom, as N sidecars would.
Each phantom's counts and latencies move every epoch (its requests, and the mean latencies with
them), as a busy sidecar's do, so no summary repeats the last one's values; the phantoms encode
only what changed and sign each summary (the bench process must keep up with 1,000 of them a
second on a loaded 2-core machine, or it measures its own starvation).
For each N of ``--scale-publishers`` it waits for the signaler to settle (``--scale-warmup``
seconds), then reads the signaler's CPU time (``/proc/PID/stat``, user + system, children
excluded) over ``--duration`` seconds, and checks the plan stayed fresh: the signaler's epoch
count advanced with the wall clock and the recommendation a phantom reads back is from the
last two epochs.

Reported per N: CPU seconds per 30 s, share of one core, summaries consumed, recommendations
published, the plan's solve time, and the age of the recommendation a phantom reads back.
The publisher's own CPU is not counted: it runs in this process, not in the signaler.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from equilibrium.lab.bench.scenarios import BenchContext, Scenario, ScenarioResult, Table
from equilibrium.lab.signaling_plane import SignalingPlane
from wire.entries import compact_json, number_text
from wire.keys import SUMMARY_MAXLEN, recommendation_stream, summary_stream
from wire.signing import mac
from wire.summary import (
    SUMMARY_VERSION,
    SUMMARY_VERSIONS,
    RegretSummary,
    canonical_summary_bytes,
    encode_summary,
)

UPSTREAM = "scale"
ENDPOINTS = tuple(f"http://10.0.0.{i}:8080" for i in range(1, 5))
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far, from ``/proc/PID/stat``."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def phantom_summary(i: int, epoch: int, now: float) -> RegretSummary:
    """What sidecar ``phantom-i`` would publish: four endpoints, one slower, its own demand."""
    share = 1.0 + (i % 7) / 10.0
    return RegretSummary(
        sidecar=f"phantom-{i}", upstream=UPSTREAM, epoch=epoch, sent_at=now,
        endpoints=ENDPOINTS,
        requests=(40, 40, 40, 8), failures=(0, 0, 0, 1),
        latency_mean=(0.011, 0.012, 0.011, 0.26), latency_p50=(0.010, 0.011, 0.010, 0.012),
        latency_p99=(0.030, 0.031, 0.029, 0.51), in_flight=(1, 1, 1, 2),
        demand=12.8 * share, weights=(0.31, 0.31, 0.31, 0.07),
        regret=((0.0, 0.0, 0.0, -0.2), (0.0, 0.0, 0.0, -0.2), (0.0, 0.0, 0.0, -0.2),
                (0.25, 0.25, 0.25, 0.0)),
    )


def phantom_fields(base: dict[str, str], i: int, epoch: int, now: float,
                   key: bytes) -> dict[str, str]:
    """``base`` (a phantom's encoded summary, in either encoding) for ``epoch``: its requests
    and mean latencies moved by a few percent (a different value every epoch), stamped
    ``now`` and signed."""
    step = (i + epoch) % 5
    requests = [38 + step, 40 - step, 39 + step % 3, 8 + step % 2]
    means = [0.0105 + 0.0002 * step, 0.0118 + 0.0001 * step, 0.011 + 0.0003 * step,
             0.25 + 0.004 * step]
    if base["v"] == "2":
        values = json.loads(base["body"])
        values.update(epoch=epoch, sent_at=now, requests=requests, latency_mean=means)
        fields = {**base, "body": compact_json(values)}
    else:
        fields = dict(base)
        fields["epoch"] = str(epoch)
        fields["sent_at"] = number_text(now)
        fields["requests"] = compact_json(requests)
        fields["latency_mean"] = compact_json(means)
    fields["sig"] = mac(key, canonical_summary_bytes(fields))
    return fields


class Publishers:
    """N phantom sidecars appending one signed summary each per second (bounded in time)."""

    def __init__(self, client: aioredis.Redis, key: bytes) -> None:
        self.client, self.key = client, key
        self.count = 0
        self.version = SUMMARY_VERSION
        """The summaries' encoding (:data:`wire.summary.SUMMARY_VERSIONS`)."""
        self.epoch = 0
        self.sent = 0
        self._base: dict[tuple[int, int], dict[str, str]] = {}

    async def run_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        stream = summary_stream(UPSTREAM)
        while time.monotonic() < deadline:
            started = time.monotonic()
            self.epoch += 1
            now = time.time()
            pipe = self.client.pipeline(transaction=False)
            for i in range(self.count):
                base = self._base.get((i, self.version))
                if base is None:
                    base = self._base[i, self.version] = encode_summary(
                        replace(phantom_summary(i, 0, now), version=self.version))
                fields: Any = phantom_fields(base, i, self.epoch, now, self.key)
                pipe.xadd(stream, fields, maxlen=SUMMARY_MAXLEN, approximate=True)
            if self.count:
                await pipe.execute()
                self.sent += self.count
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))


class SignalerScale(Scenario):
    name = "signaler-scale"
    summary = "the signaler's CPU against the number of sidecars publishing to one upstream"
    default_duration = 30.0
    default_clients = 1  # unused: phantom publishers, no fleet

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--scale-publishers", default="1,200,1000",
                           help="comma-separated numbers of publishing sidecars (default "
                                "1,200,1000)")
        group.add_argument("--scale-warmup", type=float, default=10.0,
                           help="seconds before each measurement (default 10)")
        group.add_argument("--scale-tokens", type=int, default=32,
                           help="the signaler's --tokens (default 32)")
        group.add_argument("--scale-encodings", default=str(SUMMARY_VERSION),
                           help="comma-separated summary encodings the phantoms write, one "
                                "row each per number of publishers, in turn (1: a field per "
                                f"value, 2: one body; default {SUMMARY_VERSION})")

    async def run(self, ctx: BenchContext) -> ScenarioResult:
        args = ctx.args
        counts = [int(c) for c in str(args.scale_publishers).split(",") if c.strip()]
        if not counts or any(c < 0 or c > 20_000 for c in counts):
            raise ValueError("--scale-publishers: numbers between 0 and 20000")
        encodings = [int(v) for v in str(args.scale_encodings).split(",") if v.strip()]
        if not encodings or any(v not in SUMMARY_VERSIONS for v in encodings):
            raise ValueError(f"--scale-encodings: among {SUMMARY_VERSIONS}")
        duration = float(args.duration)
        plane = SignalingPlane(ctx.logs, epoch=1.0, tokens=args.scale_tokens,
                               signer="scale-signaler", upstreams=(UPSTREAM,))
        rows: list[list[str]] = []
        phase_rows: list[list[str]] = []
        data: dict[str, Any] = {"runs": []}
        await plane.start()
        client = aioredis.from_url(plane.redis_url)
        try:
            assert plane.signaler is not None
            pid = plane.signaler.pid
            key = plane.sidecar_env()["EQUILIBRIUM_MESH_SECRET"].encode()
            publishers = Publishers(client, key)
            for count, encoding in [(c, v) for c in counts for v in encodings]:
                publishers.count, publishers.version = count, encoding
                ctx.say(f"signaler-scale: {count} publishers (encoding {encoding}): warming "
                        f"up {args.scale_warmup:g} s")
                await publishers.run_for(args.scale_warmup)
                before_state = await plane.debug_state()
                phases_before = phase_seconds(await plane.metrics_text())
                cpu_before, wall_before = cpu_seconds(pid), time.monotonic()
                sent_before = publishers.sent
                await publishers.run_for(duration)
                cpu = cpu_seconds(pid) - cpu_before
                wall = time.monotonic() - wall_before
                after_state = await plane.debug_state()
                phases_after = phase_seconds(await plane.metrics_text())
                phases: dict[str, float] | None = None
                if phases_before and phases_after:  # else /metrics did not answer: no split
                    phases = {name: (phases_after.get(name, 0.0)
                                     - phases_before.get(name, 0.0)) / wall for name in PHASES}
                    phases["rest"] = max(0.0, cpu / wall - sum(phases.values()))
                run = {
                    "publishers": count, "encoding": encoding, "seconds": wall,
                    "cpu_seconds": cpu,
                    "cpu_share": cpu / wall, "cpu_per_30s": cpu * 30.0 / wall,
                    "summaries_sent": publishers.sent - sent_before,
                    **freshness(before_state, after_state, wall),
                    "recommendation_age_s": await recommendation_age(client, count),
                    "phase_share": phases,
                }
                data["runs"].append(run)
                ctx.say(f"  {count}: {run['cpu_per_30s']:.2f} CPU-s per 30 s "
                        f"({100 * run['cpu_share']:.1f} % of a core)")
                first = next(r for r in data["runs"] if r["publishers"] == count)
                ratio = run["cpu_share"] / first["cpu_share"] if first["cpu_share"] else 0.0
                rows.append([
                    str(count), str(encoding), f"{run['cpu_per_30s']:.2f}",
                    f"{100 * run['cpu_share']:.1f} %", f"{ratio:.2f}",
                    str(run["summaries_sent"]), f"{run['epochs']}",
                    f"{run['published']}",
                    "—" if run["solve_seconds"] is None else f"{run['solve_seconds']:.3f}",
                    "—" if run["recommendation_age_s"] is None
                    else f"{run['recommendation_age_s']:.2f}",
                ])
                phase_rows.append([str(count), str(encoding), *(
                    "—" if phases is None else f"{100 * phases[name]:.1f} %"
                    for name in (*PHASES, "rest"))])
        finally:
            await client.aclose()
            await plane.stop()
        return ScenarioResult(
            parameters={"publishers": counts, "duration": duration,
                        "warmup": args.scale_warmup, "tokens": args.scale_tokens,
                        "encodings": encodings, "epoch": 1.0},
            tables=[Table(
                f"The signaler leading one upstream, {duration:g} s per row",
                ["publishing sidecars", "encoding", "CPU s per 30 s", "of one core",
                 "CPU vs the row's first encoding", "summaries sent",
                 "epochs", "recommendations published", "last solve s",
                 "recommendation age s"], rows),
                Table("Where the signaler's CPU goes (share of one core, "
                      "equilibrium_signaler_cpu_seconds_total over the same window)",
                      ["publishing sidecars", "encoding", *PHASES, "rest"], phase_rows)],
            data=data,
            notes=["CPU is the signaler process's own (user + system, /proc), over the "
                   "measured window only; the phantom publishers run in the bench process.",
                   "verify: checking and keeping summaries; plan: fitting and solving (its "
                   "thread); sign: signing recommendations; dashboard: building frames; rest: "
                   "Redis I/O, the event loop and the admin listener (the process total less "
                   "the four)."],
        )


PHASES = ("verify", "plan", "sign", "dashboard")
"""The phases of ``equilibrium_signaler_cpu_seconds_total``."""


def phase_seconds(metrics: str) -> dict[str, float]:
    """``equilibrium_signaler_cpu_seconds_total`` by phase from a ``/metrics`` text."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics):
        if family.name != "equilibrium_signaler_cpu_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                out[sample.labels.get("phase", "")] = float(sample.value)
    return out


def freshness(before: dict[str, Any], after: dict[str, Any], wall: float) -> dict[str, Any]:
    """Epochs the signaler ran and recommendations it published during the window."""
    def upstream(state: dict[str, Any]) -> dict[str, Any]:
        return dict((state.get("upstreams") or {}).get(UPSTREAM) or {})

    up_before, up_after = upstream(before), upstream(after)
    epochs = int(after.get("epoch", 0) or 0) - int(before.get("epoch", 0) or 0)
    published = int(up_after.get("published", 0) or 0) - int(up_before.get("published", 0) or 0)
    plan = up_after.get("plan") or {}
    solve = plan.get("solve_seconds")
    return {"epochs": epochs, "published": published,
            "solve_seconds": float(solve) if isinstance(solve, int | float) else None,
            "epochs_per_second": epochs / wall if wall > 0 else 0.0}


async def recommendation_age(client: aioredis.Redis, count: int) -> float | None:
    """Seconds since the newest recommendation for ``phantom-0`` was issued (None: none)."""
    if count < 1:
        return None
    newest = await client.xrevrange(recommendation_stream(UPSTREAM, "phantom-0"), count=1)
    if not newest:
        return None
    raw: Any = newest[0][1] or {}
    issued = raw.get(b"issued_at", raw.get("issued_at"))
    try:
        text = issued.decode() if isinstance(issued, bytes) else str(issued)
        return max(0.0, time.time() - float(text))
    except (TypeError, ValueError):
        return None


SCENARIO = SignalerScale()
