"""Leadership of an upstream among signaler replicas: a Redis lease fenced by a token.

Owns taking, renewing and giving up the lease ``eq:{u}:leader`` and publishing only while it is
held. The atomic parts are the Lua scripts of :mod:`wire.lease` (``LEASE_ACQUIRE_LUA``,
``LEASE_RELEASE_LUA``, ``FENCED_XADD_LUA``); this module runs them with redis-py's asyncio
client and keeps what each replica believes about its leadership.

The rule. Every replica tries to take or renew the lease of every upstream once per epoch, with
a time-to-live of a few epochs. The holder renews it and stays leader; the others get 0 and
stand by. When the leader dies its lease expires and the next standby to try becomes leader
with a fencing token strictly larger than every earlier one (``INCR eq:{u}:fence``). A deposed
leader that still runs (a long GC pause, a partition) cannot publish: ``FENCED_XADD_LUA``
appends only while the caller's exact ``holder token`` is the lease value, and sidecars also
refuse recommendations with a token below the highest they have seen (``fenced``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from wire.keys import fence_key, leader_key
from wire.lease import FENCED_XADD_LUA, LEASE_ACQUIRE_LUA, LEASE_RELEASE_LUA


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
    """Runs the lease scripts against one ``redis.asyncio.Redis`` client."""

    def __init__(self, redis: Any, holder: str, ttl_seconds: float) -> None:
        if ttl_seconds <= 0:
            raise ValueError("the lease time-to-live must be positive")
        self.redis = redis
        self.leadership = Leadership(holder)
        self.ttl_ms = max(1, int(ttl_seconds * 1000))
        self._acquire = redis.register_script(LEASE_ACQUIRE_LUA)
        self._release = redis.register_script(LEASE_RELEASE_LUA)
        self._publish = redis.register_script(FENCED_XADD_LUA)

    @property
    def holder(self) -> str:
        return self.leadership.holder

    async def acquire(self, upstream: str) -> tuple[int, str]:
        """Take or renew ``upstream``'s lease: (token or 0, transition; see
        :meth:`Leadership.update`)."""
        raw = await self._acquire(
            keys=[leader_key(upstream), fence_key(upstream)], args=[self.holder, self.ttl_ms]
        )
        token = int(raw or 0)
        return token, self.leadership.update(upstream, token)

    async def release(self, upstream: str) -> bool:
        """Give the lease up if it is still ours (graceful shutdown lets a standby take over
        at once instead of after the time-to-live)."""
        token = self.leadership.token(upstream)
        if token is None:
            return False
        self.leadership.lose(upstream)
        released = await self._release(keys=[leader_key(upstream)], args=[self.holder, token])
        return bool(released)

    async def publish(
        self, upstream: str, stream: str, fields: dict[str, str], maxlen: int
    ) -> str | None:
        """XADD ``fields`` to ``stream`` (MAXLEN ~ ``maxlen``) only while this replica still
        holds ``upstream``'s lease under its token; returns the entry id, or None when fenced
        off (the leadership is then dropped)."""
        token = self.leadership.token(upstream)
        if token is None:
            return None
        args: list[Any] = [self.holder, token, maxlen]
        for name, value in fields.items():
            args += [name, value]
        entry_id = await self._publish(keys=[leader_key(upstream), stream], args=args)
        if entry_id is None:
            self.leadership.lose(upstream)
            return None
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
