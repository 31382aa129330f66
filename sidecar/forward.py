"""HTTP/1.1 forwarding rules shared by the sidecar's listeners: headers and streamed bodies.

Owns what a proxy must change on the way through (RFC 9110 §7.6): hop-by-hop headers are
removed (§7.6.1: ``Connection`` and every header it names, ``Keep-Alive``,
``Proxy-Connection``, ``TE``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade``, and the
proxy-auth pair meant for this hop), ``Via`` is appended (§7.6.3), ``X-Forwarded-For`` /
``X-Forwarded-Proto`` are appended; every other end-to-end header (``traceparent``,
``Content-Encoding``, cookies, …) passes untouched and in order. Game headers (``X-GT-*``)
are never passed between the app and the network unvalidated: the functions here strip them
and report what they stripped; the caller counts it.

Bodies are relayed chunk by chunk with an idle timeout on each read, so memory stays bounded
by the socket buffers whatever the body size, and no read waits forever. A body is anything
with ``readany()`` (:class:`BodyReader`): aiohttp's own stream, or an in-memory one from
:mod:`sidecar.transport`. Nothing here opens a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Protocol

from aiohttp.web import StreamResponse
from multidict import CIMultiDict, CIMultiDictProxy

from wire.headers import is_gt_header, strip_gt_headers

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
CHUNK_SIZE = 64 * 1024


class BodyReader(Protocol):
    """A body arriving in chunks: ``readany()`` returns what is there, ``b""`` at the end."""

    async def readany(self) -> bytes: ...


def must_be_empty(method: str, status: int) -> bool:
    """HEAD answers and 1xx/204/304 never carry a body (RFC 9110 §6.4.1)."""
    return method == "HEAD" or status in (204, 304) or 100 <= status < 200


def connection_tokens(headers: Mapping[str, str] | CIMultiDictProxy[str]) -> set[str]:
    """Header names listed in ``Connection`` (lower-cased), which are hop-by-hop too."""
    getall = getattr(headers, "getall", None)
    values = getall("Connection", []) if getall else [headers.get("Connection", "")]
    return {t.strip().lower() for v in values for t in v.split(",") if t.strip()}


def has_passed(headers: CIMultiDictProxy[str], via: str) -> bool:
    """Whether this proxy's own ``Via`` entry is already on the request (a forwarding loop)."""
    return any(
        entry.strip() == via for value in headers.getall("Via", []) for entry in value.split(",")
    )


def end_to_end(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    """A copy of ``headers`` without hop-by-hop ones (order and duplicates kept)."""
    drop = HOP_BY_HOP | connection_tokens(headers)
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


def split_game_headers(
    headers: CIMultiDictProxy[str] | CIMultiDict[str],
) -> tuple[CIMultiDict[str], list[tuple[str, str]]]:
    """One pass: (end-to-end headers without ``X-GT-*``, the ``X-GT-*`` pairs lower-cased).

    The same rule as :func:`wire.headers.strip_gt_headers`, without a second walk over the
    headers on the request path.
    """
    drop = HOP_BY_HOP | connection_tokens(headers) if "Connection" in headers else HOP_BY_HOP
    out: CIMultiDict[str] = CIMultiDict()
    game: list[tuple[str, str]] = []
    for key, value in headers.items():
        lower = key.lower()
        if lower in drop:
            continue
        if is_gt_header(lower):  # X_GT_* too: the pair keeps its spelling, so it is never
            game.append((lower, value))  # read as the signal its canonical name carries
        else:
            out.add(key, value)
    return out, game


def strip_game_headers(headers: CIMultiDict[str]) -> list[str]:
    """Remove every ``X-GT-*`` header in place; return the names removed (lower-cased)."""
    return [name.lower() for name in strip_gt_headers(headers)]


def append_header(headers: CIMultiDict[str], name: str, value: str) -> None:
    """Append to a list-valued header, merging existing field lines into one."""
    existing = headers.getall(name, [])
    if existing:
        headers.popall(name)
        headers[name] = ", ".join([*existing, value])
    else:
        headers[name] = value


def request_headers_to_upstream(
    headers: CIMultiDictProxy[str],
    *,
    client_ip: str | None,
    proto: str,
    via: str,
) -> tuple[CIMultiDict[str], list[str]]:
    """Headers to send upstream, and the ``X-GT-*`` names stripped from the app's request."""
    out, game = split_game_headers(headers)
    stripped = [name for name, _ in game]
    append_header(out, "Via", via)
    if client_ip:
        append_header(out, "X-Forwarded-For", client_ip)
    append_header(out, "X-Forwarded-Proto", proto)
    return out, stripped


def response_headers_to_app(
    headers: CIMultiDictProxy[str], via: str
) -> tuple[CIMultiDict[str], dict[str, str]]:
    """Headers to hand the app, and the ``X-GT-*`` headers consumed (name -> last value)."""
    out, game = split_game_headers(headers)
    append_header(out, "Via", via)
    return out, dict(game)


def without(headers: CIMultiDict[str], names: Iterable[str]) -> CIMultiDict[str]:
    drop = {n.lower() for n in names}
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


async def relay_chunks(
    stream: BodyReader, idle_timeout: float, progress: asyncio.Timeout | None = None
) -> AsyncIterator[bytes]:
    """Yield a body as it arrives; raise ``TimeoutError`` if no byte comes for ``idle_timeout``.

    ``progress``: a timeout (e.g. the wait for the upstream's answer) that each chunk pushes
    ``idle_timeout`` into the future, so a long upload that keeps moving is not cut off by it.
    """
    loop = asyncio.get_running_loop()
    while True:
        async with asyncio.timeout(idle_timeout):
            chunk = await stream.readany()
        if not chunk:
            return
        if progress is not None:
            with contextlib.suppress(RuntimeError):  # already left: the answer came first
                progress.reschedule(loop.time() + idle_timeout)
        yield chunk


async def relay_body(
    stream: BodyReader,
    response: StreamResponse,
    idle_timeout: float,
    deadline: asyncio.Timeout | None = None,
) -> int:
    """Copy a body from ``stream`` to ``response`` as it arrives; returns the bytes copied.

    Each step (read a chunk, then write it out) must finish within ``idle_timeout``: a stalled
    upstream and an app that stopped reading both end in ``TimeoutError``, never a hang.
    ``deadline``: an enclosing ``asyncio.timeout`` to push forward per chunk instead of
    arming a new timer for each one.
    """
    if deadline is None:
        async with asyncio.timeout(idle_timeout) as own:
            return await relay_body(stream, response, idle_timeout, own)
    loop = asyncio.get_running_loop()
    copied = 0
    while True:
        deadline.reschedule(loop.time() + idle_timeout)
        chunk = await stream.readany()
        if not chunk:
            return copied
        await response.write(chunk)
        copied += len(chunk)
