"""The signaler's leader lease: the value of ``eq:{u}:leader`` and the Lua scripts around it.

Owns :class:`Lease` (``"<holder> <fence>"``) and its codec, and the three server-side scripts
that make leadership safe (docs/protocol.md, "Leader lease and fencing"): take or renew the
lease with a fencing token, release it, and publish only while holding it. The scripts live
in ``wire/lua/*.lua`` (package data) and are read once at import through
:mod:`importlib.resources`; running them is the caller's business (``EVAL``/``EVALSHA``).
Pure otherwise: no Redis client, no clock.

Fencing tokens follow Kleppmann's argument ("How to do distributed locking", 2016): a lease
alone cannot stop a paused leader from writing late, a monotonically increasing token checked
at the write can.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files

from wire.entries import MAX_EPOCH, check_int, check_name, fail, parse_int, short, text

__all__ = [
    "FENCED_XADD_BATCH_LUA",
    "FENCED_XADD_LUA",
    "LEASE_ACQUIRE_LUA",
    "LEASE_RELEASE_LUA",
    "Lease",
    "decode_lease",
    "encode_lease",
    "lua_script",
]


def lua_script(name: str) -> str:
    """The text of ``wire/lua/<name>.lua``."""
    return files("wire").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


LEASE_ACQUIRE_LUA = lua_script("lease_acquire")
"""Take or renew the lease for one upstream (KEYS leader, fence; ARGV holder, ttl ms): the
holder's fencing token, or 0 while another holder leads."""
LEASE_RELEASE_LUA = lua_script("lease_release")
"""Give the lease up only if it is still ours (KEYS leader; ARGV holder, token): 1 if released."""
FENCED_XADD_LUA = lua_script("fenced_xadd")
"""XADD only as the current leader (KEYS leader, stream; ARGV holder, token, maxlen, fields...):
the entry id, or nil when fenced off."""
FENCED_XADD_BATCH_LUA = lua_script("fenced_xadd_batch")
"""Many XADDs only as the current leader, in one call (KEYS leader, streams...; ARGV holder,
token, maxlen, then the entries' fields with what they share given once): per entry its id or
``!<error>``, or nil when fenced off (nothing appended)."""


@dataclass(frozen=True, slots=True)
class Lease:
    """The value of ``eq:{u}:leader``: who leads and under which fencing token."""

    holder: str
    fence: int

    def __post_init__(self) -> None:
        check_name(self.holder, "lease holder")
        check_int(self.fence, "fence", 1, MAX_EPOCH)


def encode_lease(lease: Lease) -> str:
    """``"<holder> <fence>"`` (the format the Lua scripts read and write)."""
    return f"{lease.holder} {lease.fence}"


def decode_lease(raw: bytes | str) -> Lease:
    """Parse a lease value; raises :class:`~wire.errors.WireError` (``malformed``)."""
    value = text(raw, "lease")
    holder, sep, fence = value.partition(" ")
    if not sep:
        raise fail(f"lease must be '<holder> <fence>', got {short(value)}")
    return Lease(holder=holder, fence=parse_int(fence, "lease fence"))
