"""What the outbound proxy's unit rigs share: endpoints in memory, and the proxy on loopback.

:class:`Network` is a :class:`MemoryTransport` handler whose endpoints answer after set delays
(a delay of an hour stands for a pod that never answers) and which records what reached them;
:func:`serve` puts a real :class:`OutboundProxy` on a loopback port for an aiohttp client.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from sidecar.outbound import OutboundProxy
from sidecar.transport import MemoryResponse, UpstreamRequest


@dataclass
class Network:
    """Each endpoint answers 200 after ``delays[endpoint]`` seconds, naming itself in
    ``X-Backend``; ``seen`` counts (endpoint, method), ``bodies`` keeps the request bodies,
    ``cancelled`` the endpoints whose request was cancelled while it waited."""

    delays: dict[str, float]
    seen: Counter[tuple[str, str]] = field(default_factory=Counter)
    bodies: list[bytes] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)

    async def __call__(self, request: UpstreamRequest) -> MemoryResponse:
        endpoint = f"{request.url.scheme}://{request.url.raw_authority}"
        self.seen[(endpoint, request.method)] += 1
        if request.body is not None:
            self.bodies.append(b"".join([chunk async for chunk in request.body]))
        try:
            await asyncio.sleep(self.delays[endpoint])
        except asyncio.CancelledError:
            self.cancelled.append(endpoint)
            raise
        return MemoryResponse(200, {"X-Backend": endpoint}, endpoint.encode())


async def serve(proxy: OutboundProxy,
                closers: list[Callable[[], Awaitable[object]]]) -> aiohttp.ClientSession:
    """``proxy`` on a loopback port, and a client for it; what to close goes in ``closers``
    (the client first)."""
    runner = web.AppRunner(proxy.make_app(), access_log=None)
    await runner.setup()
    closers.append(runner.cleanup)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}")
    closers.insert(0, client.close)
    return client
