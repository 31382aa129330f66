"""The demo fleet as a real subprocess: pods behave as configured and obey /_control."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from equilibrium.lab.fleet import POD_HEADER, Fleet

BAD_DELAY = 0.02


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    f = await Fleet.start(["--pods", "3", "--bad", "2", "--bad-delay", str(BAD_DELAY),
                           "--bad-fraction", "0.5", "--service-time", "0.001",
                           "--jitter", "0", "--seed", "3"])
    try:
        yield f
    finally:
        await f.stop()
    assert f.child.proc.returncode is not None


async def _hit(session: aiohttp.ClientSession, url: str, n: int, concurrency: int = 20) -> list:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> tuple[int, str, str, float]:
        async with sem:
            started = time.monotonic()
            async with session.get(f"{url}/any/path?i={i}") as resp:
                body = await resp.text()
                return resp.status, body.strip(), resp.headers[POD_HEADER], (
                    time.monotonic() - started)

    return await asyncio.gather(*(one(i) for i in range(n)))


async def test_pods_name_themselves_and_bad_fraction_is_roughly_right(fleet: Fleet) -> None:
    assert [p.name for p in fleet.pods] == ["pod-0", "pod-1", "pod-2"]
    async with aiohttp.ClientSession() as session:
        answers = await _hit(session, fleet.pods[2].url, 400)
        good = await _hit(session, fleet.pods[0].url, 50)
    assert all(status == 200 and body == pod == "pod-2" for status, body, pod, _ in answers)
    assert all(pod == "pod-0" for _, _, pod, _ in good)
    stats = await fleet.stats()
    assert stats[2]["requests"] == 400
    assert 140 <= stats[2]["slow"] <= 260  # 50 % of 400, binomial sigma = 10
    assert stats[0]["slow"] == 0 and stats[0]["requests"] == 50


async def test_control_endpoint_changes_behaviour_and_resets(fleet: Fleet) -> None:
    async with aiohttp.ClientSession() as session:
        await _hit(session, fleet.pods[2].url, 40)
        before = (await fleet.stats())[2]["slow"]
        assert before > 0
        reply = await fleet.control(2, bad=False)
        assert reply["behaviour"]["bad"] is False
        await _hit(session, fleet.pods[2].url, 60)
        assert (await fleet.stats())[2]["slow"] == before  # recovered: nothing slow
        await fleet.control(0, bad=True, bad_fraction=1.0)
        await _hit(session, fleet.pods[0].url, 30)
        assert (await fleet.stats())[0]["slow"] == 30
        await fleet.reset(seed=3)
        assert all(s["requests"] == 0 and s["slow"] == 0 for s in await fleet.stats())
        for bad in ({"bogus": 1}, {"bad_fraction": 2}, {"capacity": 0}, {"bad": "yes"}):
            with pytest.raises(ValueError):
                await fleet.control(1, **bad)
        async with session.post(fleet.pods[1].url + "/_control", data=b"[not json") as resp:
            assert resp.status == 400
            assert "JSON object" in (await resp.json())["error"]


async def test_same_seed_gives_the_same_slow_sequence(fleet: Fleet) -> None:
    counts = []
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            await fleet.reset(seed=11)
            await fleet.control(2, bad=True, bad_fraction=0.5)
            for i in range(30):  # sequential, so the RNG draws happen in one order
                async with session.get(f"{fleet.pods[2].url}/{i}") as resp:
                    await resp.read()
            counts.append((await fleet.stats())[2]["slow"])
    assert counts[0] == counts[1]


async def test_capacity_limited_pod_queues(fleet: Fleet) -> None:
    # Same mean service time (20 ms); one pod serves one request at a time, the other all.
    await fleet.control(0, capacity=1, service_rate=50.0)
    await fleet.control(1, service_time=0.02)
    async with aiohttp.ClientSession() as session:
        limited = await _hit(session, fleet.pods[0].url, 12, concurrency=12)
        unlimited = await _hit(session, fleet.pods[1].url, 12, concurrency=12)
    slowest_limited = max(lat for *_, lat in limited)
    slowest_unlimited = max(lat for *_, lat in unlimited)
    assert slowest_limited > 2 * slowest_unlimited
    stats = await fleet.stats()
    assert stats[0]["queued"] == 0 and stats[0]["in_flight"] == 0
