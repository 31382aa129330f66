"""What a listener hands a proxy: one HTTP/1.1 request and the way to answer it.

Owns the neutral request/response seam between a listener's connection handling and the
request paths (:mod:`sidecar.outbound`, :mod:`sidecar.inbound`), so each is written once for
both servers of HTTP/1.1: the sidecar's own (:mod:`sidecar.http1.server`, on every listener)
and aiohttp's (:class:`AiohttpExchange`: the WebSocket upgrades the sidecar's server hands
over, and in-process use through ``make_app``).

An :class:`Exchange` is the request (method, target as received, headers in a
``CIMultiDict``, the peer's address, scheme, a streamed body with ``readany()``) and its
response, written once: either :meth:`Exchange.answer` with a whole small :class:`Answer`
(the sidecar's own JSON errors), or :meth:`Exchange.start_response`, :meth:`Exchange.write`
per chunk, :meth:`Exchange.finish`. A write to an app that hung up raises
``ConnectionResetError``; :meth:`Exchange.client_gone` says whether it did. A chunked request
body's trailer fields, once it has ended, are the body's ``trailers`` where the listener keeps
them (the sidecar's own server does; aiohttp's does not), and :meth:`Exchange.finish` may end
the answer with trailer fields.

Nothing here routes or forwards; it only carries bytes and headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.forward import BodyReader
from wire.signals import normal_ip

JSON_TYPE = "application/json; charset=utf-8"
TEXT_TYPE = "text/plain; charset=utf-8"


def socket_ip(transport: object, which: str) -> str:
    """The IP address of a transport's ``"sockname"`` or ``"peername"``, as
    :func:`wire.signals.normal_ip` writes it; "" when it has none (closed, not a socket)."""
    get = getattr(transport, "get_extra_info", None)
    if get is None:
        return ""
    try:
        address = get(which)
    except Exception:  # a closed transport's socket
        return ""
    return normal_ip(address[0]) if isinstance(address, tuple) and address else ""


class SocketIps:
    """A connection's addresses (:func:`socket_ip`), each read from its socket once, on first
    use: ``"sockname"`` (where it was reached) or ``"peername"`` (whom it talks to)."""

    __slots__ = ("_ips",)

    def __init__(self) -> None:
        self._ips: dict[str, str] = {}

    def of(self, transport: object, which: str) -> str:
        ip = self._ips.get(which)
        if ip is None:
            ip = self._ips[which] = socket_ip(transport, which)
        return ip


@dataclass(slots=True)
class Answer:
    """A whole response the sidecar writes itself (an error, an early answer of a phase)."""

    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str = JSON_TYPE


def json_answer(status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None
                ) -> Answer:
    """A JSON :class:`Answer` (the body encoded as aiohttp's ``json_response`` does)."""
    return Answer(status, json.dumps(body).encode(), headers or {})


def web_response(answer: Answer) -> web.Response:
    """``answer`` as aiohttp's response (for a handler of aiohttp's server)."""
    headers = CIMultiDict(answer.headers)
    headers["Content-Type"] = answer.content_type
    return web.Response(status=answer.status, body=answer.body, headers=headers)


class ReceivedBody(BodyReader, Protocol):
    """A request body as a listener receives it (aiohttp's ``StreamReader``, the sidecar's
    own :class:`sidecar.http1.server.RequestBody`)."""

    def at_eof(self) -> bool:
        """The body has ended and all of it was read."""
        ...


class RequestHead(Protocol):
    """What the phases may read of a request (``web.Request`` is one too)."""

    @property
    def method(self) -> str: ...

    @property
    def raw_path(self) -> str: ...

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...


class Exchange(RequestHead, Protocol):
    """One request as a listener received it, and its response (see the module docstring).

    The attribute names are aiohttp's (``raw_path``, ``remote``, ``body_exists``,
    ``content``, ``transport``), so helpers written for a ``web.Request`` read either.
    """

    @property
    def remote(self) -> str | None: ...

    @property
    def scheme(self) -> str: ...

    @property
    def body_exists(self) -> bool: ...

    @property
    def content(self) -> ReceivedBody: ...

    @property
    def transport(self) -> asyncio.BaseTransport | None: ...

    def client_gone(self) -> bool:
        """Whether the app's connection is closed (or closing after a failed write)."""
        ...

    def local_ip(self) -> str:
        """The address the client reached this listener at (:func:`socket_ip`; "" unknown)."""
        ...

    def abort(self) -> None:
        """Cut the app's connection (a body that broke off half-way)."""
        ...

    def reader_moving(self) -> bool:
        """While a write of the answer waits: whether the reader took enough of it since the
        wait began or since last asked to count as a slow reader, not a stalled one (the
        listener's floor: ``sidecar.http1.server.READER_MIN_TAKEN``)."""
        ...

    def head_unsent(self) -> bool:
        """Whether a response was begun (:meth:`start_response`) and nothing of it has been
        written yet: :meth:`answer` may still replace it (an upstream's answer that broke
        off before its first byte could be relayed)."""
        ...

    async def answer(self, answer: Answer) -> None:
        """Send a whole small response (head and body in one write), also in place of one
        begun and not sent yet (:meth:`head_unsent`)."""
        ...

    async def refuse_body(self, answer: Answer | None) -> None:
        """Send ``answer`` (if any, and if the app is still there), then close the connection
        without reading the rest of the request body (a body that came too slowly)."""
        ...

    async def start_response(self, status: int, reason: str | None,
                             headers: CIMultiDict[str]) -> None:
        """Begin a streamed response; the head may wait for the first chunk to share a write."""
        ...

    async def write(self, data: bytes) -> None:
        """Send one chunk of the body (waits while the app's socket buffer is full)."""
        ...

    async def finish(self, trailers: list[tuple[str, str]] | None = None) -> None:
        """End the body; ``trailers``: a trailer section to end it with, where the framing
        can carry one (a chunked HTTP/1.1 body), else dropped."""
        ...


class AiohttpExchange:
    """An :class:`Exchange` over aiohttp's ``web.Request``; :attr:`response` is what the
    aiohttp handler returns once the exchange is done. Every answer closes the connection
    (the listener hands aiohttp only upgrades; a WebSocket that is accepted is not an
    answer of this exchange)."""

    __slots__ = ("request", "response")

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    @property
    def method(self) -> str:
        return self.request.method

    @property
    def raw_path(self) -> str:
        return self.request.raw_path

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self.request.headers

    @property
    def remote(self) -> str | None:
        return self.request.remote

    @property
    def scheme(self) -> str:
        return self.request.scheme

    @property
    def body_exists(self) -> bool:
        return self.request.body_exists

    @property
    def content(self) -> ReceivedBody:
        return self.request.content

    @property
    def transport(self) -> asyncio.BaseTransport | None:
        return self.request.transport

    def client_gone(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    def abort(self) -> None:
        transport = self.request.transport
        if transport is not None:
            transport.abort()

    def reader_moving(self) -> bool:
        return False  # aiohttp's writer does not say (it serves only failed upgrades here)

    def head_unsent(self) -> bool:
        return False  # aiohttp writes the head as the response is prepared

    def local_ip(self) -> str:
        return socket_ip(self.request.transport, "sockname")

    async def answer(self, answer: Answer) -> None:
        response = self.response = web_response(answer)
        response.force_close()  # see start_response

    async def refuse_body(self, answer: Answer | None) -> None:
        response = self.response = web.Response(status=answer.status if answer else 400)
        response.force_close()
        request = self.request
        with contextlib.suppress(ConnectionError, RuntimeError):
            if answer is not None and not self.client_gone():
                response = self.response = web_response(answer)
                response.force_close()
                await response.prepare(request)
                await response.write_eof()
        protocol = request.protocol
        if hasattr(protocol, "force_close"):  # no lingering read of the rest of the body
            protocol.force_close()

    async def start_response(self, status: int, reason: str | None,
                             headers: CIMultiDict[str]) -> None:
        response = self.response = web.StreamResponse(status=status, reason=reason,
                                                      headers=headers)
        # The listener hands aiohttp only upgrade requests; aiohttp's protocol has neither
        # the listener's header timeout nor its idle timeout, so a connection whose upgrade
        # did not happen ends with this answer instead of staying open on aiohttp's terms
        # (a slow-loris way around both timeouts otherwise).
        response.force_close()
        await response.prepare(self.request)

    async def write(self, data: bytes) -> None:
        assert self.response is not None
        await self.response.write(data)

    async def finish(self, trailers: list[tuple[str, str]] | None = None) -> None:
        # aiohttp writes no trailer section: ``trailers`` are dropped (this exchange serves
        # only what the sidecar's own server hands over, and in-process use)
        assert self.response is not None
        await self.response.write_eof()


def body_failed(exchange: Exchange) -> bool:
    """Whether the request's body is already known not to arrive whole (it broke its
    chunked framing, or the app left mid-body): then no attempt should carry it anywhere."""
    return bool(getattr(exchange.content, "failed", False))
