"""The demo's signaling phases: the sidecars follow a correlated-equilibrium signaler.

Owns the demo's view of the signaling plane: :class:`FollowingPhase`, a
:class:`~equilibrium.lab.demo.run.DemoPhase` that shows and summarises which sidecars follow the
signaler (alone when the user wired the sidecars to a plane that runs elsewhere, with
``--sidecar-arg=--redis...`` as ``compose.yaml`` does); and :class:`SignalingPhase`, which also,
before the sidecars start, starts the plane the demo's
:class:`~equilibrium.lab.signaling_plane.SignalingPlan` asks for
(:meth:`~equilibrium.lab.signaling_plane.SignalingPlane.for_plan`: the one launcher of Redis +
signaler, shared with ``equilibrium bench``). Every sidecar gets ``--signaling-epoch`` on its
command line and the secrets (the key, the Redis URL with its password) only in its
environment, as the plane hands them out.

During the load it reads the signaler's ``/debug/state`` once a second (epoch, last plan:
objective, correlated-equilibrium gap, solve time) and each sidecar's ``following`` flag from
the states the demo already polls; after the load it reads the recommendations each sidecar
accepted and rejected from its ``/metrics``. The signaler is a child of the run (reaped with
the others); the plane (Redis last) is stopped in :meth:`SignalingPhase.close`, after every
client of it.

The maths (Hart & Mas-Colell's regret matching in the sidecars, the correlated-equilibrium LP
in the signaler) lives in :mod:`mesh` and :mod:`signaler`; this module only wires processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from equilibrium.lab.demo.run import DemoPhase, DemoRun, following_series
from equilibrium.lab.signaling_plane import SignalingPlan, SignalingPlane

SIGNALER_ID = "demo-signaler"
STATE_TIMEOUT = 2.0
"""Seconds the once-a-second reading of the signaler's ``/debug/state`` may take."""


@dataclass(slots=True)
class SignalerSample:
    """One reading of the signaler's ``/debug/state`` during the load."""

    t: float
    epoch: int
    plan: dict[str, Any] | None
    published: int
    regret_gap: float | None
    leader: bool


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def mean_latency_ms(plan: Mapping[str, Any]) -> float:
    """The plan's objective (expected total latency, token-seconds) per token, in ms."""
    tokens = _float(plan.get("tokens"))
    return 1000.0 * _float(plan.get("objective")) / tokens if tokens > 0 else math.nan


def counter_totals(text: str, name: str, upstream: str | None = None) -> float:
    """The sum of a Prometheus counter's samples (optionally for one upstream) in ``text``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name != name + "_total":
                continue
            if upstream is None or sample.labels.get("upstream") == upstream:
                total += sample.value
    return total


class FollowingPhase(DemoPhase):
    """The sidecars are in a signaling plane: show and summarise who follows the signaler.

    On its own (``--sidecar-arg=--redis=...``: the user wired the sidecars to a plane that runs
    elsewhere, as ``compose.yaml`` does) it starts nothing; :class:`SignalingPhase` adds Redis
    and the signaler.
    """

    name = "signaling"

    def __init__(self, *, upstream: str) -> None:
        self.upstream = upstream
        self.sidecar_counts: dict[str, dict[str, float]] = {}
        self._session: aiohttp.ClientSession | None = None

    async def prepare(self, run: DemoRun) -> None:
        run.signaling = True

    async def finish(self, run: DemoRun) -> None:
        """After the load: each sidecar's accepted and rejected recommendations."""
        texts = await asyncio.gather(*(self._get_text(s.admin_url + "/metrics")
                                       for s in run.sidecars))
        for sidecar, text in zip(run.sidecars, texts, strict=True):
            if text is None:
                continue
            self.sidecar_counts[sidecar.id] = {
                "accepted": counter_totals(
                    text, "equilibrium_signaling_recommendations_accepted", self.upstream),
                "rejected": counter_totals(
                    text, "equilibrium_signaling_recommendations_rejected", self.upstream),
                "fallbacks": counter_totals(text, "equilibrium_signaling_fallbacks"),
            }

    def mode_text(self) -> str:
        return "the sidecars joined the Redis given with --sidecar-arg (signaler elsewhere)"

    def plane_summary(self) -> dict[str, Any]:
        """Summary entries about the plane itself (the signaler), before the sidecars'."""
        return {}

    def summary(self, run: DemoRun) -> dict[str, Any]:
        followed = self.followed_fraction(run)
        first = self.first_following(run)
        out: dict[str, Any] = {"mode": self.mode_text(), **self.plane_summary()}
        for sid in sorted(followed):
            counts = self.sidecar_counts.get(sid, {})
            started = first.get(sid)
            out[f"{sid} followed the signaler"] = (
                f"{followed[sid]:.0%} of the run"
                + ("" if started is None else f" (from t={started:.0f}s)")
                + f", recommendations accepted {counts.get('accepted', math.nan):.0f}"
                + f", rejected {counts.get('rejected', math.nan):.0f}")
        out["following_fraction"] = followed
        return out

    async def close(self, run: DemoRun) -> None:
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
            self._session = None

    def followed_fraction(self, run: DemoRun) -> dict[str, float]:
        """Share of the load's state readings in which each sidecar followed."""
        out = {}
        for sid, points in following_series(run).items():
            during = [f for t, f in points if t <= run.config.duration + 0.5]
            out[sid] = sum(during) / len(during) if during else 0.0
        return out

    def first_following(self, run: DemoRun) -> dict[str, float | None]:
        return {sid: next((t for t, f in points if f), None)
                for sid, points in following_series(run).items()}

    async def _get_text(self, url: str) -> str | None:
        try:
            async with self._client().get(url) as resp:
                return await resp.text() if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError):
            return None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0))
        return self._session


class SignalingPhase(FollowingPhase):
    """Runs the demo's signaling plane (see the module docstring)."""

    def __init__(self, plan: SignalingPlan, *, upstream: str, epoch: float = 1.0,
                 tokens: int = 16) -> None:
        if not plan.starts_a_plane:
            raise ValueError("SignalingPhase needs an embedded or external plan with a key")
        super().__init__(upstream=upstream)
        self.plan = plan
        self.epoch = epoch
        self.tokens = tokens
        self.plane: SignalingPlane | None = None
        self.samples: list[SignalerSample] = []
        self.last_state: dict[str, Any] = {}

    # ---------------------------------------------------------------- DemoPhase hooks

    async def prepare(self, run: DemoRun) -> None:
        await super().prepare(run)
        self.plane = SignalingPlane.for_plan(
            self.plan, run.logs, epoch=self.epoch, tokens=self.tokens, signer=SIGNALER_ID,
            upstreams=[self.upstream])
        await self.plane.start()
        assert self.plane.signaler is not None
        run.children.append(self.plane.signaler)

    def sidecar_args(self, run: DemoRun, sidecar_id: str) -> list[str]:
        return self._plane().sidecar_args()

    def sidecar_env(self, run: DemoRun, sidecar_id: str) -> dict[str, str]:
        return self._plane().sidecar_env()

    async def on_tick(self, run: DemoRun, elapsed: float) -> None:
        body = await self._plane().debug_state(STATE_TIMEOUT)
        if not body:
            return
        self.last_state = body
        up = (body.get("upstreams") or {}).get(self.upstream) or {}
        self.samples.append(SignalerSample(
            t=elapsed, epoch=int(body.get("epoch") or 0), plan=up.get("plan"),
            published=int(up.get("published") or 0),
            regret_gap=up.get("regret_gap"), leader=bool(up.get("leader"))))

    def live_lines(self, run: DemoRun) -> list[str]:
        """One line: the signaler's last plan (who follows it is on each sidecar's row)."""
        head = f"  signaler ({self._where()}):"
        last = self.samples[-1] if self.samples else None
        if last is None or last.plan is None:
            return [f"{head} no plan yet (waiting for the sidecars' first regret summaries)"]
        plan = last.plan
        return [
            f"{head} epoch {self.epochs()}, plan solved in "
            f"{_float(plan.get('solve_seconds')) * 1000:.0f} ms ({plan.get('method')},"
            f" {plan.get('tokens')} tokens), expected mean latency"
            f" {mean_latency_ms(plan):.1f} ms, CE gap {_float(plan.get('ce_gap')) * 1000:.2f} ms,"
            f" {last.published} recommendations sent"]

    def dashboard_url(self, run: DemoRun) -> str | None:
        return f"http://{self.plane.admin}/dashboard" if self.plane is not None else None

    def mode_text(self) -> str:
        return ("embedded Redis + signaler" if self.plan.mode == "embedded"
                else "your Redis + signaler")

    def plane_summary(self) -> dict[str, Any]:
        solves = self._solve_times()
        last = self.samples[-1] if self.samples else None
        plan = (last.plan if last else None) or {}
        return {
            "signaler epochs during the load": self.epochs(),
            "recommendations published": last.published if last else 0,
            "program": (f"{plan.get('method')}, {plan.get('tokens')} tokens × "
                        f"{len(plan.get('endpoints') or [])} endpoints, "
                        f"{plan.get('variables')} variables") if plan else "no plan",
            "solve time (median / max of sampled epochs, ms)": (
                f"{statistics.median(solves) * 1000:.0f} / {max(solves) * 1000:.0f}"
                if solves else "n/a"),
            "last plan: expected mean latency (ms)": round(mean_latency_ms(plan), 1),
            "last plan: CE gap (ms)": round(_float(plan.get("ce_gap")) * 1000, 3),
            "signaler_last_state": self.last_state,
        }

    async def close(self, run: DemoRun) -> None:
        await super().close(run)
        # The signaler is in run.children: the demo has stopped it (and every sidecar) by now.
        if self.plane is not None:
            await self.plane.stop()
            self.plane = None

    # ---------------------------------------------------------------- readings

    def epochs(self) -> int:
        """Signaler epochs seen during the load (its epoch numbers count from the unix epoch)."""
        if not self.samples:
            return 0
        return self.samples[-1].epoch - self.samples[0].epoch + 1

    def _solve_times(self) -> list[float]:
        by_epoch = {s.epoch: _float(s.plan.get("solve_seconds"))
                    for s in self.samples if s.plan is not None}
        return [v for v in by_epoch.values() if math.isfinite(v)]

    def _where(self) -> str:
        return "embedded Redis" if self.plan.mode == "embedded" else "your Redis"

    def _plane(self) -> SignalingPlane:
        if self.plane is None:
            raise RuntimeError("the signaling plane is not started (prepare() runs first)")
        return self.plane
