"""A rogue caller floods with retries: it is punished, the cooperative callers do not notice,
and it is forgiven once it behaves (real sidecar processes, a capacity-limited app)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from equilibrium.lab.bench.policing import Shot, open_loop, run_load
from mesh.reputation import LadderRules, PolicingParams, ReputationBook
from tests.integration.inbound_support import (
    MESH_KEY,
    UPSTREAM,
    AppProcess,
    mesh,
    p99,
    shots_of,
    signed_identity,
    success_ratio,
    write_config,
)
from tests.integration.procs import LOOPBACK, async_start_sidecar, free_port, start_backend
from wire.standing import parse_standing

SERVERS, SERVICE = 8, 0.2  # the app: 8 at once, 200 ms each -> 40 requests/s
COOP_RATE = 5.0  # each cooperative caller, well under its fair share (~13/s)
ROGUE_RATE = 133.0  # ten times the fair share of three callers, plus retries
LADDER = {"base_punishment": 2, "max_punishment": 3, "probation": 1.5}
POLICING = {"ladder": LADDER, "max_wait": 3,
            "auction": {"budget_rate": 3, "budget_cap": 3}}


def detection_bound() -> float:
    """How long a flood may go unpunished: the book's own detection lag, doubled, plus a
    second for the flood's process to reach its rate on a loaded 2-core machine."""
    ladder = LadderRules(base_punishment=LADDER["base_punishment"],
                         max_punishment=LADDER["max_punishment"], probation=LADDER["probation"])
    book = ReputationBook(PolicingParams(ladder=ladder))
    return 2 * book.detection_lag() + 1.0


@pytest.mark.slow
async def test_rogue_is_throttled_cooperators_unharmed_and_rogue_forgiven(tmp_path: Path) -> None:
    app = await AppProcess.start(SERVERS, SERVICE)
    config = write_config(tmp_path / "policing.json", POLICING)
    try:
        async with mesh(app.url, ["coop-a", "coop-b", "rogue"], config) as m, \
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            urls = {name: proc.outbound_url for name, proc in m.callers.items()}

            async def coop(duration: float) -> list[Shot]:
                return await shots_of(*(
                    open_loop(session, urls[name], caller=name, rate=COOP_RATE,
                              duration=duration, host=UPSTREAM)
                    for name in ("coop-a", "coop-b")))

            async def level() -> float:
                return await asyncio.to_thread(m.level, "rogue")

            # warm-up: the concurrency limiter measures the app (minRTT probe, first windows)
            await coop(1.5)
            baseline = await coop(3.0)

            during, rogue = await asyncio.gather(
                coop(5.0),
                run_load(urls["rogue"], "rogue", ROGUE_RATE, 4.0, tmp_path, retries=2,
                         host=UPSTREAM))
            level_after_flood = await level()
            throttled = await asyncio.to_thread(
                m.server.metric, "equilibrium_inbound_requests_total", caller="rogue",
                outcome="throttled")
            backed_off = await asyncio.to_thread(
                m.callers["rogue"].metric, "equilibrium_caller_backoff_total")

            # the rogue returns to a normal rate: it must be forgiven within its punishment
            # time (the rest of its punishment plus one probation period per level)
            forgiven_within = LADDER["max_punishment"] + level_after_flood * LADDER["probation"]
            after, calm = await asyncio.gather(
                open_loop(session, urls["rogue"], caller="rogue", rate=5.0,
                          duration=forgiven_within + 1.5, host=UPSTREAM),
                coop(forgiven_within + 1.5))
            final_level = await level()
    finally:
        await app.stop()

    flood_start = min(s.intended for s in rogue)  # its process starts when it can
    first_429 = min((s.intended + s.latency - flood_start for s in rogue if s.status == 429),
                    default=None)
    story = (f"first 429 after {first_429}s, level {level_after_flood} -> {final_level}, "
             f"throttled {throttled}, backed off {backed_off}; coop p99 baseline "
             f"{p99(baseline):.3f}s, under the flood {p99(during):.3f}s; statuses "
             f"{sorted((s.status for s in during + calm), reverse=True)[:5]}")
    # the rogue is throttled: 429s at the inbound side, a punishment level, and its own
    # sidecar backs off locally, within the book's detection lag
    assert first_429 is not None and first_429 <= detection_bound(), story
    assert throttled > 0 and level_after_flood >= 1 and backed_off > 0, story
    # the cooperative callers keep >= 99.9 % success and a p99 close to their baseline
    assert success_ratio(baseline) == 1.0, story
    assert success_ratio(during + calm) >= 0.999, story
    assert p99(during) <= 4.0 * p99(baseline), story
    # forgiven: level back to 0 and the rogue's requests admitted again
    assert final_level == 0, story
    calm_start = min(s.intended for s in after)
    late = [s for s in after if s.intended - calm_start >= forgiven_within]
    assert late and all(s.status == 200 for s in late), story


async def test_a_punished_callers_admitted_answers_carry_the_time_left(tmp_path: Path) -> None:
    """Issue 14, #13: while punished, the requests the throttle lets through came back with
    ``retry=1`` although seconds of punishment were left. A flood of signed requests straight
    at the inbound sidecar (no caller sidecar to back off), then one request a second later."""
    app = await start_backend("slow-app", latency=0.1)
    config = write_config(tmp_path / "policing.json", {
        "max_wait": 1, "ladder": {"base_punishment": 10, "max_punishment": 10}})
    port = free_port()
    server = await async_start_sidecar(
        {}, sidecar_id="app-sidecar", config_file=config,
        env={"EQUILIBRIUM_MESH_SECRET": MESH_KEY},
        extra_args=["--inbound", f"{LOOPBACK}:{port}", "--app", app.url])
    url = f"http://{LOOPBACK}:{port}/"

    def signed(caller: str = "flood") -> dict[str, str]:
        headers = {"X-GT-Identity": signed_identity(caller, url)}
        return headers | ({"X-GT-Retry": "1"} if caller == "flood" else {})  # retries, too

    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            async def one(caller: str = "flood") -> tuple[int, str]:
                async with session.get(url, headers=signed(caller)) as resp:
                    await resp.read()
                    return resp.status, resp.headers.get("X-GT-Reputation", "")

            punished_at = None
            for _ in range(40):  # bounded: 40 waves of 30 concurrent requests (a fair share
                # needs a second active caller)
                answers = await asyncio.gather(one("coop"), *(one() for _ in range(30)))
                if any(status == 429 for status, _ in answers):
                    punished_at = time.monotonic()
                    break
            assert punished_at is not None, "the flood was never throttled"
            await asyncio.sleep(1.5)  # the throttle's bucket refills: one request gets through
            admitted = None
            for _ in range(20):
                status, header = await one()
                if status == 200:
                    admitted = header
                    break
                await asyncio.sleep(0.3)
            elapsed = time.monotonic() - punished_at
    finally:
        await asyncio.to_thread(server.stop, 5.0)
        server.cleanup()
        await app.stop()
    assert admitted is not None and "phase=punished" in admitted, admitted
    retry = parse_standing(admitted).retry_after
    assert retry is not None and retry >= 10 - elapsed - 1, (admitted, elapsed)
    assert retry > 1, admitted
