"""A caller is judged by what it asks of the service, not by where its routing put it: two
callers send the same pod a flood-sized rate, one because its learner put the most it may (the
cap, 80 %) there, its two other endpoints being slow (its sidecar declares three usable
endpoints, ``X-GT-Demand``), the other because that pod is all it has; only the second is
punished (real sidecar processes, a capacity-limited app)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from equilibrium.lab.bench.policing import open_loop
from tests.integration.inbound_support import (
    UPSTREAM,
    AppProcess,
    mesh,
    shots_of,
    write_config,
)
from tests.integration.procs import Backend, backends

SERVERS, SERVICE = 8, 0.2  # the app: 8 at once, 200 ms each -> 40 requests/s
STEADY, HEAVY = 14.0, 36.0  # requests/s: one caller near its share, two at nine tenths of it all
POLICING = {"capacity": SERVERS / SERVICE, "max_wait": 2}
SLOW = 3.0  # s: the latency of spread's two other endpoints (live, never ejected, avoided)


def user_requests(servers: list[Backend]) -> int:
    """Requests the servers got from the load (not the prober's)."""
    return sum(1 for b in servers for r in b.seen if not r.path.startswith("/.well-known/"))


@pytest.mark.slow
async def test_a_caller_concentrated_on_one_pod_is_judged_by_its_demand_on_the_service(
        tmp_path: Path) -> None:
    """Capacity 40/s, three callers: fair share 13.3/s. ``spread``'s learner puts 80 % (the
    cap) of its 36/s on the pod, 28.8/s, and declares 36/s over 3 usable endpoints (12/s even
    spread); ``single`` sends its 36/s there and declares 36/s over 1. The water level of
    40/s over the judged rates (12, 14, 36) is 14/s, the norm 1.5 x 14 = 21/s: ``single`` is
    over it, ``spread`` is not. Judged by their rates at the pod alone, both would be (water
    level 13.3/s, norm 20/s)."""
    app = await AppProcess.start(SERVERS, SERVICE)
    config = write_config(tmp_path / "policing.json", POLICING)
    try:
        async with backends(2, prefix="slow", latency=SLOW) as slow, \
                mesh(app.url, ["spread", "single", "steady"], config,
                     more_endpoints={"spread": [b.url for b in slow]}) as m, \
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            urls = {name: proc.outbound_url for name, proc in m.callers.items()}

            def load(name: str, rate: float, duration: float):  # type: ignore[no-untyped-def]
                return open_loop(session, urls[name], caller=name, rate=rate,
                                 duration=duration, host=UPSTREAM)

            # warm-up: spread's learner finds its two other endpoints slow and ramps the pod
            # up to the cap (weights grow at most 0.1 a second: 1/3 -> 0.8 in about 5 s)
            await shots_of(load("spread", 4.0, 8.0), load("steady", 4.0, 8.0))
            slow_before = user_requests(slow)
            await shots_of(load("spread", HEAVY, 6.0), load("single", HEAVY, 6.0),
                           load("steady", STEADY, 6.0))
            slow_during = user_requests(slow) - slow_before
            levels = {name: await asyncio.to_thread(m.level, name)
                      for name in ("spread", "single", "steady")}
            throttled = {name: await asyncio.to_thread(
                m.server.metric, "equilibrium_inbound_requests_total", caller=name,
                outcome="throttled") for name in ("spread", "single")}
            believed = await asyncio.to_thread(
                m.server.metric, "equilibrium_inbound_demands_total", result="trusted")
            spread_sent = await asyncio.to_thread(
                m.server.metric, "equilibrium_inbound_requests_total", caller="spread")
    finally:
        await app.stop()
    assert believed > 0
    # it did concentrate: most of its flood reached the pod, a little the slow endpoints
    assert spread_sent > 0.6 * HEAVY * 6.0 and 0 < slow_during < 0.35 * HEAVY * 6.0
    assert levels["single"] >= 1 and throttled["single"] > 0
    assert levels["spread"] == 0 and throttled["spread"] == 0
    assert levels["steady"] == 0
