"""One caller's backlog does not stand in front of the others' requests (real sidecar process).

The soak's last failure, replayed: a caller that fills the inbound wait queue with a burst made
every other caller's request wait out ``max_wait`` behind it and answer ``503 queue-timeout``
(the queue was one FIFO). With fair queueing among equal bids (:mod:`mesh.auction`) the other
callers' requests are served in turn with the burst, each within a slot or two.

The app serves 2 requests at once, 100 ms each (20/s), the inbound limit is pinned to those 2
slots, and policing is set so that nobody is punished (the punished flush would also clear the
burst and hide what is tested here). The rogue sends 60 requests at once: 3 s of work, more
than ``max_wait`` (2.5 s), so in arrival order its tail times out. Two cooperative callers then
send one request every 200 ms each, well under their share, while the backlog drains.
"""

from __future__ import annotations

import asyncio
import statistics
from pathlib import Path

import aiohttp
import pytest

from equilibrium.lab.bench.policing import Shot, open_loop
from tests.integration.inbound_support import (
    MESH_KEY,
    AppProcess,
    signed_identity,
    write_config,
)
from tests.integration.procs import LOOPBACK, async_start_sidecar, free_port

SERVERS, SERVICE = 2, 0.1
BURST = 60
POLICING = {
    "max_wait": 2.5,
    "concurrency": {"initial_limit": SERVERS, "min_limit": SERVERS, "max_limit": SERVERS,
                    "probe_limit": SERVERS},
    "reputation": {"rate_floor": 10_000, "retry_ratio": 10_000},
    "auction": {"max_queue": 1000},
}


@pytest.mark.slow
async def test_a_burst_waits_behind_itself_and_other_callers_are_served_in_turn(
    tmp_path: Path,
) -> None:
    app = await AppProcess.start(SERVERS, SERVICE)
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    sidecar = await async_start_sidecar(
        {}, sidecar_id="app-sidecar", config_file=write_config(tmp_path / "p.json", POLICING),
        env={"EQUILIBRIUM_MESH_SECRET": MESH_KEY},
        extra_args=["--inbound", f"{LOOPBACK}:{port}", "--app", app.url])
    host = f"{LOOPBACK}:{port}"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            def identity(caller: str) -> dict[str, str]:
                return {"X-GT-Identity": signed_identity(caller, url + "/", host=host)}

            # warm-up: the app is reached and answers
            warm = await open_loop(session, url, caller="coop-a", rate=5, duration=0.4,
                                   host=host, headers=lambda: identity("coop-a"))
            assert all(s.ok for s in warm), warm

            async def coop(name: str) -> list[Shot]:
                await asyncio.sleep(0.3)  # the burst is queued first
                return await open_loop(session, url, caller=name, rate=5, duration=2.0,
                                       host=host, headers=lambda: identity(name))

            rogue, coop_a, coop_b = await asyncio.gather(
                open_loop(session, url, caller="rogue", rate=2_000, duration=BURST / 2_000,
                          host=host, headers=lambda: identity("rogue")),
                coop("coop-a"), coop("coop-b"))
            queued_away = await asyncio.to_thread(
                sidecar.metric, "equilibrium_inbound_requests_total", caller="rogue",
                outcome="queue-timeout")
    finally:
        await asyncio.to_thread(sidecar.stop, 5.0)
        sidecar.cleanup()
        await app.stop()

    cooperative = coop_a + coop_b
    assert len(rogue) == BURST and len(cooperative) == 20
    # every cooperative request was served, none timed out behind the burst
    assert all(s.ok for s in cooperative), sorted((s.status, round(s.latency, 2))
                                                  for s in cooperative)
    # the burst is more work than max_wait allows: its own tail paid for it
    assert sum(not s.ok for s in rogue) > 0 and queued_away > 0
    assert {s.status for s in rogue if not s.ok} == {503}
    # and the cooperative callers waited far less than the burst's typical request
    assert statistics.median(s.latency for s in cooperative) < 0.5 * statistics.median(
        s.latency for s in rogue)
