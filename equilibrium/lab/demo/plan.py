"""Which signaling plane and which phases a demo run gets, for the command line and the bench.

Owns turning the demo's options into a :class:`~equilibrium.lab.signaling_plane.SignalingPlan`
(:func:`signaling_for`: a policy that never follows the signaler runs without one) and into the
list of :class:`~equilibrium.lab.demo.run.DemoPhase` (:func:`default_phases`). It starts
nothing itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from equilibrium.lab.demo.run import (
    FOLLOWING_POLICY,
    UPSTREAM,
    DemoConfig,
    DemoPhase,
    RecoveryPhase,
)
from equilibrium.lab.demo.signaling import FollowingPhase, SignalingPhase
from equilibrium.lab.signaling_plane import SignalingPlan, resolve_signaling


def signaling_for(
    config: DemoConfig, *, no_signaler: bool, redis_url: str | None, environ: Mapping[str, str]
) -> SignalingPlan:
    """The plane of a run (SignalingUnavailable when the flags contradict each other)."""
    signaling = resolve_signaling(no_signaler=no_signaler, redis_url=redis_url, environ=environ,
                                  sidecar_args=config.sidecar_args)
    if signaling.mode != "off" and config.policy != FOLLOWING_POLICY:
        signaling = replace(signaling, mode="off", warning=(
            f"policy {config.policy} routes on its own and never follows the signaler; "
            "running without it, as --no-signaler"))
    return signaling


def default_phases(config: DemoConfig, signaling: SignalingPlan | None = None) -> list[DemoPhase]:
    """The phases ``equilibrium demo`` runs (later issues append theirs here).

    ``signaling`` (from :func:`signaling_for`) adds the signaling plane unless its mode is
    ``off``.
    """
    phases: list[DemoPhase] = []
    if signaling is not None and signaling.mode == "sidecars":
        phases.append(FollowingPhase(upstream=UPSTREAM))
    elif signaling is not None and signaling.mode != "off":
        phases.append(SignalingPhase(signaling, upstream=UPSTREAM, tokens=config.tokens))
    if config.recover_at is not None:
        phases.append(RecoveryPhase(config.recover_at))
    return phases
