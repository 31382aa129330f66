"""The end of a chunked HTTP/1.1 body: the last chunk and its trailer section.

Owns the bytes that close a chunked body (RFC 9112 §7.1): ``0`` CRLF, then the trailer fields
one per line, then an empty line. Both ends of the sidecar's HTTP/1.1 write it: the listener
for an answer to the app (:mod:`sidecar.http1.server`), the upstream client for a request body
(:mod:`sidecar.http1.client_connection`). Which fields may be relayed is the forwarding rules'
business (:func:`sidecar.forward.trailers_to_relay`); this only writes them.
"""

from __future__ import annotations

from collections.abc import Iterable

LAST_CHUNK = b"0\r\n\r\n"


class TrailerError(ValueError):
    """A trailer field that cannot be written (a line break in it would end the section
    early and smuggle what follows into the next message)."""


def last_chunk(fields: Iterable[tuple[str, str]] | None) -> bytes:
    """The last chunk with ``fields`` as its trailer section (none: the bare last chunk).

    Written as UTF-8 with undecodable bytes restored (``surrogateescape``), as the sidecar's
    parsers decode them (names are tokens: ASCII). A CR or LF in a name or value raises
    :class:`TrailerError`.
    """
    lines = [f"{name}: {value}" for name, value in fields] if fields else []
    if not lines:
        return LAST_CHUNK
    text = "\r\n".join(lines)
    if text.count("\n") != len(lines) - 1 or text.count("\r") != len(lines) - 1:
        raise TrailerError("a trailer field carries a line break")
    return b"0\r\n" + text.encode("utf-8", "surrogateescape") + b"\r\n\r\n"
