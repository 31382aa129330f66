"""The open-loop load generator against a real slow loopback server, and exact percentiles."""

from __future__ import annotations

import asyncio
import json
import math
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from equilibrium.lab.loadgen import (
    LoadSpec,
    Record,
    latency_summary,
    percentile,
    run_open_loop,
)
from equilibrium.lab.processes import free_port

SERVICE = 0.05  # seconds the serial test server spends on each request


@pytest.fixture
async def serial_server() -> AsyncIterator[str]:
    """A server that answers one request at a time, SERVICE seconds each (a single queue)."""
    lock = asyncio.Lock()

    async def handle(_: web.Request) -> web.Response:
        async with lock:
            await asyncio.sleep(SERVICE)
        return web.Response(text="pod-7\n", headers={"X-Equilibrium-Pod": "pod-7"})

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    await web.SockSite(runner, sock).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_schedule_is_open_loop_and_latency_includes_queueing(serial_server: str) -> None:
    rate, n = 100.0, 20
    records: list[Record] = []
    summary = await run_open_loop(
        LoadSpec(target=serial_server, rate=rate, duration=n / rate), records.append
    )
    assert summary.planned == summary.sent == summary.answered == n
    assert summary.errors == 0
    records.sort(key=lambda r: r.seq)
    # Intended starts sit on the fixed schedule, whatever the server does.
    t0 = records[0].intended
    for rec in records:
        assert rec.intended - t0 == pytest.approx(rec.seq / rate, abs=1e-5)
        assert rec.pod == "pod-7" and rec.status == 200
    # Arrivals every 10 ms into a 50 ms serial server: request i can finish no earlier than
    # (i + 1) services after the first arrival, so from its intended start it waited at least
    # (i + 1) * SERVICE - i / rate. A closed-loop client would have reported ~SERVICE each.
    for rec in records:
        floor = (rec.seq + 1) * SERVICE - rec.seq / rate
        assert rec.latency >= floor - 0.002
    assert records[-1].latency > 10 * SERVICE
    # Queueing grows along the schedule.
    assert records[-1].latency > records[n // 2].latency > records[0].latency


async def test_in_flight_cap_is_counted_and_still_measured_from_intended_start(
    serial_server: str,
) -> None:
    records: list[Record] = []
    summary = await run_open_loop(
        LoadSpec(target=serial_server, rate=100.0, duration=0.1, max_in_flight=2),
        records.append,
    )
    assert summary.sent == 10 and summary.errors == 0
    assert summary.delayed_by_cap >= 7  # only the first two (and maybe a third) got a slot
    delayed = [r for r in records if r.delayed]
    assert len(delayed) == summary.delayed_by_cap
    assert max(r.latency for r in delayed) > 5 * SERVICE


async def test_refused_connections_are_errors_with_no_status() -> None:
    records: list[Record] = []
    port = free_port()
    summary = await run_open_loop(
        LoadSpec(target=f"http://127.0.0.1:{port}", rate=50.0, duration=0.1), records.append
    )
    assert summary.errors == len(records) == 5
    assert all(r.status == 0 and r.error and not r.ok for r in records)
    assert sum(summary.error_kinds.values()) == 5


def test_spec_validation_rejects_unbounded_or_bad_values() -> None:
    for bad in (
        LoadSpec(target="http://127.0.0.1:1", rate=0, duration=1),
        LoadSpec(target="http://127.0.0.1:1", rate=10, duration=math.inf),
        LoadSpec(target="http://127.0.0.1:1", rate=10, duration=1, max_in_flight=0),
    ):
        with pytest.raises(ValueError):
            bad.validate()
    assert LoadSpec(target="x", rate=10, duration=2, max_requests=7).planned() == 7


def test_record_json_round_trip() -> None:
    rec = Record("c1", 3, 12.5, 0.25, 200, "pod-1", None, True)
    assert Record.from_json(json.loads(rec.to_json())) == rec


def test_percentiles_are_exact_nearest_rank() -> None:
    samples = list(range(1, 101))  # 1..100
    assert percentile(samples, 50) == 50
    assert percentile(samples, 99) == 99
    assert percentile(samples, 100) == 100
    assert percentile(samples, 1) == 1
    assert percentile(samples, 99.9) == 100
    thousand = [float(x) for x in range(1000, 0, -1)]  # unsorted input
    assert percentile(thousand, 99.9) == 999.0
    assert percentile(thousand, 99) == 990.0
    assert percentile([5.0], 50) == 5.0
    assert percentile([3.0, 1.0], 50) == 1.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(samples, 0)
    summary = latency_summary([1.0, 2.0, 3.0, 4.0])
    assert summary["mean"] == 2.5 and summary["p50"] == 2.0 and summary["max"] == 4.0
