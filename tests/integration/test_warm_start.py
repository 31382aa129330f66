"""A sidecar imports what it needs before it says it is ready.

An import after ``/readyz`` runs on the event loop, in front of the requests of that moment:
the first routing window's ``np.median`` imported ``numpy.ma`` (15 ms here, more on a cold
disk) five seconds after the sidecar started taking traffic. Python's own import log
(``PYTHONPROFILEIMPORTTIME``) of a real sidecar process shows every import and when.
"""

from __future__ import annotations

import asyncio

import aiohttp

from tests.integration.procs import async_start_sidecar, async_stop, start_backend

READY_LINE = " ready: outbound="
WINDOW = 5.0  # mesh.nash.StabilityMonitor.window: its first median comes after it


async def test_nothing_is_imported_once_the_sidecar_is_ready() -> None:
    backend = await start_backend("app")
    sidecar = await async_start_sidecar({"svc": [backend.url]}, sidecar_id="sc-warm",
                                        env={"PYTHONPROFILEIMPORTTIME": "1"})
    try:
        async with aiohttp.ClientSession() as session:
            loop = asyncio.get_running_loop()
            until = loop.time() + WINDOW + 1.5
            while loop.time() < until:  # traffic through the first windows and ticks
                async with session.get(f"{sidecar.outbound_url}/x",
                                       headers={"Host": "svc"}) as answer:
                    assert answer.status == 200
                await asyncio.sleep(0.05)
            for path in ("/metrics", "/debug/state", "/dashboard/frame", "/readyz"):
                async with session.get(f"{sidecar.admin_url}{path}") as answer:
                    assert answer.status == 200, path
    finally:
        assert await async_stop(sidecar) == 0
        await backend.stop()
    output = sidecar.output()
    assert READY_LINE in output, output[-2000:]
    after = output.split(READY_LINE, 1)[1]
    late = [line for line in after.splitlines() if line.startswith("import time:")]
    assert not late, "imported after ready:\n" + "\n".join(late)
