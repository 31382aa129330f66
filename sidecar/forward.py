"""HTTP/1.1 forwarding rules shared by the sidecar's listeners: headers and streamed bodies.

Owns what a proxy must change on the way through (RFC 9110 §7.6): hop-by-hop headers are
removed (§7.6.1: ``Connection`` and every header it names, ``Keep-Alive``,
``Proxy-Connection``, ``TE``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade``, and the
proxy-auth pair meant for this hop), ``Via`` (§7.6.3) and ``X-Forwarded-For`` are appended,
``X-Forwarded-Proto`` is set (kept as the first proxy set it); every other end-to-end header
(``traceparent``, ``Content-Encoding``, cookies, …) passes untouched and in order. Game
headers (``X-GT-*``) are never passed between the app and the network unvalidated: the
functions here strip them and report what they stripped; the caller counts it.

An answer is relayed chunk by chunk (:func:`relay_answer`), each chunk pushing the request's
watchdog, so memory stays bounded by the socket buffers whatever the body size, and no read
waits forever; a chunked body's trailer fields go on after it without what may not ride
there (:func:`trailers_to_relay`). A body is anything with ``readany()``
(:class:`BodyReader`): aiohttp's own stream, the sidecar's HTTP/1.1 client's answer, or an
in-memory one from :mod:`sidecar.transport`. Nothing here opens a connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from wire.headers import is_gt_header, strip_gt_headers

if TYPE_CHECKING:  # sidecar.exchange and sidecar.transport import this module
    from sidecar.exchange import Exchange
    from sidecar.transport import UpstreamResponse
    from sidecar.watchdog import Watchdog

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
    if "Via" not in headers:
        return False
    return any(
        entry.strip() == via for value in headers.getall("Via", []) for entry in value.split(",")
    )


def end_to_end(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    """A copy of ``headers`` without hop-by-hop ones (order and duplicates kept)."""
    drop = HOP_BY_HOP | connection_tokens(headers)
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


# What a header name is on the way through, by its spelling as received: hop-by-hop (always),
# a game header (X-GT-*, with "_" read as "-" like wire.headers.is_gt_header), or anything
# else (end-to-end unless the message's Connection names it). Names repeat from request to
# request, so the verdict is kept per spelling: a bounded table of short names (a flood of
# made-up names fills it once, then they are classified each time).
_PASS, _HOP, _GAME = 0, 1, 2
_GT_SPELLINGS = frozenset({"x-gt-", "x_gt-", "x-gt_", "x_gt_"})  # GT_PREFIX, "_" for "-"
_KIND_CACHE_SIZE = 4096
_KIND_NAME_MAX = 64
_kinds: dict[str, tuple[str, int]] = {}


def _classify(name: str) -> tuple[str, int]:
    lower = name.lower()
    kind = _HOP if lower in HOP_BY_HOP else _GAME if lower[:5] in _GT_SPELLINGS else _PASS
    found = (lower, kind)
    if len(_kinds) < _KIND_CACHE_SIZE and len(name) <= _KIND_NAME_MAX:
        _kinds[name] = found
    return found


def _named_by_connection(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    """The end-to-end names the message's ``Connection`` lists (so hop-by-hop here)."""
    values = headers.getall("Connection", ())
    if not values:
        return _NONE_NAMED
    if len(values) == 1:
        plain = _PLAIN_CONNECTION.get(values[0].strip().lower())
        if plain is not None:
            return plain
    return frozenset(connection_tokens(headers) - HOP_BY_HOP)


_NONE_NAMED: frozenset[str] = frozenset()
_PLAIN_CONNECTION = {"keep-alive": _NONE_NAMED, "close": frozenset({"close"})}


def split_game_headers(
    headers: CIMultiDictProxy[str] | CIMultiDict[str],
) -> tuple[CIMultiDict[str], list[tuple[str, str]]]:
    """One pass: (end-to-end headers without ``X-GT-*``, the ``X-GT-*`` pairs lower-cased).

    The same rule as :func:`wire.headers.strip_gt_headers`, without a second walk over the
    headers on the request path.
    """
    out, game, _ = _split(headers, ())
    return out, game


def _split(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], merged: tuple[str, ...]
) -> tuple[CIMultiDict[str], list[tuple[str, str]], dict[str, list[str]]]:
    """:func:`split_game_headers`, also taking out the end-to-end lines of the lower-cased
    names in ``merged`` (values in order), which the caller appends to."""
    named = _named_by_connection(headers)
    kinds = _kinds
    pairs: list[tuple[str, str]] = []
    game: list[tuple[str, str]] = []
    taken: dict[str, list[str]] = {}
    for key, value in headers.items():
        lower, kind = kinds.get(key) or _classify(key)
        if kind == _HOP or (named and lower in named):
            continue
        if kind == _PASS:
            if lower in merged:
                taken.setdefault(lower, []).append(value)
            else:
                pairs.append((key, value))
        else:  # X-GT-*, and X_GT_* too: the pair keeps its spelling, so it is never
            game.append((lower, value))  # (the pair keeps its spelling, so it is never read
            # as the signal its canonical name carries)
    return CIMultiDict(pairs), game, taken


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


_FORWARDED = ("via", "x-forwarded-for", "x-forwarded-proto")
_VIA_PROTO = ("via", "x-forwarded-proto")  # without a client address, X-F-F lines stay put
_VIA = ("via",)


def request_headers_to_upstream(
    headers: CIMultiDictProxy[str],
    *,
    client_ip: str | None,
    proto: str,
    via: str,
) -> tuple[CIMultiDict[str], list[str]]:
    """Headers to send upstream, and the ``X-GT-*`` names stripped from the app's request.

    ``Via``, ``X-Forwarded-For`` and ``X-Forwarded-Proto`` go last, in that order, each one
    line: the app's lines of it merged, then this hop's entry (as :func:`append_header`)."""
    out, game, taken = _split(headers, _FORWARDED if client_ip else _VIA_PROTO)
    stripped = [name for name, _ in game]
    add = out.add
    add("Via", ", ".join([*taken["via"], via]) if "via" in taken else via)
    if client_ip:
        xff = taken.get("x-forwarded-for")
        add("X-Forwarded-For", ", ".join([*xff, client_ip]) if xff else client_ip)
    # the scheme the original client used, as the first proxy set it (a list of schemes
    # reads differently to every framework); this hop's when none did, as Envoy does for a
    # trusted (internal) source
    xfp = taken.get("x-forwarded-proto")
    add("X-Forwarded-Proto", xfp[0].split(",")[0].strip() or proto if xfp else proto)
    return out, stripped


def response_headers_to_app(
    headers: CIMultiDictProxy[str], via: str
) -> tuple[CIMultiDict[str], dict[str, str]]:
    """Headers to hand the app, and the ``X-GT-*`` headers consumed (name -> last value)."""
    out, game, taken = _split(headers, _VIA)
    out.add("Via", ", ".join([*taken["via"], via]) if taken else via)
    return out, dict(game)


# header names as received on the wire -> (the name as str, lower-cased, its kind): the
# verdict of _classify, kept per spelling in bytes (bounded as _kinds)
_wire_names: dict[bytes, tuple[str, str, int]] = {}


def response_headers_from_wire(
    fields: list[tuple[bytes, bytes]], via: str
) -> tuple[CIMultiDict[str], dict[str, str]]:
    """:func:`response_headers_to_app` straight from an answer's parsed fields (names
    latin-1, values UTF-8 with undecodable bytes kept as surrogates, as
    :mod:`sidecar.http1.client_connection` decodes them), without building the answer's own
    header map first."""
    names = _wire_names
    pairs: list[tuple[str, str]] = []
    game: list[tuple[str, str]] = []
    vias: list[str] = []
    for raw_name, raw_value in fields:
        known = names.get(raw_name)
        if known is None:
            key = raw_name.decode("latin-1")
            known = (key, *(_kinds.get(key) or _classify(key)))
            if len(names) < _KIND_CACHE_SIZE and len(key) <= _KIND_NAME_MAX:
                names[raw_name] = known
        key, lower, kind = known
        value = raw_value.decode("utf-8", "surrogateescape")
        if kind == _PASS:
            if lower == "via":
                vias.append(value)
            else:
                pairs.append((key, value))
        elif kind == _GAME:
            game.append((lower, value))
        elif lower == "connection" and value.strip().lower() != "keep-alive":
            # Connection names more hop-by-hop headers: the general rule
            return response_headers_to_app(CIMultiDictProxy(CIMultiDict(
                [(name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
                 for name, value in fields])), via)
    out = CIMultiDict(pairs)
    out.add("Via", ", ".join([*vias, via]) if vias else via)
    return out, dict(game)


# Fields a sender may not put in a trailer section, or that mean nothing after the body
# (RFC 9110 §6.5.1: framing, routing, request modifiers, authentication, response control
# data, and how to process the content), and the forwarding fields this proxy sets in the
# head: dropped on the way through, with the hop-by-hop ones.
NOT_IN_TRAILERS = HOP_BY_HOP | frozenset(
    {
        "age", "authorization", "cache-control", "content-encoding", "content-length",
        "content-range", "content-type", "cookie", "date", "expect", "expires", "host",
        "if-match", "if-modified-since", "if-none-match", "if-range", "if-unmodified-since",
        "location", "max-forwards", "pragma", "range", "retry-after", "set-cookie", "vary",
        "www-authenticate",
        # what the proxy itself sets in the head: a trailer must not override it for an app
        # that merges trailers into headers (a spoofed client address)
        "forwarded", "via", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
        "x-real-ip",
    }
)


def trailers_to_relay(
    fields: CIMultiDictProxy[str] | CIMultiDict[str] | None,
) -> tuple[list[tuple[str, str]], list[str]]:
    """A chunked body's trailer section as it goes on (order and duplicates kept), and the
    ``X-GT-*`` names dropped from it: game signals ride only in heads, so one in a trailer
    is never relayed nor believed. Fields of :data:`NOT_IN_TRAILERS` are dropped too."""
    kept: list[tuple[str, str]] = []
    game: list[str] = []
    for name, value in (fields or {}).items():
        if is_gt_header(name):
            game.append(name)
        elif name.lower() not in NOT_IN_TRAILERS:
            kept.append((name, value))
    return kept, game


def without(headers: CIMultiDict[str], names: Iterable[str]) -> CIMultiDict[str]:
    drop = {n.lower() for n in names}
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


def relayable_trailers(
    fields: CIMultiDictProxy[str] | CIMultiDict[str] | None,
    on_dropped: Callable[[list[str]], None],
) -> list[tuple[str, str]] | None:
    """:func:`trailers_to_relay` as a body's end takes it: the fields that go on (None when
    none), the ``X-GT-*`` names dropped handed to ``on_dropped`` (the caller counts them)."""
    if not fields:
        return None
    kept, game = trailers_to_relay(fields)
    if game:
        on_dropped(game)
    return kept or None


def reader_stalled(exchange: Exchange) -> bool:
    """Whether an answer's relay that stalled was waiting for its reader (the app outbound,
    the caller inbound) rather than for the body: bytes written are still queued in the
    transport. The kernel's socket buffer takes whatever a peer that reads leaves for a
    moment, so bytes still queued after a whole stall mean the peer stopped reading."""
    transport = exchange.transport
    size = getattr(transport, "get_write_buffer_size", None)
    try:
        return size is not None and size() > 0
    except RuntimeError:  # a transport closed meanwhile
        return False


async def relay_answer(
    exchange: Exchange,
    upstream: UpstreamResponse,
    headers: CIMultiDict[str],
    *,
    bodiless: bool,
    watchdog: Watchdog,
    on_dropped: Callable[[list[str]], None],
) -> None:
    """Copy an upstream's answer to ``exchange`` (both listeners): the head, the body chunk
    by chunk as it arrives (none when ``bodiless``: :func:`must_be_empty`), each chunk
    progress for the request's ``watchdog``, then its trailer fields that may go on
    (:func:`relayable_trailers`). A stall the watchdog cut is raised as ``TimeoutError``;
    what a failure means is the caller's to decide."""
    try:
        watchdog.push()
        await exchange.start_response(upstream.status, upstream.reason, headers)
        if not bodiless:
            watchdog.moving = exchange.reader_moving
            content = upstream.content
            while chunk := await content.readany():
                await exchange.write(chunk)
                watchdog.push()
        await exchange.finish(relayable_trailers(getattr(upstream, "trailers", None),
                                                 on_dropped))
    except asyncio.CancelledError:
        if not watchdog.took_back():
            raise
        raise TimeoutError from None  # the watchdog's: a stall
