"""The demo's run: a local mesh with a bad pod; watch the traffic shift away from it.

Owns one demo run: a fleet of pods (one of them the seed's "bad" pod that adds 500 ms to half
of its requests), client apps each behind its own real ``equilibrium sidecar`` process, a
bounded open-loop load per client driven by the benchmark harness
(:func:`equilibrium.lab.bench.harness.drive_load`), a live view once a second, then a summary,
a JSON record of it and a PNG plot. The signaling plane (Redis and a signaler) plugs in as a
:class:`DemoPhase` (:mod:`equilibrium.lab.demo.signaling`); the command line is
:mod:`equilibrium.lab.demo.cli`, the same run as a benchmark scenario
:mod:`equilibrium.lab.demo.scenario`. This module imports neither.

Processes: the parent (orchestration, live view), one fleet process, one sidecar per client,
one load generator per client, and whatever the phases start (``run.children``). The load
generator of a client sends ``Host: demo`` requests to that client's sidecar, as the client app
would. All children are stopped and reaped on every exit path (``finally``, own process groups,
and on Linux a parent-death signal), including Ctrl-C.

Phases (:class:`DemoPhase` hooks) start Redis and a signaler before the sidecars, add sidecar
flags, act during the run, add live lines and summary entries, without touching the core
sequence in :func:`run_demo`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
import tempfile
import webbrowser
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from equilibrium.lab import analysis
from equilibrium.lab.bench.harness import LoadResult, LoadTarget, StateSample, drive_load
from equilibrium.lab.bench.report import json_safe
from equilibrium.lab.fleet import Fleet
from equilibrium.lab.live import Frame, LiveView, PodLine, fmt_ms, fmt_pct
from equilibrium.lab.loadgen import LoadSummary, Record
from equilibrium.lab.processes import ChildProcess, stop_all
from equilibrium.lab.sidecars import Sidecar

UPSTREAM = "demo"
FOLLOWING_POLICY = "equilibrium"
"""The sidecar policy that follows the signaler's recommendations (the others ignore them)."""


@dataclass(slots=True)
class DemoConfig:
    """The demo's knobs (see ``equilibrium demo --help``)."""

    pods: int = 5
    bad: int = 4
    bad_delay: float = 0.5
    bad_fraction: float = 0.5
    clients: int = 3
    rate: float = 50.0
    duration: float = 40.0
    policy: str = "equilibrium"
    strategy: str | None = None
    seed: int = 1
    out: Path = Path(".")
    window: float = 2.0
    recover_at: float | None = None
    sidecar_args: list[str] = field(default_factory=list)
    #: tokens the signaler quantises the traffic into (the LP's players)
    tokens: int = 16
    #: open the dashboard in a web browser at the start (``--open``), when there is one
    open_dashboard: bool = False

    def validate(self) -> None:
        if self.pods < 2:
            raise ValueError("--pods must be at least 2")
        if not 0 <= self.bad < self.pods:
            raise ValueError(f"--bad must be a pod index in 0..{self.pods - 1}")
        if self.clients < 1:
            raise ValueError("--clients must be at least 1")
        if not (self.rate > 0 and self.duration > 0):
            raise ValueError("--rate and --duration must be > 0")
        if self.duration > 600:
            raise ValueError("--duration is limited to 600 s (the load is always bounded)")
        if self.rate * self.clients > 5000:
            raise ValueError("total rate above 5000 req/s is more than one machine can show")
        if not 1 <= self.tokens <= 64:
            raise ValueError("--tokens must be in 1..64 (the signaler re-solves every second)")


class DemoPhase:
    """A step that extends the demo. Every hook has a default that does nothing.

    Order: the fleet starts, then every phase's :meth:`prepare`, then the sidecars (each gets
    the flags of every phase's :meth:`sidecar_args` and the environment variables of its
    :meth:`sidecar_env`), then the load; once a second every phase's :meth:`on_tick` runs and
    its :meth:`live_lines` are shown; after the load every phase's :meth:`finish` runs and
    its :meth:`summary` entries join the summary. At the end the load generators, sidecars
    and ``run.children`` are stopped, then every phase's :meth:`close` runs (also after errors
    and Ctrl-C), then the fleet stops. Child processes a phase starts go into
    ``run.children`` so they are always reaped.
    """

    name = "phase"

    async def prepare(self, run: DemoRun) -> None:
        """After the fleet started, before any sidecar (e.g. start Redis and a signaler)."""

    def sidecar_args(self, run: DemoRun, sidecar_id: str) -> list[str]:
        """Extra command-line flags for one sidecar (e.g. ``--redis URL``)."""
        return []

    def sidecar_env(self, run: DemoRun, sidecar_id: str) -> dict[str, str]:
        """Extra environment variables for one sidecar (secrets go here, never in argv)."""
        return {}

    async def on_tick(self, run: DemoRun, elapsed: float) -> None:
        """Once a second during the load (e.g. make a pod recover, start a rogue caller)."""

    async def finish(self, run: DemoRun) -> None:
        """After the load, before the summary, with every process still up (final readings)."""

    def live_lines(self, run: DemoRun) -> list[str]:
        """Lines added to the live view."""
        return []

    def summary(self, run: DemoRun) -> dict[str, Any]:
        """Entries for the summary (printed as ``key: value`` and saved in the JSON)."""
        return {}

    def dashboard_url(self, run: DemoRun) -> str | None:
        """The mesh dashboard this phase serves (the signaler's), if any; without one the
        demo shows the first sidecar's own dashboard."""
        return None

    async def close(self, run: DemoRun) -> None:
        """Always called at the end (after the sidecars stopped), also after errors and Ctrl-C."""


NOT_READMITTED = ("not within the run (no probe reaches the demo's pods, which have no inbound "
                  "sidecar: only the few exploration requests see a pod heal, and the "
                  "signaler's plan waits about a minute more; try --duration 120 "
                  "--recover-at 15)")


class RecoveryPhase(DemoPhase):
    """The bad pod recovers at ``at`` seconds: is it re-admitted gradually, without a herd?"""

    name = "recovery"

    def __init__(self, at: float) -> None:
        self.at = at
        self.done = False

    async def on_tick(self, run: DemoRun, elapsed: float) -> None:
        if not self.done and elapsed >= self.at and run.fleet is not None:
            await run.fleet.control(run.config.bad, bad=False)
            self.done = True

    def live_lines(self, run: DemoRun) -> list[str]:
        state = "recovered" if self.done else f"recovers at t={self.at:.0f}s"
        return [f"  bad pod {run.bad_pod}: {state}"]

    def summary(self, run: DemoRun) -> dict[str, Any]:
        """When the recovered pod got back half its fair share, and its peak share after.

        A herd would show as a peak far above the fair share; no re-admission as None.
        """
        cfg = run.config
        after = analysis.share_between(run.records, run.bad_pod, run.t0 + self.at,
                                       run.t0 + cfg.duration)
        wins = [w for w in analysis.windows(run.records, run.t0, 1.0, cfg.duration)
                if w.start >= self.at]
        shares = [(w.start + w.width, w.share(run.bad_pod)) for w in wins]
        half_fair = 0.5 / cfg.pods
        back = next((t - self.at for t, x in shares if x >= half_fair), None)
        peak = max((x for _, x in shares if not math.isnan(x)), default=math.nan)
        return {
            "recovered at (s)": self.at,
            "bad pod share after recovery": after,
            f"re-admitted to half its fair traffic ({half_fair:.0%}) after (s)":
                NOT_READMITTED if back is None else round(back, 1),
            "largest 1 s share after recovery (fair share "
            f"{1 / cfg.pods:.0%})": peak,
        }


@dataclass
class DemoRun:
    """The state of one demo run, shared with the phases."""

    config: DemoConfig
    logs: Path
    fleet: Fleet | None = None
    sidecars: list[Sidecar] = field(default_factory=list)
    #: the load generators' counts, one per client (None: that generator gave none)
    load: dict[str, LoadSummary | None] = field(default_factory=dict)
    children: list[ChildProcess] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    states: list[StateSample] = field(default_factory=list)
    t0: float = 0.0
    #: share of the load's wall time in which some task waited for a CPU (Linux PSI)
    cpu_pressure: float = math.nan
    #: True when the sidecars are in a signaling plane (set by the signaling phase)
    signaling: bool = False

    @property
    def pod_names(self) -> list[str]:
        return [p.name for p in self.fleet.pods] if self.fleet else []

    @property
    def bad_pod(self) -> str:
        return f"pod-{self.config.bad}"

    def pod_of_endpoint(self, endpoint: str) -> str:
        by_url = self.fleet.pod_by_url() if self.fleet else {}
        return by_url.get(endpoint.rstrip("/"), endpoint)


async def _start_sidecars(run: DemoRun, phases: Sequence[DemoPhase]) -> None:
    assert run.fleet is not None
    urls = run.fleet.urls
    cfg = run.config
    ids = [f"client-{i + 1}" for i in range(cfg.clients)]

    async def one(sid: str) -> Sidecar:
        extra = list(cfg.sidecar_args)
        env: dict[str, str] = {}
        for phase in phases:
            extra += phase.sidecar_args(run, sid)
            env.update(phase.sidecar_env(run, sid))
        return await Sidecar.start(sid, {UPSTREAM: urls}, cfg.policy, cfg.strategy,
                                   extra, stderr_path=str(run.logs / f"{sid}.log"), env=env)

    results = await asyncio.gather(*(one(s) for s in ids), return_exceptions=True)
    run.sidecars = [r for r in results if isinstance(r, Sidecar)]
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]


async def _poll_final_states(run: DemoRun, elapsed: float) -> None:
    """One more state reading after the load (the summary's final weights)."""
    states = await asyncio.gather(*(s.state() for s in run.sidecars))
    for sidecar, state in zip(run.sidecars, states, strict=True):
        run.states.append(StateSample(elapsed, sidecar.id, state))


def _frame(run: DemoRun, elapsed: float, states: Mapping[str, Any],
           phases: Sequence[DemoPhase]) -> Frame:
    cfg = run.config
    now_rel = elapsed
    recent = [r for r in run.records if now_rel - cfg.window <= r.intended - run.t0 < now_rel]
    win = analysis.windows(recent, run.t0 + now_rel - cfg.window, cfg.window, cfg.window)[0]
    pods = [
        PodLine(name, win.share(name), win.pod_percentile(name, 50),
                win.pod_percentile(name, 99), bad=name == run.bad_pod)
        for name in run.pod_names
    ]
    extra = [line for phase in phases for line in phase.live_lines(run)]
    return Frame(
        elapsed=elapsed, duration=cfg.duration, requests=len(run.records),
        errors=sum(1 for r in run.records if not r.ok), window=cfg.window, pods=pods,
        states=dict(states), upstream=UPSTREAM, extra=extra, signaling=run.signaling,
    )


def dashboard_url(run: DemoRun, phases: Sequence[DemoPhase]) -> str | None:
    """The page the demo shows: the signaler's mesh dashboard, else the first sidecar's."""
    for phase in phases:
        url = phase.dashboard_url(run)
        if url:
            return url
    return run.sidecars[0].admin_url + "/dashboard" if run.sidecars else None


def announce_dashboard(run: DemoRun, phases: Sequence[DemoPhase], stream: TextIO) -> None:
    """Print ``dashboard: URL`` (live for the whole run) and, with ``--open``, open it."""
    url = dashboard_url(run, phases)
    if url is None:
        return
    stream.write(f"dashboard: {url}  (live while the demo runs)\n")
    stream.flush()
    if run.config.open_dashboard:
        try:
            opened = webbrowser.open(url, new=2)
        except webbrowser.Error:
            opened = False
        if not opened:
            stream.write("  (no web browser found to open it; open the address yourself)\n")
            stream.flush()


async def run_demo(
    config: DemoConfig, phases: Sequence[DemoPhase] = (), stream: TextIO | None = None,
    live: bool = True,
) -> dict[str, Any]:
    """Run the whole demo; returns the summary (also saved as JSON next to the plot)."""
    config.validate()
    stream = stream or sys.stdout
    logs = Path(tempfile.mkdtemp(prefix="equilibrium-demo-"))
    run = DemoRun(config=config, logs=logs)
    try:
        run.fleet = await Fleet.start(
            ["--pods", str(config.pods), "--bad", str(config.bad), "--bad-delay",
             repr(config.bad_delay), "--bad-fraction", repr(config.bad_fraction),
             "--seed", str(config.seed)],
            stderr_path=str(logs / "fleet.log"),
        )
        stream.write(
            f"fleet: {config.pods} pods of service '{UPSTREAM}' on loopback, "
            f"{run.bad_pod} is bad (+{config.bad_delay * 1000:.0f} ms on "
            f"{config.bad_fraction:.0%} of requests); logs in {logs}\n"
        )
        stream.flush()
        for phase in phases:
            await phase.prepare(run)
        stream.write(
            f"starting {config.clients} sidecars (policy {config.policy}, "
            + ("following the signaler's recommendations when they arrive" if run.signaling
               else "each learning alone by regret matching"
               if config.policy == FOLLOWING_POLICY else "each routing on its own") + ")\n"
        )
        stream.flush()
        await _start_sidecars(run, phases)
        announce_dashboard(run, phases, stream)
        view = LiveView(stream) if live else None

        async def tick(load: LoadResult, elapsed: float,
                       states: Mapping[str, dict[str, Any] | None]) -> None:
            run.t0, run.records, run.states = load.t0, load.records, load.states
            for phase in phases:
                await phase.on_tick(run, elapsed)
            if view is not None and elapsed <= config.duration + 0.5:
                view.show(_frame(run, elapsed, states, phases))

        targets = [LoadTarget(client=s.id, url=s.outbound_url, host=UPSTREAM)
                   for s in run.sidecars]
        load = await drive_load(targets, config.rate, config.duration, logs,
                                sidecars=run.sidecars, on_tick=tick)
        run.t0, run.records, run.states = load.t0, load.records, load.states
        run.cpu_pressure = load.cpu_pressure
        by_client = {s.client: s for s in load.summaries}
        run.load = {t.client: by_client.get(t.client) for t in targets}
        await _poll_final_states(run, asyncio.get_running_loop().time() - run.t0)
        for phase in phases:
            await phase.finish(run)
        summary = summarize(run, phases)
        print_summary(summary, stream)
        return summary
    finally:
        await asyncio.gather(*(s.stop() for s in run.sidecars), return_exceptions=True)
        await stop_all(run.children)
        for phase in phases:
            with contextlib.suppress(Exception):
                await phase.close(run)
        if run.fleet is not None:
            await run.fleet.stop()


def _state_series(run: DemoRun) -> tuple[list[float], dict[str, list[float]],
                                         dict[str, list[float]]]:
    """Sample times, mean regret per pod over sidecars, and Nash gap per sidecar."""
    times = sorted({s.t for s in run.states})
    index = {t: i for i, t in enumerate(times)}
    regret_sum = {p: [0.0] * len(times) for p in run.pod_names}
    regret_n = {p: [0] * len(times) for p in run.pod_names}
    gaps: dict[str, list[float]] = {s.id: [math.nan] * len(times) for s in run.sidecars}
    for sample in run.states:
        up = ((sample.state or {}).get("upstreams") or {}).get(UPSTREAM)
        if not up:
            continue
        i = index[sample.t]
        gaps.setdefault(sample.sidecar, [math.nan] * len(times))[i] = float(
            up.get("nash_gap", math.nan))
        for ep in up.get("endpoints", []):
            pod = run.pod_of_endpoint(str(ep.get("endpoint", "")))
            if pod in regret_sum:
                regret_sum[pod][i] += float(ep.get("regret", 0.0))
                regret_n[pod][i] += 1
    regrets = {
        p: [s / n if n else math.nan for s, n in zip(regret_sum[p], regret_n[p], strict=True)]
        for p in regret_sum
    }
    return times, regrets, gaps


def following_series(run: DemoRun) -> dict[str, list[tuple[float, bool]]]:
    """Per sidecar, (seconds since the load started, ``following``) at each state reading:
    whether its routing followed the signaler's recommendation or fell back to local regret
    matching."""
    series: dict[str, list[tuple[float, bool]]] = {s.id: [] for s in run.sidecars}
    for sample in run.states:
        up = ((sample.state or {}).get("upstreams") or {}).get(UPSTREAM)
        series.setdefault(sample.sidecar, []).append((sample.t, bool(up and up.get("following"))))
    return series


def _final_states(run: DemoRun) -> dict[str, dict[str, Any]]:
    last: dict[str, dict[str, Any]] = {}
    for sample in run.states:
        up = ((sample.state or {}).get("upstreams") or {}).get(UPSTREAM)
        if up:
            last[sample.sidecar] = up
    return last


def summarize(run: DemoRun, phases: Sequence[DemoPhase] = ()) -> dict[str, Any]:
    """Compute the summary, write the JSON and the PNG into ``--out``."""
    from equilibrium.lab.plot import plot_demo  # matplotlib: imported only to draw

    cfg = run.config
    pods = run.pod_names
    metrics = analysis.run_metrics(run.records, run.t0, cfg.duration, pods, run.bad_pod)
    totals = metrics.pod_totals
    good = [p for p in pods if p != run.bad_pod]
    bad_less = all(totals.get(run.bad_pod, 0) < totals.get(p, 0) for p in good)
    final = _final_states(run)
    wins = analysis.windows(run.records, run.t0, 1.0, cfg.duration)
    share_times = [w.start + w.width for w in wins]
    shares = {p: analysis.share_series(wins, p) for p in pods}
    state_times, regrets, gaps = _state_series(run)
    # The plot stops with the load (the summary also reads one state after it ended).
    shown = sum(1 for t in state_times if t <= cfg.duration + 0.5)
    following = {sid: [(t, on) for t, on in points if t <= cfg.duration + 0.5]
                 for sid, points in following_series(run).items()}
    cfg.out.mkdir(parents=True, exist_ok=True)
    coordination = ("sidecars follow the CE signaler" if run.signaling
                    else "sidecars learn alone")
    png = plot_demo(
        cfg.out / "equilibrium-demo.png", share_times, shares, [run.bad_pod],
        state_times[:shown], {p: v[:shown] for p, v in regrets.items()},
        {s: v[:shown] for s, v in gaps.items()},
        title=(f"equilibrium demo: {cfg.clients} clients × {cfg.rate:g} req/s, "
               f"policy {cfg.policy}, {coordination}, {run.bad_pod} bad"),
        following=following if run.signaling else None,
    )
    summary: dict[str, Any] = {
        "config": {
            "pods": cfg.pods, "bad_pod": run.bad_pod, "bad_delay": cfg.bad_delay,
            "bad_fraction": cfg.bad_fraction, "clients": cfg.clients, "rate": cfg.rate,
            "duration": cfg.duration, "policy": cfg.policy, "strategy": cfg.strategy,
            "seed": cfg.seed, "signaler": run.signaling,
        },
        "metrics": metrics.as_dict(),
        "bad_pod_less_than_each_good_pod": bad_less,
        "sidecars": {
            sid: {"converged": bool(up.get("converged")),
                  "following": bool(up.get("following")),
                  "nash_gap": float(up.get("nash_gap", math.nan)),
                  "flapping": float(up.get("flapping", math.nan)),
                  "weights": {run.pod_of_endpoint(str(ep.get("endpoint"))):
                              float(ep.get("weight", math.nan))
                              for ep in up.get("endpoints", [])}}
            for sid, up in final.items()
        },
        "load": {client: _load_summary(s) for client, s in run.load.items()},
        "phases": {phase.name: phase.summary(run) for phase in phases},
        "plot": str(png),
        "logs": str(run.logs),
        "cpu_pressure": run.cpu_pressure,
    }
    path = cfg.out / "equilibrium-demo.json"
    path.write_text(json.dumps(json_safe(summary), indent=2, default=str, allow_nan=False)
                    + "\n")
    summary["json"] = str(path)
    return summary


def _load_summary(s: LoadSummary | None) -> dict[str, Any] | None:
    if s is None:
        return None
    return {"planned": s.planned, "sent": s.sent, "errors": s.errors,
            "delayed_by_cap": s.delayed_by_cap, "late_starts": s.late_starts,
            "max_start_lag": s.max_start_lag}


def _pp(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.1f} pp"


def print_summary(summary: dict[str, Any], stream: TextIO) -> None:
    cfg = summary["config"]
    m = summary["metrics"]
    bad = cfg["bad_pod"]
    lat, steady = m["latency"], m["steady_latency"]
    shift = m["time_to_shift"]
    shift_text = "never (still at or above 5 % at the end)" if shift is None else f"{shift:.0f} s"
    lines = [
        "",
        f"summary: {cfg['clients']} clients × {cfg['rate']:g} req/s for {cfg['duration']:g} s,"
        f" policy {cfg['policy']}, "
        + ("sidecars coordinated by the signaler" if cfg.get("signaler")
           else "no signaler (each sidecar learns alone)" if cfg["policy"] == FOLLOWING_POLICY
           else "no signaler"),
        f"  requests {m['requests']}, errors {m['errors']}",
        f"  share sent to the bad pod {bad}: first 5 s {fmt_pct(m['bad_share_first'])}"
        f" -> second half {fmt_pct(m['bad_share_steady'])} (whole run"
        f" {fmt_pct(m['bad_share'])})",
        f"  time until its share stayed under 5 %: {shift_text}",
        f"  latency, whole run:   mean {fmt_ms(lat['mean'])}  p50 {fmt_ms(lat['p50'])}"
        f"  p99 {fmt_ms(lat['p99'])}  p99.9 {fmt_ms(lat['p99.9'])}",
        f"  latency, second half: mean {fmt_ms(steady['mean'])}  p50 {fmt_ms(steady['p50'])}"
        f"  p99 {fmt_ms(steady['p99'])}  p99.9 {fmt_ms(steady['p99.9'])}",
        f"  flapping (largest share change between {m['flap_window']:g} s windows, second"
        f" half): {_pp(m['flapping_pp'])} (sampling noise alone: ~"
        f"{_pp(m['flapping_noise_pp'])} at 1 sigma)",
        "  requests per pod: " + ", ".join(
            f"{p} {n}" for p, n in sorted(m["pod_totals"].items())),
        f"  the bad pod got less traffic than each good pod: "
        f"{'yes' if summary['bad_pod_less_than_each_good_pod'] else 'NO'}",
    ]
    for sid, s in summary["sidecars"].items():
        weights = " ".join(f"{p}={w:.2f}" for p, w in sorted(s["weights"].items()))
        source = ""
        if cfg.get("signaler"):
            source = ("follows the signaler, " if s.get("following")
                      else "local regret matching (fallback), ") + "own learner "
        lines.append(
            f"  {sid}: {source}{'converged' if s['converged'] else 'not converged'},"
            f" Nash gap {s['nash_gap']:.4f}, flapping {s['flapping']:.3f}, weights {weights}"
        )
    for name, entries in summary["phases"].items():
        for key, value in entries.items():
            if isinstance(value, dict | list):
                continue  # detail for the JSON record
            shown = fmt_pct(value) if "share" in key and isinstance(value, float) else value
            lines.append(f"  {name}: {key}: {shown}")
    pressure = summary.get("cpu_pressure")
    if isinstance(pressure, float) and pressure > 0.3:
        lines.append(f"  note: during the run some task waited for a CPU {pressure:.0%} of the"
                     " time (Linux PSI); other work on this machine is in these latencies")
    lines.append(f"  plot: {summary['plot']}   summary: {summary['json']}")
    stream.write("\n".join(lines) + "\n")
    stream.flush()

