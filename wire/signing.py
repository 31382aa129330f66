"""The mesh key and the one MAC every signed wire value uses.

Owns:

* the mesh key's source: the environment variable :data:`MESH_SECRET_ENV` (spelled here and
  nowhere else; other modules import the name) or a key file, read by :func:`read_mesh_key`,
  the only reader of the key in the code base;
* its strength (:data:`MIN_KEY_BYTES`) and the normalisation of one key or a rotation list
  (:func:`accepted_keys`: the first key signs, any key verifies);
* the MAC: HMAC-SHA256, written as 43 characters of unpadded base64url (:func:`mac`), checked
  in constant time against every accepted key (:func:`verify_mac`).

What is signed, and with which domain-separating prefix, belongs to each format
(:mod:`wire.identity`, :mod:`wire.recommendation`). Reading the key file is the only I/O here;
nothing is logged (the key never appears in a message), and the one thing kept is, in memory,
the SHA-256 state after each of the last few keys' HMAC pads (what every HMAC computes first).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import re
import stat
from collections.abc import Mapping, Sequence
from typing import Any, Literal, overload

from wire.errors import Reason, WireError

__all__ = [
    "FORBIDDEN_FILE_MODE",
    "MESH_SECRET_ENV",
    "MIN_DISTINCT_BYTES",
    "MIN_KEY_BYTES",
    "SIGNATURE_RE",
    "accepted_keys",
    "mac",
    "read_mesh_key",
    "verify_mac",
]

MESH_SECRET_ENV = "EQUILIBRIUM_MESH_SECRET"
"""The environment variable holding the mesh key itself (it wins over a key file)."""
MIN_KEY_BYTES = 16
"""Shortest accepted mesh key (128 bits)."""
MIN_DISTINCT_BYTES = 8
"""Fewest distinct byte values in an accepted key: ``aaaaaaaaaaaaaaaa`` or ``0101...`` is a
placeholder, not a secret (a random hex key of 32 characters has about 14)."""
FORBIDDEN_FILE_MODE = stat.S_IRWXO | stat.S_IWGRP
"""Permission bits a key file must not have: any access for others, write for the group.
Group read stays allowed: it is how a non-root reader gets a Kubernetes Secret volume
(``defaultMode: 0440`` with the pod's ``fsGroup``)."""
SIGNATURE_RE = re.compile(r"[A-Za-z0-9_-]{43}")
"""A MAC as it travels: 32 bytes in unpadded base64url."""
_SUBJECT = "mesh key"


def _key_error(reason: Reason, detail: str) -> WireError:
    return WireError(reason, detail, _SUBJECT)


def _strong(key: bytes, source: str) -> bytes:
    if len(key) < MIN_KEY_BYTES:
        raise _key_error(
            Reason.WEAK_KEY,
            f"the {source} is {len(key)} bytes; "
            f"at least {MIN_KEY_BYTES} are required",
        )
    if len(set(key)) < MIN_DISTINCT_BYTES:
        raise _key_error(
            Reason.WEAK_KEY,
            f"the {source} has only {len(set(key))} distinct bytes (at least "
            f"{MIN_DISTINCT_BYTES} are required): a placeholder, not a random key "
            "(generate one with `openssl rand -hex 32`)",
        )
    return key


@overload
def read_mesh_key(
    env: Mapping[str, str], key_file: str | os.PathLike[str] | None = None, *,
    required: Literal[True],
) -> bytes: ...


@overload
def read_mesh_key(
    env: Mapping[str, str], key_file: str | os.PathLike[str] | None = None, *,
    required: bool = False,
) -> bytes | None: ...


def read_mesh_key(
    env: Mapping[str, str],
    key_file: str | os.PathLike[str] | None = None,
    *,
    required: bool = False,
) -> bytes | None:
    """The mesh key: ``env[EQUILIBRIUM_MESH_SECRET]`` if set, else the content of ``key_file``.

    The one reader of the key (the sidecar, the signaler and the demo call it). The environment
    wins (as it does for most tools) and the key file is read only without it; surrounding
    whitespace (a file's trailing newline) is stripped. Returns ``None`` when neither
    is given and ``required`` is false (a sidecar then runs unsigned). Raises
    :class:`WireError`: ``no-key`` (the variable is set but blank: a Secret that went wrong
    must not start a sidecar unsigned; or neither is given, with ``required``),
    ``unreadable`` (the file cannot be read, is empty, or others may read it or the group
    write it: :data:`FORBIDDEN_FILE_MODE`), ``weak-key`` (shorter than :data:`MIN_KEY_BYTES`,
    or fewer than :data:`MIN_DISTINCT_BYTES` distinct bytes).
    """
    env_value = env.get(MESH_SECRET_ENV)
    if env_value is not None:
        if not env_value.strip():
            raise _key_error(
                Reason.NO_KEY,
                f"{MESH_SECRET_ENV} is set but blank: give it the key, or unset it "
                "(to run without one, or to read the key file)",
            )
        return _strong(env_value.strip().encode("utf-8"), "environment value")
    if key_file is None or str(key_file) == "":
        if required:
            raise _key_error(
                Reason.NO_KEY,
                f"none given: set {MESH_SECRET_ENV} or point to a key file "
                f"(at least {MIN_KEY_BYTES} bytes, e.g. `openssl rand -hex 32`)",
            )
        return None
    path = os.fspath(key_file)
    try:
        with open(path, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            content = handle.read()
    except OSError as exc:
        raise _key_error(Reason.UNREADABLE,
                         f"key file {path!r}: cannot read: {exc.strerror}") from None
    if mode & FORBIDDEN_FILE_MODE:
        raise _key_error(
            Reason.UNREADABLE,
            f"key file {path!r} has mode {stat.S_IMODE(mode):04o}: "
            + " and ".join(w for bits, w in ((stat.S_IRWXO, "others have access"),
                                             (stat.S_IWGRP, "the group may write it"))
                           if mode & bits)
            + "; make it 0400 (or 0440 with the reader's group)",
        )
    if not content.strip():
        raise _key_error(Reason.UNREADABLE, f"key file {path!r} is empty")
    return _strong(content.strip(), "key file")


def accepted_keys(key: bytes | Sequence[bytes]) -> list[bytes]:
    """One key, or several during a rotation, as a list (the first one signs).

    Raises :class:`WireError` (``no-key``, ``weak-key``) for an empty list or a short key.
    """
    keys = [key] if isinstance(key, bytes | bytearray) else list(key)
    if not keys:
        raise _key_error(Reason.NO_KEY, "none given")
    for k in keys:
        if not isinstance(k, bytes | bytearray) or len(k) < MIN_KEY_BYTES:
            raise _key_error(Reason.WEAK_KEY,
                             f"keys must be bytes of at least {MIN_KEY_BYTES} bytes")
    return [bytes(k) for k in keys]


def mac(key: bytes, message: bytes) -> str:
    """HMAC-SHA256 of ``message`` under ``key`` in unpadded base64url (43 characters)."""
    return mac_bytes(key, message)[:43].decode("ascii")


def mac_bytes(key: bytes, message: bytes) -> bytes:
    """:func:`mac` as ASCII bytes (44 long: the 43 characters and one ``=`` of padding).

    HMAC (RFC 2104) from the SHA-256 states after the key's inner and outer pads, computed once
    per key: a signaler checks one summary per sidecar per epoch, and both ``hmac.new`` and
    OpenSSL 3's one-shot ``hmac.digest`` set the key up anew on every call (2-3 times the
    cost of hashing a summary)."""
    inner_pad, outer_pad = _pads(key)
    inner = inner_pad.copy()
    inner.update(message)
    outer = outer_pad.copy()
    outer.update(inner.digest())
    return base64.urlsafe_b64encode(outer.digest())


@functools.lru_cache(maxsize=16)
def _pads(key: bytes) -> tuple[Any, Any]:
    """SHA-256 after ``key XOR ipad`` and after ``key XOR opad`` (RFC 2104, block 64 bytes)."""
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    return (hashlib.sha256(key.translate(_IPAD)), hashlib.sha256(key.translate(_OPAD)))


_BLOCK = 64
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


def verify_mac(keys: Sequence[bytes], message: bytes, signature: str) -> bool:
    """Whether ``signature`` is the MAC of ``message`` under any of ``keys``.

    Compares against every key without an early exit, in constant time per key, so timing
    does not reveal which key matched.
    """
    expected = signature.encode("ascii", "replace")
    matched = False
    for candidate in keys:
        matched |= hmac.compare_digest(mac(bytes(candidate), message).encode("ascii"), expected)
    return matched
