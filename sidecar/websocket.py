"""WebSocket plumbing shared by the sidecar's listeners: spotting an upgrade, bridging frames.

Owns what both listeners (:mod:`sidecar.outbound`, :mod:`sidecar.inbound`) do with a WebSocket
once their own rules let it through: recognising the upgrade (RFC 6455 §4.1), the handshake
headers that belong to one hop (the transport performs its own handshake upstream), accepting
the caller's upgrade with the subprotocol the upstream chose, and pumping frames both ways
until either side closes. It must not route, police or dial: dialing is
:mod:`sidecar.transport`'s, deciding whether to is the listeners'.

Size limits (issue 14, finding 2): every bridged WebSocket accepts messages of at most
``max_message`` bytes (:data:`DEFAULT_MAX_MESSAGE`, 1 MiB) on each side; aiohttp's reader
refuses a larger frame from its length field, before buffering it, and closes that side with
1009 (RFC 6455 §7.4.1); the bridge closes the other side with the same code and counts it in
``equilibrium_websocket_oversized{listener}`` (:func:`oversized_counter`).
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Callable, Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry, Counter

from sidecar.exchange import TEXT_TYPE, Answer
from sidecar.forward import connection_tokens, response_headers_to_app

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


_OVERSIZED: weakref.WeakKeyDictionary[CollectorRegistry, Counter] = weakref.WeakKeyDictionary()


def oversized_counter(registry: CollectorRegistry, listener: str) -> Callable[[], None]:
    """What a bridge calls when a message past the limit closed it (one counter family per
    registry, ``listener`` its label)."""
    counter = _OVERSIZED.get(registry)
    if counter is None:
        counter = _OVERSIZED[registry] = Counter(
            "equilibrium_websocket_oversized", "WebSockets closed with 1009 for a message "
            "past websocket_max_message, by listener", ["listener"], registry=registry)
    child = counter.labels(listener)
    return child.inc


def accept_like(upstream: aiohttp.ClientWebSocketResponse,
                max_message: int = DEFAULT_MAX_MESSAGE) -> web.WebSocketResponse:
    """The caller's side of a bridge: the subprotocol the upstream chose, messages up to
    ``max_message`` bytes, and no automatic close (a close is relayed, not answered here)."""
    return web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (),
        max_msg_size=max_message,
        autoclose=False,
    )


async def relay_websocket(
    request: web.BaseRequest,
    downstream: web.WebSocketResponse,
    upstream: aiohttp.ClientWebSocketResponse,
    on_oversized: Callable[[], None] | None = None,
) -> web.WebSocketResponse:
    """Accept the caller's upgrade, bridge until either side closes, then close both."""
    try:
        await downstream.prepare(request)
        await bridge_websockets(downstream, upstream, on_oversized)
    finally:
        await upstream.close()
        await downstream.close()
    return downstream


async def bridge_websockets(a: WSLike, b: WSLike,
                            on_oversized: Callable[[], None] | None = None) -> None:
    """Copy frames both ways until either side closes, then close the other with its code
    (1009 after a message past a side's limit: ``on_oversized`` is called)."""

    async def pump(src: WSLike, dst: WSLike) -> None:
        too_big = False
        async for msg in src:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await dst.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            elif msg.type == aiohttp.WSMsgType.CLOSE:
                break
            elif msg.type == aiohttp.WSMsgType.ERROR:  # src already closed itself
                too_big = getattr(msg.data, "code", None) == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
                if too_big and on_oversized is not None:
                    on_oversized()
                break
        code = aiohttp.WSCloseCode.MESSAGE_TOO_BIG if too_big else (
            src.close_code or aiohttp.WSCloseCode.OK)
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


def refused_upgrade_answer(
    status: int, headers: Mapping[str, str], body: bytes, via: str
) -> tuple[Answer, dict[str, str]]:
    """An upstream's answer to an upgrade it refused, as it goes back to the caller (nginx,
    HAProxy and Envoy relay it: a 401 with its challenge, a redirect for the client to
    follow), and the ``X-GT-*`` headers taken out of it. Hop-by-hop fields go, ``Via`` gets
    this hop; the length is the body's as relayed."""
    kept, game = response_headers_to_app(CIMultiDictProxy(CIMultiDict(headers)), via)
    content_type = kept.pop("Content-Type", "")
    for name in ("Content-Length", "Transfer-Encoding"):
        kept.popall(name, None)
    return Answer(status, body, kept, content_type or TEXT_TYPE), game
