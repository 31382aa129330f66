"""Signed caller identity: the ``X-GT-Identity`` header, its one wire format and its checks.

This module owns the version-1 identity format, its signing and its verification. It does no
I/O and reads no clock: the sidecar reads the mesh secret (environment or file) and passes the
bytes to :func:`load_mesh_key`, and passes ``now`` to :func:`sign_identity` and
:func:`verify_identity`.

Wire format (version 1)::

    X-GT-Identity: v=1;id=<caller>;ts=<unix seconds>;sig=<mac>
    <mac> = base64url(HMAC-SHA256(key, "X-GT-Identity|v=1|<caller>|<ts>")), unpadded

It follows the ``v=<version>;key=value`` convention of :mod:`mesh.headers`, but strictly: a
signed value has no optional or unknown keys, so nothing unsigned can ride along. The MAC input
starts with the header name and version (domain separation: a MAC made with the mesh key for
any other purpose can never pass as an identity).

- ``<caller>`` matches ``[A-Za-z0-9._:-]{1,64}`` (so it can never contain ``;``, ``=`` or ``|``).
- ``<ts>`` is the signing time in seconds, written as a decimal (``1764183600.125``); the MAC
  covers the exact characters of the header, so no float round trip is involved.
- ``<sig>`` is the 32-byte MAC in unpadded base64url (43 characters).
- The four fields appear in this order, exactly once each. Anything else is ``malformed``.

Verification checks, in this order: presence, length, shape, version, the MAC (constant-time
:func:`hmac.compare_digest`; tried against each accepted key, so keys can be rotated), then
freshness (``|now - ts| <= max_skew``). Freshness is only reported for authentic headers, so
an unauthenticated sender learns nothing but ``bad-signature``.

Anything that does not verify is never trusted: the caller is :data:`ANONYMOUS`, the one shared
bucket that :mod:`mesh.reputation` treats most strictly. Limits: an identity is a bearer token
for ``max_skew`` seconds (anyone who can read it in transit can replay it that long); it proves
membership of the mesh (knowledge of the shared key), not which pod sent the request. mTLS is
the stronger answer where a platform has it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

IDENTITY_VERSION = "v=1"
ANONYMOUS = "anonymous"
"""The caller name of every request whose identity did not verify."""

MIN_KEY_BYTES = 16
"""Shortest accepted mesh key (128 bits)."""
MAX_HEADER_CHARS = 256
CALLER_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_TS_PATTERN = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,6})?")
_SIG_PATTERN = re.compile(r"[A-Za-z0-9_-]{43}")
_FIELDS = ("id", "ts", "sig")


class IdentityReason(StrEnum):
    """Why an identity header was not trusted (also the metric label)."""

    MISSING = "missing"
    MALFORMED = "malformed"
    UNSUPPORTED_VERSION = "unsupported-version"
    BAD_SIGNATURE = "bad-signature"
    EXPIRED = "expired"
    FUTURE = "future"


@dataclass(frozen=True, slots=True)
class VerifiedIdentity:
    """An identity whose MAC and timestamp checked out."""

    caller: str
    issued_at: float
    trusted: bool = True


@dataclass(frozen=True, slots=True)
class IdentityRejection:
    """An identity that is not trusted; the request is policed as :data:`ANONYMOUS`."""

    reason: IdentityReason
    detail: str
    caller: str = ANONYMOUS
    trusted: bool = False


class MeshKeyError(ValueError):
    """The mesh key is absent or too weak to sign identities with."""


def load_mesh_key(env_value: str | None, file_content: bytes | None) -> bytes:
    """The mesh key from the environment variable's value or a key file's content.

    The environment value wins when both are given (as it does for most tools). Surrounding
    whitespace (a key file's trailing newline) is stripped. Raises :class:`MeshKeyError` when
    neither is given or the key is shorter than :data:`MIN_KEY_BYTES` bytes.
    """
    if env_value is not None and env_value.strip():
        key, source = env_value.strip().encode("utf-8"), "environment value"
    elif file_content is not None and file_content.strip():
        key, source = file_content.strip(), "key file"
    else:
        raise MeshKeyError(
            "no mesh key: set EQUILIBRIUM_MESH_SECRET or point to a key file "
            f"(at least {MIN_KEY_BYTES} bytes, e.g. `openssl rand -hex 32`)"
        )
    if len(key) < MIN_KEY_BYTES:
        raise MeshKeyError(
            f"mesh key from the {source} is {len(key)} bytes; at least {MIN_KEY_BYTES} are required"
        )
    return key


def _mac(key: bytes, caller: str, ts_text: str) -> str:
    message = f"X-GT-Identity|{IDENTITY_VERSION}|{caller}|{ts_text}".encode("ascii")
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def sign_identity(caller_id: str, key: bytes, now: float) -> str:
    """The ``X-GT-Identity`` header value for ``caller_id`` signed at ``now`` (unix seconds).

    Raises ValueError for a caller id outside ``[A-Za-z0-9._:-]{1,64}``, a key shorter than
    :data:`MIN_KEY_BYTES`, or a ``now`` that is not unix seconds in [0, 1e12).
    """
    if not CALLER_ID_PATTERN.fullmatch(caller_id):
        raise ValueError(f"caller id {caller_id!r} must match {CALLER_ID_PATTERN.pattern}")
    if caller_id == ANONYMOUS:
        raise ValueError(f"caller id {ANONYMOUS!r} is reserved for unverified callers")
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"mesh key must be at least {MIN_KEY_BYTES} bytes")
    if not math.isfinite(now) or not 0 <= now < 1e12:
        raise ValueError(f"signing time must be unix seconds in [0, 1e12), got {now!r}")
    ts_text = f"{now:.3f}"
    return f"{IDENTITY_VERSION};id={caller_id};ts={ts_text};sig={_mac(key, caller_id, ts_text)}"


def _reject(reason: IdentityReason, detail: str) -> IdentityRejection:
    return IdentityRejection(reason=reason, detail=detail)


def verify_identity(
    header: str | None,
    key: bytes | Sequence[bytes],
    now: float,
    max_skew: float = 30.0,
) -> VerifiedIdentity | IdentityRejection:
    """Check an ``X-GT-Identity`` header value; never raises on bad input.

    ``key`` is the mesh key, or several keys during a rotation (any one may have signed).
    Both result types have ``.caller`` (the caller's id, or :data:`ANONYMOUS`) and
    ``.trusted``, so a handler can write ``caller = verify_identity(...).caller``.
    """
    if header is None or header == "":
        return _reject(IdentityReason.MISSING, "no X-GT-Identity header")
    if len(header) > MAX_HEADER_CHARS:
        return _reject(IdentityReason.MALFORMED, f"longer than {MAX_HEADER_CHARS} characters")
    parts = header.strip().split(";")
    if parts[0] != IDENTITY_VERSION:
        if parts[0].startswith("v=") and parts[0][2:].isdigit():
            return _reject(
                IdentityReason.UNSUPPORTED_VERSION,
                f"version {parts[0][:8]!r} is not supported (expected {IDENTITY_VERSION})",
            )
        return _reject(IdentityReason.MALFORMED, "does not start with a version such as 'v=1'")
    if len(parts) != 1 + len(_FIELDS):
        return _reject(IdentityReason.MALFORMED, "expected exactly the fields id, ts, sig")
    values: list[str] = []
    for part, name in zip(parts[1:], _FIELDS, strict=True):
        field_name, sep, value = part.partition("=")
        if sep != "=" or field_name != name:
            return _reject(IdentityReason.MALFORMED, f"expected field {name!r} in that position")
        values.append(value)
    caller, ts_text, sig = values
    if not CALLER_ID_PATTERN.fullmatch(caller) or caller == ANONYMOUS:
        return _reject(IdentityReason.MALFORMED, "caller id has a bad character set or length")
    if not _TS_PATTERN.fullmatch(ts_text):
        return _reject(IdentityReason.MALFORMED, "ts is not a decimal number of seconds")
    if not _SIG_PATTERN.fullmatch(sig):
        return _reject(IdentityReason.MALFORMED, "sig is not 43 characters of base64url")
    try:
        base64.urlsafe_b64decode(sig + "=")
    except (binascii.Error, ValueError):
        return _reject(IdentityReason.MALFORMED, "sig is not valid base64url")
    keys = [key] if isinstance(key, bytes | bytearray) else list(key)
    # compare_digest on every key (no early exit) so timing does not reveal which key matched
    matched = False
    for candidate in keys:
        matched |= hmac.compare_digest(_mac(bytes(candidate), caller, ts_text), sig)
    if not matched:
        return _reject(IdentityReason.BAD_SIGNATURE, "signature does not match the mesh key")
    issued_at = float(ts_text)
    if now - issued_at > max_skew:
        return _reject(
            IdentityReason.EXPIRED, f"signed {now - issued_at:.1f} s ago (max {max_skew:g} s)"
        )
    if issued_at - now > max_skew:
        return _reject(
            IdentityReason.FUTURE, f"signed {issued_at - now:.1f} s ahead (max {max_skew:g} s)"
        )
    return VerifiedIdentity(caller=caller, issued_at=issued_at)
