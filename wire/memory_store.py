"""The signal store in memory: the same behaviour as Redis, on a clock passed in.

Owns :class:`MemorySignalStore`, a :class:`wire.store.SignalStore` for unit tests, the simulator
and the benchmarks: streams with ``"<ms>-<seq>"`` ids, one consumer group per summary stream
with its pending entries, trimming, the lease with its time-to-live and the fence counter, and
the fenced append, each as the Redis commands and scripts of :mod:`wire.redis_store` do it.
Must not read a clock of its own (entry ids and lease expiry use the clock it is given), nor
do any I/O. Every operation completes at once; nothing is shared between instances.

Differences that do not matter to the callers: trimming is exact (Redis's ``MAXLEN ~`` keeps
at least as many), and :meth:`MemorySignalStore.claim_pending` scans every pending entry at
once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from wire.keys import (
    RECOMMENDATION_MAXLEN,
    SIGNALER_GROUP,
    SUMMARY_MAXLEN,
    fence_key,
    leader_key,
    recommendation_stream,
    summary_stream,
)
from wire.store import (
    FUTURE_ID_SLACK,
    Exchanged,
    Fields,
    KeyTypeError,
    RawFields,
    StoreError,
    StreamEntry,
    upstream_of_summary_stream,
)

_Id = tuple[int, int]
_ZERO: _Id = (0, 0)


def _text_id(entry_id: _Id) -> str:
    return f"{entry_id[0]}-{entry_id[1]}"


def _parse_id(text: str) -> _Id:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _as_bytes(value: object) -> bytes:
    """What Redis keeps of a field name or value (redis-py encodes text as UTF-8)."""
    if isinstance(value, bytes):
        return value
    return str(value).encode()


@dataclass(slots=True)
class _Group:
    last_delivered: _Id = _ZERO
    pending: dict[_Id, str] = field(default_factory=dict)  # entry id -> consumer


@dataclass(slots=True)
class _Stream:
    entries: dict[_Id, RawFields] = field(default_factory=dict)  # insertion order = id order
    last_id: _Id = _ZERO
    groups: dict[str, _Group] = field(default_factory=dict)


class MemorySignalStore:
    """A :class:`wire.store.SignalStore` in memory; ``clock()`` is unix time in seconds."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._streams: dict[str, _Stream] = {}
        self._values: dict[str, tuple[str, float | None]] = {}  # key -> (value, expires at)

    # ------------------------------------------------------------------ plain keys

    def _get(self, key: str) -> str | None:
        if key in self._streams:
            raise KeyTypeError("WRONGTYPE", key)
        held = self._values.get(key)
        if held is None:
            return None
        value, expires = held
        if expires is not None and self.clock() >= expires:
            del self._values[key]
            return None
        return value

    def _set(self, key: str, value: str, ttl_ms: int | None = None) -> None:
        expires = None if ttl_ms is None else self.clock() + ttl_ms / 1000.0
        self._values[key] = (value, expires)

    def _check_stream(self, key: str) -> None:
        """A key holding a plain value is no stream (Redis: ``WRONGTYPE``)."""
        if key in self._values and self._get(key) is not None:
            raise KeyTypeError("WRONGTYPE", key)

    # ------------------------------------------------------------------ streams

    def _append(self, key: str, fields: Fields, maxlen: int) -> str:
        self._check_stream(key)
        stream = self._streams.setdefault(key, _Stream())
        ms = max(int(self.clock() * 1000), 0)
        last_ms, last_seq = stream.last_id
        entry_id = (ms, 0) if ms > last_ms else (last_ms, last_seq + 1)
        stream.last_id = entry_id
        entry: dict[bytes | str, bytes | str] = {
            _as_bytes(k): _as_bytes(v) for k, v in fields.items()}
        stream.entries[entry_id] = entry
        excess = len(stream.entries) - maxlen
        if excess > 0:  # the oldest go; pending references to them stay, as in Redis
            for old in list(stream.entries)[:excess]:
                del stream.entries[old]
        return _text_id(entry_id)

    def _newest(self, key: str, count: int) -> list[StreamEntry]:
        self._check_stream(key)
        stream = self._streams.get(key)
        if stream is None or count <= 0:
            return []
        ids = list(stream.entries)[-count:]
        return [StreamEntry(_text_id(i), stream.entries[i]) for i in reversed(ids)]

    def _group(self, upstream: str) -> tuple[_Stream, _Group]:
        self._check_stream(summary_stream(upstream))
        stream = self._streams.setdefault(summary_stream(upstream), _Stream())
        group = stream.groups.setdefault(SIGNALER_GROUP, _Group())
        return stream, group

    # ------------------------------------------------------------------ the sidecar's side

    async def exchange(
        self,
        summaries: Sequence[tuple[str, Fields]],
        wanted: Sequence[tuple[str, str]],
    ) -> Exchanged:
        failed: dict[str, KeyTypeError] = {}
        for upstream, fields in summaries:
            try:
                self._append(summary_stream(upstream), fields, SUMMARY_MAXLEN)
            except KeyTypeError as exc:
                failed[upstream] = exc
        out: list[StreamEntry | KeyTypeError | None] = []
        for upstream, sidecar in wanted:
            try:
                newest = self._newest(recommendation_stream(upstream, sidecar), 1)
            except KeyTypeError as exc:
                out.append(exc)
                continue
            out.append(newest[0] if newest else None)
        return Exchanged(out, failed)

    # ------------------------------------------------------------------ the signaler's side

    async def upstreams(self) -> set[str]:
        # as SCAN: whatever the type of the key (a wrong-typed one is found, and fails later)
        found = (upstream_of_summary_stream(key) for key in [*self._streams, *self._values])
        return {u for u in found if u is not None}

    async def ping(self) -> None:
        """Always answers (in memory)."""

    async def ensure_group(self, upstream: str) -> None:
        self._group(upstream)

    async def newest_summaries(self, upstream: str, count: int) -> list[StreamEntry]:
        return self._newest(summary_stream(upstream), count)

    async def repair_summaries(self, upstream: str, now: float) -> bool:
        key = summary_stream(upstream)
        self._check_stream(key)
        stream = self._streams.get(key)
        if stream is None or stream.last_id[0] <= (now + FUTURE_ID_SLACK) * 1000:
            return False
        del self._streams[key]
        return True

    async def read_summaries(
        self, upstream: str, consumer: str, count: int
    ) -> list[StreamEntry]:
        stream, group = self._group(upstream)
        fresh = [i for i in stream.entries if i > group.last_delivered][:max(count, 0)]
        for entry_id in fresh:
            group.pending[entry_id] = consumer
        if fresh:
            group.last_delivered = fresh[-1]
        return [StreamEntry(_text_id(i), stream.entries[i]) for i in fresh]

    async def claim_pending(
        self, upstream: str, consumer: str, start: str, count: int
    ) -> tuple[str, list[StreamEntry]]:
        key = summary_stream(upstream)
        self._check_stream(key)
        stream = self._streams.get(key)
        group = stream.groups.get(SIGNALER_GROUP) if stream is not None else None
        if stream is None or group is None:
            raise StoreError("ResponseError", f"NOGROUP no stream {key} or group {SIGNALER_GROUP}")
        first = _parse_id(start)
        ids = sorted(i for i in group.pending if i >= first)
        batch, rest = ids[:max(count, 1)], ids[max(count, 1):]
        claimed: list[StreamEntry] = []
        for entry_id in batch:
            fields = stream.entries.get(entry_id)
            if fields is None:  # trimmed while pending: dropped from the group (Redis 7)
                del group.pending[entry_id]
                continue
            group.pending[entry_id] = consumer
            claimed.append(StreamEntry(_text_id(entry_id), fields))
        return (_text_id(rest[0]) if rest else "0-0"), claimed

    async def ack(self, upstream: str, ids: Sequence[str]) -> None:
        self._check_stream(summary_stream(upstream))
        stream = self._streams.get(summary_stream(upstream))
        group = stream.groups.get(SIGNALER_GROUP) if stream is not None else None
        if group is None:
            return
        for text in ids:
            group.pending.pop(_parse_id(text), None)

    async def seed_fence(self, upstream: str, value: int) -> None:
        key = fence_key(upstream)
        if key not in self._streams and self._get(key) is None:  # SET NX: any type counts
            self._set(key, str(value))

    async def acquire_lease(self, upstream: str, holder: str, ttl_ms: int) -> int:
        key = leader_key(upstream)
        try:
            return self._acquire(key, upstream, holder, ttl_ms)
        except KeyTypeError as exc:  # as the script reports it: against the lease
            raise KeyTypeError(exc.kind, key if exc.kind == "WRONGTYPE" else exc.key) from None

    def _acquire(self, key: str, upstream: str, holder: str, ttl_ms: int) -> int:
        current = self._get(key)
        if current is not None:
            current_holder, _, token = current.partition(" ")
            if current_holder == holder:
                self._set(key, current, ttl_ms)
                return int(token)
            return 0
        fence = self._get(fence_key(upstream)) or "0"
        if not fence.lstrip("-").isascii() or not fence.lstrip("-").isdigit():
            raise KeyTypeError("NOTINTEGER", fence_key(upstream))
        token_value = int(fence) + 1
        self._set(fence_key(upstream), str(token_value))
        self._set(key, f"{holder} {token_value}", ttl_ms)
        return token_value

    async def lease_holder(self, upstream: str) -> str | None:
        value = self._get(leader_key(upstream))
        return None if value is None else value.partition(" ")[0]

    async def release_lease(self, upstream: str, holder: str, token: int) -> bool:
        key = leader_key(upstream)
        if self._get(key) == f"{holder} {token}":
            del self._values[key]
            return True
        return False

    async def publish_recommendation(
        self, upstream: str, sidecar: str, holder: str, token: int, fields: Fields
    ) -> str | None:
        stream = recommendation_stream(upstream, sidecar)
        try:
            if self._get(leader_key(upstream)) != f"{holder} {token}":
                return None
        except KeyTypeError:  # as the script reports it: against the stream it writes
            raise KeyTypeError("WRONGTYPE", stream) from None
        return self._append(recommendation_stream(upstream, sidecar), fields,
                            RECOMMENDATION_MAXLEN)

    async def publish_recommendations(
        self, upstream: str, holder: str, token: int, batch: Sequence[tuple[str, Fields]]
    ) -> list[str | KeyTypeError | None]:
        out: list[str | KeyTypeError | None] = []
        for sidecar, fields in batch:
            try:
                out.append(await self.publish_recommendation(
                    upstream, sidecar, holder, token, fields))
            except KeyTypeError as exc:
                out.append(exc)
        return out

    async def close(self) -> None:
        """Nothing to release."""

    # ------------------------------------------------------------------ for tests

    def set_value(self, key: str, value: str) -> None:
        """``SET key value``: replaces whatever the key held, a stream too (to plant the
        wrong-typed keys Redis would hold after a stray ``SET``)."""
        self._streams.pop(key, None)
        self._set(key, value)

    def pending(self, upstream: str) -> int:
        """How many summary entries the group has delivered and not yet seen acknowledged."""
        stream = self._streams.get(summary_stream(upstream))
        group = stream.groups.get(SIGNALER_GROUP) if stream is not None else None
        return 0 if group is None else len(group.pending)

    def entries(self, key: str) -> list[tuple[str, RawFields]]:
        """Every entry of the stream ``key``, oldest first."""
        stream = self._streams.get(key)
        if stream is None:
            return []
        return [(_text_id(i), f) for i, f in stream.entries.items()]
