"""Processes of the inbound-side tests that must not share the test's event loop.

``python -m tests.integration.inbound_loads app SERVERS SERVICE`` serves a capacity-limited
app on a free loopback port (prints ``PORT <n>``) until SIGTERM.
``python -m tests.integration.inbound_loads flood URL RATE DURATION RETRIES [HEADER=VALUE..]``
sends an open-loop flood (``Host: svc``) where every failed request is retried at once, up to
RETRIES times, and prints one JSON list of ``[intended, latency, status, attempts, price]``.

A flood of hundreds of requests per second, answered in microseconds by a sidecar that backs
off locally, would otherwise starve the test's own loop (and the app in it) of CPU and turn
the measurement of the cooperative callers into a measurement of the test harness.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Sequence

import aiohttp
from aiohttp import web

from tests.integration.inbound_support import Shot, open_loop


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


async def flood(url: str, rate: float, duration: float, retries: int,
                headers: dict[str, str]) -> list[Shot]:
    shots: list[Shot] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await open_loop(session, url, caller="rogue", rate=rate, duration=duration,
                        retries=retries, headers=headers, out=shots)
    return shots


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["app"]:
        asyncio.run(serve_app(int(argv[1]), float(argv[2])))
        return 0
    if argv[:1] == ["flood"]:
        headers = dict(h.split("=", 1) for h in argv[5:])
        shots = asyncio.run(flood(argv[1], float(argv[2]), float(argv[3]), int(argv[4]),
                                  headers))
        json.dump([[s.intended, s.latency, s.status, s.attempts, s.price] for s in shots],
                  sys.stdout)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
