"""gRPC over HTTP/2 as a proxy reads it: status codes, ``grpc-timeout`` and ``grpc-message``.

Owns the few pieces of the gRPC wire protocol (gRPC's "PROTOCOL-HTTP2" document) that a
proxy routing per call needs: telling a gRPC request from other HTTP/2 traffic
(``content-type: application/grpc...``), the call's status (``grpc-status`` in the trailers,
or in the headers of a trailers-only response), which statuses are the endpoint's failure
rather than the application's answer, the ``grpc-timeout`` deadline (``<digits><unit>``), and
the headers of a trailers-only error answer with a percent-encoded ``grpc-message``.

Pure functions over bytes and numbers: no I/O, no HTTP/2 state (that is :mod:`h2`'s and the
sidecar's), no policy decisions beyond the classification of a status code.
"""

from __future__ import annotations

from collections.abc import Iterable

OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16
LAST_CODE = UNAUTHENTICATED  # the codes gRPC defines are 0..16

# A call ended by RST_STREAM, as gRPC's PROTOCOL-HTTP2 ("Errors") maps the HTTP/2 error code
# to the status its client reports; any other code is INTERNAL. A lost connection (no code)
# is UNAVAILABLE.
_RESET_STATUS = {7: UNAVAILABLE, 8: CANCELLED, 11: RESOURCE_EXHAUSTED, 12: PERMISSION_DENIED}
# An answer with no grpc-status, as gRPC's "HTTP to gRPC Status Code Mapping" reads its HTTP
# status (what the caller's gRPC client reports); any other status is UNKNOWN.
_HTTP_STATUS = {400: INTERNAL, 401: UNAUTHENTICATED, 403: PERMISSION_DENIED,
                404: UNIMPLEMENTED, 429: UNAVAILABLE, 502: UNAVAILABLE, 503: UNAVAILABLE,
                504: UNAVAILABLE}

# Statuses that say the endpoint could not serve the call (it was down, overloaded, too slow,
# or broke); every other status (NOT_FOUND, INVALID_ARGUMENT, PERMISSION_DENIED, ...) is the
# application's answer and says nothing about the endpoint's health.
ENDPOINT_FAILURES = frozenset({UNKNOWN, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL,
                               UNAVAILABLE})

_TIMEOUT_UNITS = {
    ord("H"): 3600.0, ord("M"): 60.0, ord("S"): 1.0,
    ord("m"): 1e-3, ord("u"): 1e-6, ord("n"): 1e-9,
}
_MAX_TIMEOUT_DIGITS = 8  # the spec's TimeoutValue is at most 8 ASCII digits


def is_grpc(content_type: bytes | None) -> bool:
    """Whether a request's ``content-type`` says gRPC (``application/grpc`` or ``+proto``...)."""
    if not content_type:
        return False
    value = content_type.strip().lower()
    return value == b"application/grpc" or value.startswith((b"application/grpc+",
                                                             b"application/grpc;"))


def counts_against_endpoint(status: int) -> bool:
    """Whether a call that ended with ``status`` is the endpoint's failure."""
    return status in ENDPOINT_FAILURES


def parse_timeout(value: bytes) -> float | None:
    """Seconds of a ``grpc-timeout`` value (``100m``, ``5S``, ``1H``), None when malformed."""
    value = value.strip()
    digits = value[:-1]
    if not value or not digits.isdigit() or len(digits) > _MAX_TIMEOUT_DIGITS:
        return None
    unit = _TIMEOUT_UNITS.get(value[-1])
    return None if unit is None else int(digits) * unit


def format_timeout(seconds: float) -> bytes:
    """A ``grpc-timeout`` value for ``seconds`` (rounded up to a whole millisecond, or coarser
    units when milliseconds would need more than 8 digits)."""
    millis = max(0, -int(-seconds * 1000 // 1))
    if millis < 10**_MAX_TIMEOUT_DIGITS:
        return b"%dm" % millis
    secs = -(-millis // 1000)
    if secs < 10**_MAX_TIMEOUT_DIGITS:
        return b"%dS" % secs
    return b"%dH" % min(-(-secs // 3600), 10**_MAX_TIMEOUT_DIGITS - 1)


def status_of(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The ``grpc-status`` in a header block, None when absent or not a number; a number
    gRPC does not define reads as UNKNOWN, as its clients read it (and a metric's label
    stays one of 17)."""
    for name, value in headers:
        if name == b"grpc-status":
            text = value.strip()
            if not (text.isdigit() and len(text) <= 3):
                return None
            code = int(text)
            return code if code <= LAST_CODE else UNKNOWN
    return None


def status_of_reset(code: int | None) -> int:
    """The status a call cut by the peer's RST_STREAM(``code``) ends with (None: no reset
    from the peer: the connection was lost, or the sidecar reset the stream itself)."""
    return UNAVAILABLE if code is None else _RESET_STATUS.get(code, INTERNAL)


def status_of_http(http_status: int) -> int:
    """The status of an answer that carries no ``grpc-status``, by its HTTP status."""
    return _HTTP_STATUS.get(http_status, UNKNOWN)


def encode_message(message: str) -> bytes:
    """Percent-encode a ``grpc-message``: UTF-8, with ``%`` and bytes outside 0x20-0x7E
    escaped as ``%XX``."""
    out = bytearray()
    for byte in message.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def decode_message(value: bytes) -> str:
    """The text of a percent-encoded ``grpc-message`` (bad escapes are kept as they are)."""
    out = bytearray()
    i = 0
    while i < len(value):
        byte = value[i]
        if byte == 0x25 and _is_hex(value[i + 1:i + 3]):
            out.append(int(value[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(byte)
            i += 1
    return out.decode("utf-8", errors="replace")


def _is_hex(pair: bytes) -> bool:
    return len(pair) == 2 and all(c in b"0123456789abcdefABCDEF" for c in pair)


def trailers_only(status: int, message: str,
                  extra: Iterable[tuple[bytes, bytes]] = ()) -> list[tuple[bytes, bytes]]:
    """The one header block of a trailers-only gRPC answer (HTTP 200, no DATA, END_STREAM)."""
    return [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"%d" % status),
        (b"grpc-message", encode_message(message)),
        *extra,
    ]
