"""Contenders that are not a plain ``--policy``: the mesh case, hedging and the oracle.

Owns the pseudo-policies the ``slow-pod`` and ``recovery`` scenarios accept beside the real
policy names, in two groups, each with its own references:

With the pods behind inbound sidecars (the mesh case: every request crosses a second proxy):

- ``equilibrium+probes`` — every pod behind its own inbound sidecar (``mode: off`` policing,
  the idle check on ``/``), the client sidecars and the inbound ones sharing a mesh key, so the
  clients probe the pods (docs/protocol.md, "Probes") and route with ``equilibrium``;
- ``peak-ewma+sidecars`` — Linkerd's balancer in front of the same inbound sidecars (it
  ignores probes): the like-for-like baseline of the mesh case;
- ``oracle+sidecars`` — ``equilibrium`` given only the good pods, each behind its inbound
  sidecar as in ``equilibrium+probes``: the like-for-like reference (the same extra hop);
- ``equilibrium-ce+probes`` — ``equilibrium+probes`` with the client sidecars following a
  signaler (the caller starts it, :data:`SIGNALED`): the whole mesh as deployed.

With the pods reached directly (nothing answers a probe):

- ``equilibrium+hedging`` — ``equilibrium`` with hedged exploration on (``EQUILIBRIUM_HEDGE``,
  docs/routing.md "Hedged exploration"); beside it the plain ``peak-ewma`` and ``equilibrium``;
- ``oracle`` — ``equilibrium`` given only the good pods: what routing could do if it knew.

:func:`setup` starts what a contender needs and says how to reach the pods; the caller stops
the returned inbound sidecars. It never decides how a sidecar routes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from equilibrium.lab.bench.scenarios import BenchContext
from equilibrium.lab.processes import free_port
from equilibrium.lab.sidecars import Sidecar
from equilibrium.lab.signaling_plane import SignalingPlane

PROBES = "equilibrium+probes"
CE_PROBES = "equilibrium-ce+probes"
ORACLE = "oracle"
MESH_ORACLE = "oracle+sidecars"
MESH_PEAK = "peak-ewma+sidecars"
HEDGING = "equilibrium+hedging"
PSEUDO = (PROBES, ORACLE, MESH_ORACLE, MESH_PEAK, HEDGING, CE_PROBES)
MESH_GROUP = (PROBES, MESH_PEAK, MESH_ORACLE, CE_PROBES)
"""The contenders whose pods are behind inbound sidecars."""
SIGNALED = (CE_PROBES,)
"""The contenders whose client sidecars follow a signaler (its plane keyed with
:data:`MESH_KEY`, so that the probes and the signals share the mesh key)."""
DIRECT_GROUP = (HEDGING, "equilibrium", "peak-ewma", ORACLE)
"""The contenders that reach the pods directly."""
MESH_KEY = "bench-mesh-key-for-probes-0123456789abcdef"


def client_id(contender: str, index: int) -> str:
    """A client sidecar's id (an identity must match ``[A-Za-z0-9._:-]``: no ``+``)."""
    return f"{contender.replace('+', '-')}-{index + 1}"


async def setup(ctx: BenchContext, contender: str, pod_urls: Sequence[str],
                bad: Sequence[int], plane: SignalingPlane | None = None,
                ) -> tuple[str, list[str], list[Sidecar], dict[str, str] | None]:
    """(the policy the client sidecars run, the URLs they route to, the inbound sidecars to
    stop afterwards, the environment of the client sidecars). A contender of
    :data:`SIGNALED` joins ``plane`` (ValueError without one)."""
    if contender in SIGNALED and plane is None:
        raise ValueError(f"{contender} needs a signaling plane (keyed with mesh_pods.MESH_KEY)")
    if contender == ORACLE:
        return "equilibrium", [u for i, u in enumerate(pod_urls) if i not in bad], [], None
    if contender == HEDGING:
        return "equilibrium", list(pod_urls), [], {"EQUILIBRIUM_HEDGE": "1"}
    if contender not in MESH_GROUP:
        return contender, list(pod_urls), [], None
    if contender == MESH_ORACLE:
        pod_urls = [u for i, u in enumerate(pod_urls) if i not in bad]
    env = {"EQUILIBRIUM_MESH_SECRET": MESH_KEY}
    callers = env  # the client sidecars' environment; the inbound ones never join a plane
    if contender in SIGNALED and plane is not None:
        callers = {**env, **plane.sidecar_env(),
                   "EQUILIBRIUM_SIGNALING_EPOCH": repr(float(plane.epoch))}
        if callers["EQUILIBRIUM_MESH_SECRET"] != MESH_KEY:
            raise ValueError(f"{contender}: the signaling plane must be keyed with MESH_KEY")
    config = ctx.logs / "inbound.json"
    config.write_text(json.dumps({"policing": {"mode": "off", "app_check_path": "/"}}))
    started: list[Sidecar] = []
    urls: list[str] = []
    try:
        for pod_url in pod_urls:
            port = free_port()
            started.append(await Sidecar.start(
                f"pod-{len(started)}-sidecar", {}, extra=["--inbound", f"127.0.0.1:{port}", "--app",
                                               pod_url, "--config", str(config)],
                stderr_path=str(ctx.logs / "inbound.log"), env=env))
            urls.append(f"http://127.0.0.1:{port}")
    except BaseException:
        for s in started:
            await s.stop()
        raise
    return ("peak-ewma" if contender == MESH_PEAK else "equilibrium"), urls, started, callers
