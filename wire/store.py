"""The signal store seam: what the sidecars and the signaler exchange, and nothing else.

Owns the :class:`SignalStore` protocol, the operations the signaling plane needs from its
shared store, in the plane's own words (summaries, recommendations, the leader lease), plus the
two value types they carry. Two implementations keep the same behaviour (one contract test runs
against both): :class:`wire.redis_store.RedisSignalStore`, the real one over Redis streams, and
:class:`wire.memory_store.MemorySignalStore`, in memory on a clock passed in, for unit tests,
the simulator and the benchmarks. Must not hold any policy: what to publish, what to follow and
when is decided by the callers (``sidecar.signaling``, ``signaler.service``).

The semantics every implementation keeps:

* **Summaries** go to one stream per upstream (``eq:{u}:summaries``), trimmed to about
  ``SUMMARY_MAXLEN`` entries. The signaler reads them as the consumer group ``SIGNALER_GROUP``:
  :meth:`~SignalStore.read_summaries` hands out entries not yet delivered to the group and keeps
  each pending for its consumer until :meth:`~SignalStore.ack`; a new leader takes over what a
  crashed one left pending with :meth:`~SignalStore.claim_pending`, and warms up from the newest
  entries with :meth:`~SignalStore.newest_summaries` whether they were acknowledged or not.
  A lost group (the store restarted empty) is created again by the next read.
* **Recommendations** go to one stream per upstream and sidecar (``eq:{u}:recs:<id>``), trimmed
  to about ``RECOMMENDATION_MAXLEN``; only the newest matters to the sidecar.
* **The lease** ``eq:{u}:leader`` (``"<holder> <token>"`` with a time-to-live) and the fence
  counter ``eq:{u}:fence``: :meth:`~SignalStore.acquire_lease` renews the holder's lease or, when
  none is held, takes it under a token one above the counter; a recommendation is appended
  only while the publisher's exact ``holder token`` is the lease value, atomically.

Entry ids are text (``"<ms>-<seq>"``, increasing within a stream); fields read back are bytes,
as Redis stores them. A store that cannot answer raises :class:`StoreError` (the services fall
back and retry); ``OSError`` and ``TimeoutError`` may also come through.

One key holding the wrong type of value (a string where a stream belongs, a counter that is
not an integer: a stray ``SET``, an operator's mistake, an attack) is not the store failing:
it raises :class:`KeyTypeError`, a :class:`StoreError` that names the key and its upstream, so
the callers isolate it to that upstream (``exchange`` reports it per key instead of raising)
and every other upstream carries on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from wire.keys import key_role

Fields = Mapping[str, str]
"""What is written: an encoded summary or a signed recommendation (field -> text value)."""

RawFields = Mapping[bytes | str, bytes | str]
"""What is read back: bytes, as the store keeps them (typed as the codecs accept them)."""

_UPSTREAM_IN_KEY = re.compile(r"^eq:\{([A-Za-z0-9][A-Za-z0-9._-]{0,127})\}:summaries$")


FUTURE_ID_SLACK = 100 * 365.25 * 86400.0
"""How far past the reader's clock a summary stream's last id may lie before
:meth:`SignalStore.repair_summaries` takes it for planted: a century, beyond any clock's
error (a test's clock set a year back included), and short of the largest id (year
584,556,019) and of any id close enough to it to exhaust the stream."""


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """One stream entry: its id and fields (None for an entry trimmed away while pending)."""

    id: str
    fields: RawFields | None


class StoreError(Exception):
    """The store failed to answer: unreachable, too slow, or it refused the command.

    ``kind`` names the underlying failure (e.g. ``ConnectionError``), for the error metrics.
    """

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(detail or kind)
        self.kind = kind


class KeyTypeError(StoreError):
    """One key of the plane holds a value of the wrong type: a problem of its upstream only.

    ``key`` is the key, ``upstream`` its upstream, ``role`` what the key is for (``summaries``,
    ``recs``, ``leader``, ``fence``; a metric label), ``kind`` the store's word for it
    (``WRONGTYPE``, ``NOTINTEGER``, ``EXHAUSTED``: :func:`wire.redis_store._key_type`).
    """

    def __init__(self, kind: str, key: str, detail: str = "") -> None:
        super().__init__(kind, detail or f"{kind} on {key}")
        self.key = key
        self.upstream, self.role = key_role(key)


class Exchanged(list["StreamEntry | KeyTypeError | None"]):
    """What :meth:`SignalStore.exchange` returns: the newest recommendation of each wanted
    ``(upstream, sidecar)`` in the order asked (None where there is none, a
    :class:`KeyTypeError` where that stream's key holds something else), and in
    ``append_errors`` the upstreams whose summary could not be appended for the same reason.
    """

    append_errors: dict[str, KeyTypeError]

    def __init__(self, items: Sequence[StreamEntry | KeyTypeError | None] = (),
                 append_errors: Mapping[str, KeyTypeError] | None = None) -> None:
        super().__init__(items)
        self.append_errors = dict(append_errors or {})


def error_kind(exc: BaseException) -> str:
    """The label an error is counted under: a :class:`StoreError`'s kind, else its type."""
    return exc.kind if isinstance(exc, StoreError) else type(exc).__name__


_AUTH_KINDS = ("AuthenticationError", "AuthenticationWrongNumberOfArgsError")
_AUTH_TEXTS = ("NOAUTH", "WRONGPASS", "invalid username-password",
               "HELLO must be called with the client already authenticated")


def refusal(exc: BaseException) -> str | None:
    """What Redis refused, when ``exc`` says it answered but would not serve this client:
    ``"authentication"`` (no user and password, or wrong ones) or ``"permissions"`` (its
    ACL user may not run a command); None for any other failure (unreachable, slow, ...).
    Both are settings to fix, not an outage to wait out."""
    kind, text = error_kind(exc), str(exc)
    if kind in _AUTH_KINDS or any(t in text for t in _AUTH_TEXTS):
        return "authentication"
    if kind == "NoPermissionError" or text.startswith("NOPERM") \
            or "no permissions to run" in text:
        return "permissions"
    return None


def upstream_of_summary_stream(key: str) -> str | None:
    """The upstream whose summary stream ``key`` is, or None for any other key."""
    match = _UPSTREAM_IN_KEY.match(key)
    return match.group(1) if match else None


class SignalStore(Protocol):
    """The store of the signaling plane (see the module docstring for the semantics)."""

    # ---------------------------------------------------------------- the sidecar's side

    async def exchange(
        self,
        summaries: Sequence[tuple[str, Fields]],
        wanted: Sequence[tuple[str, str]],
    ) -> Exchanged:
        """In one round trip: append each ``(upstream, summary fields)``, then read the newest
        recommendation of each ``(upstream, sidecar)`` in ``wanted`` (None where there is none),
        in the order asked. A wrong-typed key fails only its own append or read (reported in
        the :class:`Exchanged`, never raised)."""
        ...

    # ---------------------------------------------------------------- the signaler's side

    async def upstreams(self) -> set[str]:
        """Every upstream that has a summary stream."""
        ...

    async def ping(self) -> None:
        """One round trip that touches no key: raises :class:`StoreError` when the store does
        not answer (a signaler's epoch with nothing else to do still learns whether it
        could)."""
        ...

    async def ensure_group(self, upstream: str) -> None:
        """Create the consumer group on ``upstream``'s summary stream (and the stream) if
        missing; the group starts before the first entry."""
        ...

    async def newest_summaries(self, upstream: str, count: int) -> list[StreamEntry]:
        """Up to ``count`` of the newest summary entries, newest first (no group involved)."""
        ...

    async def repair_summaries(self, upstream: str, now: float) -> bool:
        """Delete ``upstream``'s summary stream if its last id lies more than
        :data:`FUTURE_ID_SLACK` seconds past ``now`` (unix time): only an append with an id
        of its own choosing puts it there (``XADD`` with an explicit id; at the largest there
        is, every sidecar's append fails for good), and the sidecars' next appends start the
        stream again. True if it was deleted; False for a stream that is fine or missing.
        :class:`StoreError` when the store may not look (an older ACL without
        ``XINFO STREAM``)."""
        ...

    async def read_summaries(
        self, upstream: str, consumer: str, count: int
    ) -> list[StreamEntry]:
        """Up to ``count`` entries never delivered to the group, oldest first; each stays
        pending for ``consumer`` until acknowledged. Creates the group when it was lost."""
        ...

    async def claim_pending(
        self, upstream: str, consumer: str, start: str, count: int
    ) -> tuple[str, list[StreamEntry]]:
        """Take over up to ``count`` pending entries (of any consumer) from id ``start`` on:
        (the id to continue from, or ``"0-0"`` when done; the entries, now ``consumer``'s).
        The group must exist (:class:`StoreError` ``NOGROUP`` otherwise)."""
        ...

    async def ack(self, upstream: str, ids: Sequence[str]) -> None:
        """Acknowledge entries: they are no longer pending."""
        ...

    async def seed_fence(self, upstream: str, value: int) -> None:
        """Set the fence counter to ``value`` unless it exists (see ``signaler.service``)."""
        ...

    async def acquire_lease(self, upstream: str, holder: str, ttl_ms: int) -> int:
        """Renew ``holder``'s lease, or take a free one under a new token; the holder's token,
        or 0 while another holder leads."""
        ...

    async def lease_holder(self, upstream: str) -> str | None:
        """Who holds ``upstream``'s lease now (the holder part of its value), or None."""
        ...

    async def release_lease(self, upstream: str, holder: str, token: int) -> bool:
        """Give the lease up if it is still ``holder``'s under ``token``; True if released."""
        ...

    async def publish_recommendation(
        self, upstream: str, sidecar: str, holder: str, token: int, fields: Fields
    ) -> str | None:
        """Append to the sidecar's recommendation stream only while ``holder`` holds the lease
        under ``token`` (atomically); the entry id, or None when fenced off."""
        ...

    async def publish_recommendations(
        self, upstream: str, holder: str, token: int, batch: Sequence[tuple[str, Fields]]
    ) -> list[str | KeyTypeError | None]:
        """:meth:`publish_recommendation` for many sidecars in one round trip: per item, in
        order, the entry id, None when fenced off, or the :class:`KeyTypeError` of that
        sidecar's stream alone (the others are still published)."""
        ...

    async def close(self) -> None:
        """Release connections; the store may be used again (it reconnects)."""
        ...
