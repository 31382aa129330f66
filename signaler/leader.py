"""Leadership of an upstream among signaler replicas: a lease fenced by a token.

Owns what each replica believes about its leadership, and taking, renewing and giving up the
lease ``eq:{u}:leader`` and publishing only while it is held, through the signal store
(:class:`wire.store.SignalStore`; over Redis, the atomic parts are the Lua scripts
``LEASE_ACQUIRE_LUA``, ``LEASE_RELEASE_LUA`` and ``FENCED_XADD_LUA``). Must not talk to Redis
itself.

The rule. Every replica tries to take or renew the lease of every upstream once per epoch, with
a time-to-live of a few epochs. The holder renews it and stays leader; the others get 0 and
stand by. When the leader dies its lease expires and the next standby to try becomes leader
with a fencing token strictly larger than every earlier one (``INCR eq:{u}:fence``). A deposed
leader that still runs (a long GC pause, a partition) cannot publish: the store's fenced append
succeeds only while the caller's exact ``holder token`` is the lease value, and sidecars also
refuse recommendations with a token below the highest they have seen (``fenced``).

The holder written in the lease is ``<id>.<instance>``, the replica's id plus a random suffix
drawn at start: two processes started with the same id are two holders, so the second cannot
"renew" the first one's lease and publish beside it; it stands by, and
:meth:`LeaseClient.is_namesake` tells it why.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from wire.store import Fields, KeyTypeError, SignalStore

INSTANCE_SUFFIX_CHARS = 12
"""Hex characters of the random instance suffix of a lease holder (``<id>.<suffix>``)."""


@dataclass(slots=True)
class Leadership:
    """What one replica holds: upstream -> fencing token (absent = standing by)."""

    holder: str
    tokens: dict[str, int] = field(default_factory=dict)

    def update(self, upstream: str, token: int) -> str:
        """Record the outcome of an acquire; returns ``"elected"``, ``"renewed"``,
        ``"deposed"`` or ``"standby"``."""
        before = self.tokens.get(upstream)
        if token > 0:
            self.tokens[upstream] = token
            return "renewed" if before == token else "elected"
        self.tokens.pop(upstream, None)
        return "deposed" if before is not None else "standby"

    def token(self, upstream: str) -> int | None:
        return self.tokens.get(upstream)

    def lose(self, upstream: str) -> None:
        self.tokens.pop(upstream, None)


class LeaseClient:
    """Takes, renews and gives up leases in a :class:`wire.store.SignalStore`, and publishes
    only under the lease; keeps what this replica believes about its leadership."""

    def __init__(self, store: SignalStore, signer: str, ttl_seconds: float,
                 instance: str | None = None) -> None:
        if ttl_seconds <= 0:
            raise ValueError("the lease time-to-live must be positive")
        self.store = store
        self.signer = signer
        suffix = instance or secrets.token_hex(INSTANCE_SUFFIX_CHARS // 2)
        self.leadership = Leadership(f"{signer}.{suffix}")
        self.ttl_ms = max(1, int(ttl_seconds * 1000))

    def is_namesake(self, holder: str) -> bool:
        """Whether ``holder`` (a lease value's holder) is another instance with this id."""
        name, _, suffix = holder.rpartition(".")
        return (name == self.signer and holder != self.holder
                and len(suffix) == INSTANCE_SUFFIX_CHARS)

    @property
    def holder(self) -> str:
        return self.leadership.holder

    async def acquire(self, upstream: str) -> tuple[int, str]:
        """Take or renew ``upstream``'s lease: (token or 0, transition; see
        :meth:`Leadership.update`)."""
        token = await self.store.acquire_lease(upstream, self.holder, self.ttl_ms)
        return token, self.leadership.update(upstream, token)

    async def release(self, upstream: str) -> bool:
        """Give the lease up if it is still ours (graceful shutdown lets a standby take over
        at once instead of after the time-to-live)."""
        token = self.leadership.token(upstream)
        if token is None:
            return False
        self.leadership.lose(upstream)
        return await self.store.release_lease(upstream, self.holder, token)

    async def publish_all(
        self, upstream: str, batch: Sequence[tuple[str, Fields]]
    ) -> list[str | KeyTypeError | None] | None:
        """:meth:`publish` for a whole epoch's recommendations in one round trip; None when
        not leading or fenced off (then the leadership is dropped), else per sidecar its entry
        id or the :class:`KeyTypeError` of its stream alone."""
        token = self.leadership.token(upstream)
        if token is None:
            return None
        results = await self.store.publish_recommendations(upstream, self.holder, token, batch)
        if any(result is None for result in results):
            self.leadership.lose(upstream)
            return None
        return results

    async def publish(self, upstream: str, sidecar: str, fields: Fields) -> str | None:
        """Append ``fields`` to ``sidecar``'s recommendation stream only while this replica
        still holds ``upstream``'s lease under its token; returns the entry id, or None when
        fenced off (the leadership is then dropped)."""
        token = self.leadership.token(upstream)
        if token is None:
            return None
        entry_id = await self.store.publish_recommendation(
            upstream, sidecar, self.holder, token, fields)
        if entry_id is None:
            self.leadership.lose(upstream)
        return entry_id
