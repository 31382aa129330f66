"""The capacity-limited app of the inbound-side tests, in its own process.

``python -m tests.integration.inbound_loads app SERVERS SERVICE`` serves SERVERS requests at
once, SERVICE seconds each (an M/D/c server), on a free loopback port (prints ``PORT <n>``)
until SIGTERM, at most 10 minutes. In the test's own event loop it would compete for CPU with
the flood it is measured against (the flood itself runs in ``equilibrium.lab.bench.policing
load``), turning the measurement of the cooperative callers into one of the test harness.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Sequence

from aiohttp import web


async def serve_app(servers: int, service: float) -> None:
    slots = asyncio.Semaphore(servers)

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        async with slots:
            await asyncio.sleep(service)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    server = site._server
    assert server is not None
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)  # type: ignore[attr-defined]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        async with asyncio.timeout(600):  # bounded even if nobody stops it
            await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["app"]:
        asyncio.run(serve_app(int(argv[1]), float(argv[2])))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
