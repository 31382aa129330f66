"""WebSocket plumbing shared by the sidecar's listeners: spotting an upgrade, bridging frames.

Owns what both listeners (:mod:`sidecar.outbound`, :mod:`sidecar.inbound`) do with a WebSocket
once their own rules let it through: recognising the upgrade (RFC 6455 §4.1), the handshake
headers that belong to one hop (the transport performs its own handshake upstream), accepting
the caller's upgrade with the subprotocol the upstream chose, and pumping frames both ways
until either side closes. It must not route, police or dial: dialing is
:mod:`sidecar.transport`'s, deciding whether to is the listeners'.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.forward import connection_tokens

# the caller's handshake with this hop; the upstream dial makes its own (key, accept, version)
WS_HANDSHAKE_HEADERS = (
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-protocol",
    "sec-websocket-accept",
)

WSLike = web.WebSocketResponse | aiohttp.ClientWebSocketResponse

DEFAULT_MAX_MESSAGE = 1024 * 1024
"""Bytes of one WebSocket message (all its frames), each way (``policing.websocket_max_message``):
a larger one closes that WebSocket with 1009 (RFC 6455 §7.4.1, message too big)."""
DEFAULT_MAX_PER_CALLER = 64
"""WebSockets one caller may hold open through the inbound listener."""


def is_websocket(request: web.BaseRequest) -> bool:
    """A WebSocket upgrade request (RFC 6455 §4.1)."""
    return (
        request.method == "GET"
        and request.headers.get("Upgrade", "").lower() == "websocket"
        and "upgrade" in connection_tokens(request.headers)
    )


def requested_protocols(
    headers: Mapping[str, str] | CIMultiDict[str] | CIMultiDictProxy[str],
) -> list[str]:
    """The subprotocols a caller offers in ``Sec-WebSocket-Protocol``, in its order."""
    offered = headers.get("Sec-WebSocket-Protocol", "")
    return [p.strip() for p in offered.split(",") if p.strip()]


def accept_like(upstream: aiohttp.ClientWebSocketResponse) -> web.WebSocketResponse:
    """The caller's side of a bridge: the subprotocol the upstream chose, no size limit, and
    no automatic close (a close is relayed, not answered here)."""
    return web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (),
        max_msg_size=0,
        autoclose=False,
    )


async def relay_websocket(
    request: web.BaseRequest,
    downstream: web.WebSocketResponse,
    upstream: aiohttp.ClientWebSocketResponse,
) -> web.WebSocketResponse:
    """Accept the caller's upgrade, bridge until either side closes, then close both."""
    try:
        await downstream.prepare(request)
        await bridge_websockets(downstream, upstream)
    finally:
        await upstream.close()
        await downstream.close()
    return downstream


async def bridge_websockets(a: WSLike, b: WSLike) -> None:
    """Copy frames both ways until either side closes, then close the other with its code."""

    async def pump(src: WSLike, dst: WSLike) -> None:
        async for msg in src:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await dst.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            elif msg.type == aiohttp.WSMsgType.CLOSE:
                break
        code = src.close_code or aiohttp.WSCloseCode.OK
        if not dst.closed:
            await dst.close(code=code)

    tasks = [asyncio.ensure_future(pump(a, b)), asyncio.ensure_future(pump(b, a))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, aiohttp.ClientError):
                await task
