"""The signal store over Redis: streams, one consumer group, and the lease scripts.

Owns :class:`RedisSignalStore`, the real :class:`wire.store.SignalStore`: its asyncio Redis
client (every round trip fails fast: short socket timeouts, no hidden retries), the commands
behind each operation (``XADD ... MAXLEN ~``, ``XREVRANGE``, ``XGROUP CREATE``,
``XREADGROUP``, ``XAUTOCLAIM``, ``XACK``, ``SCAN``, ``SET NX``) and the atomic Lua scripts of
the lease (``LEASE_ACQUIRE_LUA``, ``LEASE_RELEASE_LUA``, ``FENCED_XADD_LUA``). Every Redis
error comes out as :class:`wire.store.StoreError` named after it, except a key of the wrong
type (``WRONGTYPE``, a fence that is no integer), which is a :class:`wire.store.KeyTypeError`
naming the key (in :meth:`RedisSignalStore.exchange`, reported per key in the reply, the other
commands of the pipeline still answered). Must not decide anything: what to publish, follow
or lead is the callers' business.

The client is made on first use and dropped by :meth:`RedisSignalStore.close`; the next call
connects again (after a failure the services close it to start from a fresh connection).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from wire.keys import (
    RECOMMENDATION_MAXLEN,
    RECOMMENDATION_TTL_MS,
    SIGNALER_GROUP,
    SUMMARY_MAXLEN,
    fence_key,
    leader_key,
    recommendation_stream,
    summary_stream,
)
from wire.lease import (
    FENCED_XADD_BATCH_LUA,
    FENCED_XADD_LUA,
    LEASE_ACQUIRE_LUA,
    LEASE_RELEASE_LUA,
)
from wire.store import (
    FUTURE_ID_SLACK,
    Exchanged,
    Fields,
    KeyTypeError,
    StoreError,
    StreamEntry,
    upstream_of_summary_stream,
)


def make_client(url: str, timeout: float) -> aioredis.Redis:
    """An asyncio Redis client whose every round trip fails fast (no hidden retries)."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry(raw: Any) -> StreamEntry:
    entry_id, fields = raw
    return StreamEntry(_text(entry_id), fields)


def _key_type(exc: BaseException) -> str | None:
    """The kind of a reply error that is about one key's value, else None (also when raised
    inside one of the Lua scripts, whose errors carry the same words): ``WRONGTYPE`` (a key
    of another type), ``NOTINTEGER`` (a counter that is no integer, or one ``INCR`` would
    overflow), ``EXHAUSTED`` (a stream whose last id is the largest there is: ``XADD *``
    fails on it forever). Whoever can write to Redis can plant any of them; each fails only
    its key's upstream, never the whole exchange or epoch."""
    if not isinstance(exc, ResponseError):
        return None
    text = str(exc)
    if "WRONGTYPE" in text:
        return "WRONGTYPE"
    if "not an integer" in text or "would overflow" in text:
        return "NOTINTEGER"
    if "exhausted the last possible ID" in text:
        return "EXHAUSTED"
    return None


@contextlib.asynccontextmanager
async def _redis_errors(key: str | None = None, integer_key: str | None = None
                        ) -> AsyncIterator[None]:
    """Redis errors as :class:`StoreError`; about ``key``'s type (or the counter
    ``integer_key``'s value) as :class:`KeyTypeError`."""
    try:
        yield
    except RedisError as exc:
        kind = _key_type(exc)
        if kind is not None and key is not None:
            raise KeyTypeError(kind, (integer_key or key) if kind == "NOTINTEGER" else key,
                               str(exc)) from exc
        raise StoreError(type(exc).__name__, str(exc) or type(exc).__name__) from exc


class RedisSignalStore:
    """A :class:`wire.store.SignalStore` on the Redis at ``url`` (``timeout`` per round trip)."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self._redis: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            self._redis = make_client(self.url, self.timeout)
            self._scripts = {
                "acquire": self._redis.register_script(LEASE_ACQUIRE_LUA),
                "release": self._redis.register_script(LEASE_RELEASE_LUA),
                "publish": self._redis.register_script(FENCED_XADD_LUA),
                "publish_batch": self._redis.register_script(FENCED_XADD_BATCH_LUA),
            }
        return self._redis

    async def close(self) -> None:
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
            self._redis = None
            self._scripts = {}

    # ------------------------------------------------------------------ the sidecar's side

    async def exchange(
        self,
        summaries: Sequence[tuple[str, Fields]],
        wanted: Sequence[tuple[str, str]],
    ) -> Exchanged:
        keys = [summary_stream(upstream) for upstream, _ in summaries]
        keys += [recommendation_stream(upstream, sidecar) for upstream, sidecar in wanted]
        async with _redis_errors():
            pipe = self._client().pipeline(transaction=False)
            for key, (_, fields) in zip(keys, summaries, strict=False):
                entry: dict[Any, Any] = dict(fields)
                pipe.xadd(key, entry, maxlen=SUMMARY_MAXLEN, approximate=True)
            for key in keys[len(summaries):]:
                pipe.xrevrange(key, count=1)
            replies = await pipe.execute(raise_on_error=False)
        answers: list[Any] = []
        for key, reply in zip(keys, replies, strict=True):
            if isinstance(reply, Exception):
                kind = _key_type(reply)
                if kind is None:  # anything but one key's type fails the whole exchange
                    raise StoreError(type(reply).__name__, str(reply)) from reply
                reply = KeyTypeError(kind, key, str(reply))
            answers.append(reply)
        appended, newest = answers[:len(summaries)], answers[len(summaries):]
        return Exchanged(
            [r if isinstance(r, KeyTypeError) else (_entry(r[0]) if r else None) for r in newest],
            {upstream: r for (upstream, _), r in zip(summaries, appended, strict=True)
             if isinstance(r, KeyTypeError)},
        )

    # ------------------------------------------------------------------ the signaler's side

    async def upstreams(self) -> set[str]:
        found: set[str] = set()
        async with _redis_errors():
            async for key in self._client().scan_iter(match="eq:{*}:summaries", count=1000):
                upstream = upstream_of_summary_stream(_text(key))
                if upstream is not None:
                    found.add(upstream)
        return found

    async def ping(self) -> None:
        async with _redis_errors():
            await self._client().ping()

    async def ensure_group(self, upstream: str) -> None:
        async with _redis_errors(summary_stream(upstream)):
            await self._ensure_group(upstream)

    async def _ensure_group(self, upstream: str) -> None:
        try:
            await self._client().xgroup_create(
                summary_stream(upstream), SIGNALER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def newest_summaries(self, upstream: str, count: int) -> list[StreamEntry]:
        async with _redis_errors(summary_stream(upstream)):
            newest: Any = await self._client().xrevrange(summary_stream(upstream), count=count)
        return [_entry(e) for e in newest]

    async def repair_summaries(self, upstream: str, now: float) -> bool:
        key = summary_stream(upstream)
        async with _redis_errors(key):
            try:
                info: Any = await self._client().xinfo_stream(key)
            except ResponseError as exc:
                if "no such key" in str(exc).lower():
                    return False
                raise
        last = info.get("last-generated-id", info.get(b"last-generated-id", b"0-0"))
        last_ms = _text(last).partition("-")[0]
        if not last_ms.isdigit() or int(last_ms) <= (now + FUTURE_ID_SLACK) * 1000:
            return False
        async with _redis_errors(key):
            await self._client().delete(key)
        return True

    async def read_summaries(
        self, upstream: str, consumer: str, count: int
    ) -> list[StreamEntry]:
        stream = summary_stream(upstream)
        async with _redis_errors(stream):
            for attempt in (1, 2):
                try:
                    reply: Any = await self._client().xreadgroup(
                        SIGNALER_GROUP, consumer, {stream: ">"}, count=count)
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc) or attempt == 2:
                        raise
                    await self._ensure_group(upstream)  # the stream or group was lost
                    continue
                return [_entry(e) for e in (reply[0][1] if reply else [])]
        return []

    async def claim_pending(
        self, upstream: str, consumer: str, start: str, count: int
    ) -> tuple[str, list[StreamEntry]]:
        async with _redis_errors(summary_stream(upstream)):
            claim: Any = await self._client().xautoclaim(
                summary_stream(upstream), SIGNALER_GROUP, consumer, min_idle_time=0,
                start_id=start, count=count,
            )
        return _text(claim[0]), [_entry(e) for e in claim[1]]

    async def ack(self, upstream: str, ids: Sequence[str]) -> None:
        if not ids:
            return
        async with _redis_errors(summary_stream(upstream)):
            await self._client().xack(summary_stream(upstream), SIGNALER_GROUP, *ids)

    async def seed_fence(self, upstream: str, value: int) -> None:
        async with _redis_errors(fence_key(upstream)):
            await self._client().set(fence_key(upstream), value, nx=True)

    async def acquire_lease(self, upstream: str, holder: str, ttl_ms: int) -> int:
        async with _redis_errors(leader_key(upstream), fence_key(upstream)):
            self._client()
            raw = await self._scripts["acquire"](
                keys=[leader_key(upstream), fence_key(upstream)], args=[holder, ttl_ms])
        return int(raw or 0)

    async def lease_holder(self, upstream: str) -> str | None:
        async with _redis_errors(leader_key(upstream)):
            raw = await self._client().get(leader_key(upstream))
        return None if raw is None else _text(raw).partition(" ")[0]

    async def release_lease(self, upstream: str, holder: str, token: int) -> bool:
        async with _redis_errors(leader_key(upstream)):
            self._client()
            released = await self._scripts["release"](
                keys=[leader_key(upstream)], args=[holder, token])
        return bool(released)

    async def publish_recommendations(
        self, upstream: str, holder: str, token: int, batch: Sequence[tuple[str, Fields]]
    ) -> list[str | KeyTypeError | None]:
        """One call of the batch script (``FENCED_XADD_BATCH_LUA``) for a whole epoch's
        recommendations: the lease is checked once and every entry appended in the same atomic
        call, with the values all entries share sent once and the others packed in one
        MessagePack argument (a signaler leading an upstream with 1,000 sidecars spent a fifth
        of its CPU packing 1,000 pipelined script calls, then some 6 % of what was left packing
        one call's thousands of arguments). Entries with different field names fall back to
        one fenced script call each, pipelined."""
        if not batch:
            return []
        names = list(batch[0][1])
        if any(list(fields) != names for _, fields in batch):
            return await self._publish_each(upstream, holder, token, batch)
        first = batch[0][1]
        own = [j for j, name in enumerate(names)
               if any(fields[name] != first[name] for _, fields in batch)]
        own_names = [names[j] for j in own]
        values: list[Any] = []
        for _, fields in batch:
            values += [fields[name] for name in own_names]
        args: list[Any] = [holder, token, RECOMMENDATION_MAXLEN, len(names), *names,
                           *("" if j in own else first[name] for j, name in enumerate(names)),
                           len(own), *(j + 1 for j in own), msgspec.msgpack.encode(values),
                           RECOMMENDATION_TTL_MS]
        keys = [leader_key(upstream), *(recommendation_stream(upstream, sidecar)
                                        for sidecar, _ in batch)]
        async with _redis_errors():
            client = self._client()
            sha = self._scripts["publish_batch"].sha
            try:
                replies: Any = await client.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:  # Redis restarted: load it, once more
                await client.script_load(FENCED_XADD_BATCH_LUA)
                replies = await client.evalsha(sha, len(keys), *keys, *args)
        if replies is None:
            return [None] * len(batch)
        out: list[str | KeyTypeError | None] = []
        for (sidecar, _), reply in zip(batch, replies, strict=True):
            text = _text(reply)
            if text.startswith("!"):
                error = ResponseError(text[1:])
                kind = _key_type(error)
                if kind is None:
                    raise StoreError(type(error).__name__, text[1:])
                out.append(KeyTypeError(kind, recommendation_stream(upstream, sidecar),
                                        text[1:]))
            else:
                out.append(text)
        return out

    async def _publish_each(
        self, upstream: str, holder: str, token: int, batch: Sequence[tuple[str, Fields]]
    ) -> list[str | KeyTypeError | None]:
        """One pipeline of the fenced-append script, one per sidecar (one round trip)."""
        async with _redis_errors():
            client = self._client()
            script = self._scripts["publish"]
            # EVALSHA straight into the pipeline: redis-py's own pipelined scripts first send
            # SCRIPT EXISTS, which the signaler's least-privilege ACL user may not run
            for attempt in range(2):
                async with client.pipeline(transaction=False) as pipe:
                    for sidecar, fields in batch:
                        args: list[Any] = [holder, token, RECOMMENDATION_MAXLEN,
                                           RECOMMENDATION_TTL_MS]
                        for name, value in fields.items():
                            args += [name, value]
                        pipe.evalsha(script.sha, 2, leader_key(upstream),
                                     recommendation_stream(upstream, sidecar), *args)
                    replies = await pipe.execute(raise_on_error=False)
                if attempt or not any(isinstance(r, NoScriptError) for r in replies):
                    break
                await client.script_load(FENCED_XADD_LUA)  # Redis restarted: load, once more
        out: list[str | KeyTypeError | None] = []
        for (sidecar, _), reply in zip(batch, replies, strict=True):
            if isinstance(reply, BaseException):
                kind = _key_type(reply)
                if kind is None:
                    raise StoreError(type(reply).__name__, str(reply) or type(reply).__name__)
                out.append(KeyTypeError(kind, recommendation_stream(upstream, sidecar),
                                        str(reply)))
            else:
                out.append(None if reply is None else _text(reply))
        return out

    async def publish_recommendation(
        self, upstream: str, sidecar: str, holder: str, token: int, fields: Fields
    ) -> str | None:
        args: list[Any] = [holder, token, RECOMMENDATION_MAXLEN, RECOMMENDATION_TTL_MS]
        for name, value in fields.items():
            args += [name, value]
        async with _redis_errors(recommendation_stream(upstream, sidecar)):
            self._client()
            entry_id = await self._scripts["publish"](
                keys=[leader_key(upstream), recommendation_stream(upstream, sidecar)], args=args)
        return None if entry_id is None else _text(entry_id)
