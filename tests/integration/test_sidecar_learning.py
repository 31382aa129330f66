"""The seed's scenario in miniature: the real sidecar learns to avoid a slow pod."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import aiohttp
import pytest

from sidecar.shifts import DWELL
from tests.integration.procs import async_start_sidecar, async_stop, backends, fetch, start_backend

REQUESTS = 4000  # bounded load: at most this many requests, and at most MAX_SECONDS
MAX_SECONDS = 6.0
LEARNED_AFTER = 3.0  # seconds: answers after this count as "once the policy had time to learn"
CONCURRENCY = 8


async def _answers_after_learning(outbound_url: str, requests: int, seconds: float) -> Counter[str]:
    """Send ``Host: svc`` GETs from CONCURRENCY callers (at most ``requests`` of them, for at
    most ``seconds``); count the pods that answered after LEARNED_AFTER seconds."""
    answers: list[str] = []
    late: Counter[str] = Counter()
    started = time.monotonic()
    async with aiohttp.ClientSession() as client:

        async def caller() -> None:
            while len(answers) < requests and time.monotonic() - started < seconds:
                reply = await fetch(client, "GET", f"{outbound_url}/", headers={"Host": "svc"})
                assert reply.status == 200
                answers.append(reply.body.decode())
                if time.monotonic() - started > LEARNED_AFTER:
                    late[answers[-1]] += 1

        await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))
    return late


@pytest.mark.slow
async def test_slow_pod_receives_clearly_less_traffic_with_the_equilibrium_policy() -> None:
    async with backends(3, prefix="fast", latency=0.005) as fast:
        slow = await start_backend("slow", latency=0.2)
        sidecar = await async_start_sidecar(
            {"svc": [p.url for p in fast] + [slow.url]}, policy="equilibrium"
        )
        try:
            late = await _answers_after_learning(sidecar.outbound_url, REQUESTS, MAX_SECONDS)
            assert sum(late.values()) > 0, "the load did not last past the learning period"
            fast_counts = [late[p.name] for p in fast]
            assert late["slow"] * 3 < min(fast_counts), late
            state = sidecar.state()["upstreams"]["svc"]
            weights = {e["endpoint"]: e["weight"] for e in state["endpoints"]}
            assert all(weights[slow.url] < weights[p.url] for p in fast), weights
            estimates = {e["endpoint"]: e["latency_estimate"] for e in state["endpoints"]}
            assert all(estimates[slow.url] > estimates[p.url] for p in fast), estimates
            # and the sidecar said so, once the share stayed low for DWELL, with why
            # (sidecar.shifts)
            deadline = time.monotonic() + DWELL + 10
            while True:
                shifted = [line for line in sidecar.output().splitlines()
                           if "traffic shifted off" in line]
                if shifted or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            assert len(shifted) == 1 and f"shifted off {slow.url} " in shifted[0], shifted
            assert "INFO sidecar.runner: upstream svc:" in shifted[0]
        finally:
            await async_stop(sidecar)
            await slow.stop()


@pytest.mark.slow
async def test_past_sixteen_pods_the_sampled_pacer_spreads_and_avoids_the_slow_pod() -> None:
    """21 endpoints: the policy paces with mesh.pacing.SampledPacer (O(log k) a request)."""
    async with backends(20, prefix="fast", latency=0.005) as fast:
        slow = await start_backend("slow", latency=0.2)
        sidecar = await async_start_sidecar(
            {"svc": [p.url for p in fast] + [slow.url]}, policy="equilibrium"
        )
        try:
            late = await _answers_after_learning(sidecar.outbound_url, 2 * REQUESTS, 8.0)
            fast_counts = [late[p.name] for p in fast]
            mean = sum(fast_counts) / len(fast_counts)
            assert mean >= 20, f"too little load past the learning period: {late}"
            assert late["slow"] * 3 < mean, late
            # inside the learned shares every fast pod is used, none taking the lion's share
            assert min(fast_counts) > 0 and max(fast_counts) < 3 * mean, late
        finally:
            await async_stop(sidecar)
            await slow.stop()
