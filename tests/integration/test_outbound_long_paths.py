"""An upstream's declared long requests (``long_paths``), through a real sidecar process to
three real pods: a long poll's length is not learned of the pod that answered it.

Beside each other, one sidecar whose config file declares ``/watch`` long for the upstream
and one that does not; each gets one 2.5-s long poll and quick requests around it. The
undeclared poll, the only long answer anywhere, is learned after the 5 s a first long answer
is held (docs/routing.md, "Long polls"): its pod's latency estimate jumps a hundredfold
(0.12 s against the others' 0.5 ms when measured) and its weight falls. The declared one
leaves the estimate at the pods' millisecond."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.integration.procs import (
    SidecarProcess,
    async_start_sidecar,
    async_stop,
    start_backend,
)

POLL = 2.5  # seconds a long poll is held
QUICK_RATE = 40.0  # quick requests a second, around the poll
AFTER = 5.7  # seconds of quick requests after the poll's answer: just past the 5-s hold


def _watch_route(name: str) -> web.RouteDef:
    async def watch(request: web.Request) -> web.Response:
        await asyncio.sleep(POLL)
        return web.Response(text="event", headers={"X-Backend": name})
    return web.get("/watch/pods", watch)


async def _drive(sidecar: SidecarProcess
                 ) -> tuple[str, dict[str, float], dict[str, float], int]:
    """One long poll and quick requests around it, until ``AFTER`` s after its answer (at
    most 20 s); the pod that answered the poll, each endpoint's latency estimate and
    weight then, and the declared long requests ``/debug/state`` showed waiting 1.5 s into
    the poll."""
    url = sidecar.outbound_url
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(headers={"Host": "svc"}) as client:
        async def poll() -> tuple[str, float]:
            async with client.get(f"{url}/watch/pods") as resp:
                assert resp.status == 200 and await resp.text() == "event"
                return resp.headers["X-Backend"], loop.time()

        async def quick() -> None:
            async with client.get(f"{url}/quick") as resp:
                assert resp.status == 200
                await resp.read()

        polled = asyncio.create_task(poll())
        start = loop.time()
        stop, waiting = start + 20.0, None
        while loop.time() < stop:
            await asyncio.gather(quick(), asyncio.sleep(1.0 / QUICK_RATE))
            if waiting is None and loop.time() > start + 1.5:  # a tick since it was sent
                views = (await asyncio.to_thread(sidecar.state))["upstreams"]["svc"]
                waiting = sum(v["long_in_flight"] for v in views["endpoints"])
            if polled.done():
                stop = min(stop, polled.result()[1] + AFTER)
        pod, _ = await polled
    views = sidecar.state()["upstreams"]["svc"]["endpoints"]
    return (pod, {v["endpoint"]: v["latency_estimate"] for v in views},
            {v["endpoint"]: v["weight"] for v in views}, waiting or 0)


async def test_a_declared_long_poll_is_not_learned_of_its_pod(tmp_path: Path) -> None:
    pods = [await start_backend(f"pod-{i}", routes=(_watch_route(f"pod-{i}"),))
            for i in range(3)]
    sidecars: list[SidecarProcess] = []
    try:
        urls = ", ".join(pod.url for pod in pods)
        declared = tmp_path / "declared.yaml"
        declared.write_text(f"upstreams:\n  svc:\n    endpoints: [{urls}]\n"
                            "    long_paths: [/watch]\n")
        plain = tmp_path / "plain.yaml"
        plain.write_text(f"upstreams:\n  svc: [{urls}]\n")
        for path, name in ((declared, "declared"), (plain, "plain")):
            sidecars.append(await async_start_sidecar(config_file=path, sidecar_id=name))
        (_, est_d, w_d, waiting_d), (pod_p, est_p, w_p, waiting_p) = await asyncio.gather(
            _drive(sidecars[0]), _drive(sidecars[1]))
    finally:
        for sidecar in sidecars:
            await async_stop(sidecar)
        for pod in pods:
            await pod.stop()
    polled = {pod.name: pod.url for pod in pods}[pod_p]
    # undeclared: learned once held 5 s (measured: 0.12 s, against 0.5 ms for the others),
    # and its pod is losing its weight to the others: below the quickest one's (not below
    # each other's: in a loaded run one quick pod blipped to 10 ms and sat at the floor for
    # a few ticks, 2026-12-07)
    assert est_p[polled] > 0.06, (est_p, w_p)
    assert w_p[polled] < max(w for e, w in w_p.items() if e != polled), (est_p, w_p)
    # declared: shown waiting apart from the in-flight requests; every pod as quick as
    # before (weights not asserted: on a loaded machine a millisecond's difference moves
    # them, as it did in a CI run of the gRPC twin of this test)
    assert (waiting_d, waiting_p) == (1, 0)
    assert max(est_d.values()) < 0.05, (est_d, w_d)
