"""Signed caller identity: the ``X-GT-Identity`` header, its one wire format and its checks.

This module owns the version-2 identity format, its signing and its verification. It does no
I/O and reads no clock: the sidecar gets the mesh key from :func:`wire.signing.read_mesh_key`
and passes it, ``now`` and the request the identity travels on, to :func:`sign_identity` and
:func:`verify_identity`. Remembering which nonces were used is :class:`wire.nonces.NonceBook`'s.

Wire format (version 2)::

    X-GT-Identity: v=2;id=<caller>;ts=<unix seconds>;n=<nonce>;sig=<mac>
    <mac> = base64url(HMAC-SHA256(key,
            "X-GT-Identity|v=2|<caller>|<ts>|<nonce>|<METHOD>|<authority>|<target>")), unpadded

An identity authorises one request: the MAC covers the destination (``authority``: the
``Host`` the caller's sidecar sent, lower-cased), the method and the request target
(origin-form path and query, exactly as sent), plus a nonce and the signing time. The same
header on another request (``DELETE /admin/delete`` instead of ``GET /users``, another
service), later than ``max_skew``, or a second time (the verifier's nonce book) is refused.
Version 1 (caller and time only, replayable on any request) is refused as
``unsupported-version``.

It follows the ``v=<version>;key=value`` convention of :mod:`wire.headers`, but strictly: a
signed value has no optional or unknown keys, so nothing unsigned can ride along. The MAC input
starts with the header name and version (domain separation: a MAC made with the mesh key for
any other purpose can never pass as an identity).

- ``<caller>`` matches ``[A-Za-z0-9._:-]{1,64}`` (so it can never contain ``;``, ``=`` or ``|``).
- ``<ts>`` is the signing time in seconds, written as a decimal (``1764183600.125``); the MAC
  covers the exact characters of the header, so no float round trip is involved.
- ``<nonce>`` is 16 to 32 characters of base64url, fresh for every request (and every retry:
  each attempt is signed anew); the caller also sends it as ``X-GT-Challenge``, which the
  callee's signed answer is bound to (:mod:`wire.signals`).
- ``<sig>`` is the 32-byte MAC in unpadded base64url (43 characters).
- The five fields appear in this order, exactly once each. Anything else is ``malformed``.

Verification checks, in this order: presence, length, shape, version, the MAC over the
request it arrived on (constant-time :func:`hmac.compare_digest`; tried against each accepted
key, so keys can be rotated), then freshness (``|now - ts| <= max_skew``). Freshness is only
reported for authentic headers, so an unauthenticated sender learns nothing but
``bad-signature`` (which is also what an identity moved to another request gets).

Anything that does not verify is never trusted: the caller is :data:`ANONYMOUS`, the one shared
bucket that :mod:`mesh.reputation` (which owns the name) treats most strictly. Limits: it
proves membership of the mesh (knowledge of the shared key), not which pod sent the request;
whoever can read a request in transit can still hold it back and send it *instead* (once,
within ``max_skew``). mTLS is the stronger answer where a platform has it.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from mesh.reputation import ANONYMOUS
from wire.errors import Reason
from wire.numerals import ascii_uint
from wire.signing import MIN_KEY_BYTES, SIGNATURE_RE, mac, verify_mac

__all__ = [
    "ANONYMOUS",
    "CALLER_ID_PATTERN",
    "IDENTITY_VERSION",
    "NONCE_PATTERN",
    "BoundRequest",
    "IdentityRejection",
    "VerifiedIdentity",
    "new_nonce",
    "sign_identity",
    "verify_identity",
]

IDENTITY_VERSION = "v=2"
MAX_HEADER_CHARS = 256
CALLER_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,64}")
NONCE_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,32}")
_TS_PATTERN = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,6})?")
_FIELDS = ("id", "ts", "n", "sig")


@dataclass(frozen=True, slots=True)
class BoundRequest:
    """The request an identity authorises: ``authority`` (the ``Host`` as sent; compared
    lower-case), ``method`` and ``target`` (origin-form, exactly as sent)."""

    method: str
    authority: str
    target: str

    def text(self) -> str:
        return f"{self.method.upper()}|{self.authority.strip().lower()}|{self.target}"


def new_nonce(random_bytes: bytes) -> str:
    """A nonce from 12 random bytes (the caller draws them: ``os.urandom(12)``)."""
    if len(random_bytes) != 12:
        raise ValueError("a nonce takes 12 random bytes")
    return base64.urlsafe_b64encode(random_bytes).decode("ascii")


@dataclass(frozen=True, slots=True)
class VerifiedIdentity:
    """An identity whose MAC and timestamp checked out."""

    caller: str
    issued_at: float
    nonce: str = ""
    trusted: bool = True


@dataclass(frozen=True, slots=True)
class IdentityRejection:
    """An identity that is not trusted; the request is policed as :data:`ANONYMOUS`.

    ``reason`` is one of ``missing``, ``malformed``, ``unsupported-version``,
    ``bad-signature``, ``expired`` or ``future`` (a :class:`~wire.errors.Reason`).
    """

    reason: Reason
    detail: str
    caller: str = ANONYMOUS
    trusted: bool = False


def _message(caller: str, ts_text: str, nonce: str, request: BoundRequest) -> bytes:
    return (f"X-GT-Identity|{IDENTITY_VERSION}|{caller}|{ts_text}|{nonce}|"
            f"{request.text()}").encode("utf-8", "surrogateescape")


def sign_identity(caller_id: str, key: bytes, now: float, request: BoundRequest,
                  nonce: str) -> str:
    """The ``X-GT-Identity`` header value for ``caller_id`` signed at ``now`` (unix seconds)
    for ``request``, with a fresh ``nonce`` (:func:`new_nonce`).

    Raises ValueError for a caller id outside ``[A-Za-z0-9._:-]{1,64}``, a key shorter than
    :data:`MIN_KEY_BYTES`, a ``now`` that is not unix seconds in [0, 1e12), or a bad nonce.
    """
    if not NONCE_PATTERN.fullmatch(nonce):
        raise ValueError(f"nonce must match {NONCE_PATTERN.pattern}")
    if not CALLER_ID_PATTERN.fullmatch(caller_id):
        raise ValueError(f"caller id {caller_id!r} must match {CALLER_ID_PATTERN.pattern}")
    if caller_id == ANONYMOUS:
        raise ValueError(f"caller id {ANONYMOUS!r} is reserved for unverified callers")
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"mesh key must be at least {MIN_KEY_BYTES} bytes")
    if not math.isfinite(now) or not 0 <= now < 1e12:
        raise ValueError(f"signing time must be unix seconds in [0, 1e12), got {now!r}")
    ts_text = f"{now:.3f}"
    sig = mac(key, _message(caller_id, ts_text, nonce, request))
    return f"{IDENTITY_VERSION};id={caller_id};ts={ts_text};n={nonce};sig={sig}"


def _reject(reason: Reason, detail: str) -> IdentityRejection:
    return IdentityRejection(reason=reason, detail=detail)


def verify_identity(
    header: str | None,
    key: bytes | Sequence[bytes],
    now: float,
    max_skew: float,
    request: BoundRequest,
) -> VerifiedIdentity | IdentityRejection:
    """Check an ``X-GT-Identity`` header value that arrived on ``request``; never raises on
    bad input. (Whether its nonce was used before is the caller's :class:`wire.nonces.NonceBook`
    question, asked only of an identity that verified.)

    ``key`` is the mesh key, or several keys during a rotation (any one may have signed).
    Both result types have ``.caller`` (the caller's id, or :data:`ANONYMOUS`) and
    ``.trusted``, so a handler can write ``caller = verify_identity(...).caller``.
    """
    if header is None or header == "":
        return _reject(Reason.MISSING, "no X-GT-Identity header")
    if len(header) > MAX_HEADER_CHARS:
        return _reject(Reason.MALFORMED, f"longer than {MAX_HEADER_CHARS} characters")
    # only optional whitespace (SP, HTAB: RFC 9110 §5.6.3) is not part of a field value;
    # str.strip() would also drop CR, LF, VT, FF... and trust a value carrying them
    parts = header.strip(" \t").split(";")
    if parts[0] != IDENTITY_VERSION:
        if parts[0].startswith("v=") and ascii_uint(parts[0][2:], 3) is not None:
            return _reject(
                Reason.UNSUPPORTED_VERSION,
                f"version {parts[0][:8]!r} is not supported (expected {IDENTITY_VERSION})",
            )
        return _reject(Reason.MALFORMED, "does not start with a version such as 'v=2'")
    if len(parts) != 1 + len(_FIELDS):
        return _reject(Reason.MALFORMED, "expected exactly the fields id, ts, n, sig")
    values: list[str] = []
    for part, name in zip(parts[1:], _FIELDS, strict=True):
        field_name, sep, value = part.partition("=")
        if sep != "=" or field_name != name:
            return _reject(Reason.MALFORMED, f"expected field {name!r} in that position")
        values.append(value)
    caller, ts_text, nonce, sig = values
    if not CALLER_ID_PATTERN.fullmatch(caller) or caller == ANONYMOUS:
        return _reject(Reason.MALFORMED, "caller id has a bad character set or length")
    if not _TS_PATTERN.fullmatch(ts_text):
        return _reject(Reason.MALFORMED, "ts is not a decimal number of seconds")
    if not NONCE_PATTERN.fullmatch(nonce):
        return _reject(Reason.MALFORMED, "n is not 16 to 32 characters of base64url")
    if not SIGNATURE_RE.fullmatch(sig):
        return _reject(Reason.MALFORMED, "sig is not 43 characters of base64url")
    try:
        base64.urlsafe_b64decode(sig + "=")
    except (binascii.Error, ValueError):
        return _reject(Reason.MALFORMED, "sig is not valid base64url")
    keys = [key] if isinstance(key, bytes | bytearray) else list(key)
    if not verify_mac(keys, _message(caller, ts_text, nonce, request), sig):
        return _reject(Reason.BAD_SIGNATURE, "signature does not match the mesh key and this "
                       "request (method, authority, target)")
    issued_at = float(ts_text)
    if now - issued_at > max_skew:
        return _reject(
            Reason.EXPIRED, f"signed {now - issued_at:.1f} s ago (max {max_skew:g} s)"
        )
    if issued_at - now > max_skew:
        return _reject(
            Reason.FUTURE, f"signed {issued_at - now:.1f} s ahead (max {max_skew:g} s)"
        )
    return VerifiedIdentity(caller=caller, issued_at=issued_at, nonce=nonce)
