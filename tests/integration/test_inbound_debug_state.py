"""The admin ``/debug/state`` shows the inbound side's policing: after a rogue caller is
throttled it is listed as punished (with when its punishment ends and its recent 429s), a
cooperative caller in good standing; a sidecar without ``--inbound`` reports ``null``.

Real processes: one inbound sidecar in front of a loopback app, the cooperator behind its own
outbound sidecar, the rogue sending signed requests that all carry a retry mark (over its
retry budget whether or not the app is congested, so the trigger does not depend on timing).
"""

from __future__ import annotations

import asyncio
import math
import time
from datetime import datetime
from pathlib import Path

import aiohttp

from equilibrium.lab.bench.policing import UPSTREAM as LOAD_HOST
from equilibrium.lab.bench.policing import open_loop
from mesh.reputation import PolicingParams
from tests.integration.inbound_support import MESH_KEY, UPSTREAM, signed_identity, write_config
from tests.integration.procs import LOOPBACK, async_start_sidecar, free_port, start_backend
from wire.headers import IDENTITY, RETRY

POLICING = {
    "capacity": 20,  # fair share 10/s each for two callers
    "reputation": {"rate_tau": 0.5, "reputation_tau": 0.5},  # detection within ~1 s
    "ladder": {"base_punishment": 30, "max_punishment": 30},  # still punished when we look
}


async def test_debug_state_shows_the_rogue_punished_and_the_cooperator_in_good_standing(
        tmp_path: Path) -> None:
    app = await start_backend("app")
    config = write_config(tmp_path / "policing.json", POLICING)
    inbound_port = free_port()
    inbound_url = f"http://{LOOPBACK}:{inbound_port}"
    env = {"EQUILIBRIUM_MESH_SECRET": MESH_KEY}
    procs = await asyncio.gather(
        async_start_sidecar({}, sidecar_id="app-sidecar", config_file=config, env=env,
                            extra_args=["--inbound", f"{LOOPBACK}:{inbound_port}",
                                        "--app", app.url]),
        async_start_sidecar({UPSTREAM: [inbound_url]}, sidecar_id="coop", config_file=config,
                            env=env, extra_args=["--max-attempts", "1"]),
        return_exceptions=True)
    started = [p for p in procs if not isinstance(p, BaseException)]
    try:
        server, coop = procs
        assert not isinstance(server, BaseException) and not isinstance(coop, BaseException)
        def rogue_headers() -> dict[str, str]:  # a fresh identity per request
            return {IDENTITY: signed_identity("rogue", inbound_url + "/", host=LOAD_HOST),
                    RETRY: "1"}

        load_start = time.monotonic()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            rogue, honest = await asyncio.gather(
                open_loop(session, inbound_url, caller="rogue", rate=40, duration=2.5,
                          headers=rogue_headers),
                open_loop(session, coop.outbound_url, caller="coop", rate=5, duration=2.5,
                          host=UPSTREAM))
        wall_before = time.time()
        inbound = (await asyncio.to_thread(server.state))["inbound"]
        elapsed = time.monotonic() - load_start  # every request was judged within this
        outbound_only = await asyncio.to_thread(coop.state)
    finally:
        await asyncio.gather(*(asyncio.to_thread(p.stop, 5.0) for p in started))
        for p in started:
            p.cleanup()
        await app.stop()

    refused = sum(s.status == 429 for s in rogue)
    callers = {c["caller"]: c for c in inbound["callers"]}
    story = f"rogue sent {len(rogue)}, 429s {refused}; inbound state {inbound}"
    assert refused > 0 and all(s.status == 200 for s in honest), story
    assert inbound["mode"] == "equilibrium" and inbound["mesh_key"] is True, story
    assert set(callers) == {"rogue", "coop"}, story  # no anonymous caller was seen
    assert inbound["callers"][0]["caller"] == "rogue", story  # busiest first
    assert inbound["callers_tracked"] == 2 and inbound["punished_callers"] == 1, story

    bad = callers["rogue"]
    assert bad["phase"] == "punished" and bad["level"] >= 1, story
    until = datetime.fromisoformat(bad["punished_until"]).timestamp()
    assert wall_before < until <= wall_before + 30 + 1, story
    assert 0 < bad["punished_for"] <= 30, story
    # Recent counts decay with time constant recent_window: a request judged at most
    # ``elapsed`` s before the reading still counts at least ``kept`` (every request judged
    # once; each throttled one answered 429; a few 429s go to requests already queued).
    kept = math.exp(-elapsed / PolicingParams().recent_window)
    judged = bad["recent"]["admitted"] + bad["recent"]["throttled"]
    assert kept * len(rogue) <= judged <= len(rogue), story
    assert 0.8 * kept * refused <= bad["recent"]["throttled"] <= refused, story

    good = callers["coop"]
    assert good["phase"] == "good" and good["level"] == 0, story
    # its sidecar declares its demand (5/s over the one endpoint it has); the rogue's
    # hand-signed requests declare none
    assert good["demand"] is not None and 2.0 < good["demand"] < 8.0, story
    assert bad["demand"] is None, story
    assert good["punished_until"] is None and good["recent"]["throttled"] == 0, story
    assert kept * len(honest) <= good["recent"]["admitted"] <= len(honest), story
    assert good["budget"] is not None and 0 <= good["budget"]["balance"] <= good["budget"]["cap"]

    assert inbound["concurrency"]["limit"] >= 1 and inbound["auction"]["last_price"] == 0, story
    assert inbound["capacity"] == 20 and inbound["fair_share"] == 10, story
    assert "inbound" in outbound_only and outbound_only["inbound"] is None
