"""The sidecar's side of the signaling plane: publish regret summaries, follow recommendations.

Owns the sidecar's Redis client and one background task (started by
:class:`sidecar.runner.SidecarRunner`). Every epoch, for each upstream whose policy can follow
recommendations (``equilibrium``), in one pipelined round trip:

1. ``XADD eq:{u}:summaries MAXLEN ~ N`` a :class:`~mesh.protocol.RegretSummary` built from the
   policy's last snapshot (requests, failures, weights, Hart & Mas-Colell's conditional regret
   matrix) and the latency histogram's movement since the previous epoch (mean, p50, p99);
2. ``XREVRANGE eq:{u}:recs:<id> + - COUNT 1``: the newest recommendation. A new one is checked
   with :func:`mesh.protocol.verify_recommendation` (signature under the mesh key, this upstream
   and sidecar, this endpoint set, not older than the epoch followed, not from a fenced-off
   leader, not expired) and handed to ``policy.follow(weights, expires_at)``; the policy still
   shapes it with the thundering-herd guard. Anything else is counted by reason and ignored.

A new upstream's policy first waits for its recommendation (``policy.await_signal``): it keeps
its starting, even weights for ``first_signal_epochs`` epochs or until the first recommendation
verifies, so a mesh-wide cold start does not herd before the signaler has spoken.

Never on the request path. The request path reads only the policy's routing snapshot; this task
runs beside it with a short timeout on every round trip. When Redis fails or is slow, every
policy stops following at once (``stop_following()``: the next policy tick routes by local
regret matching again), the task retries with exponential backoff and jitter, and it resumes
following when a fresh recommendation verifies. No request ever waits for Redis.

Clocks: recommendations carry unix times; the policy runs on the sidecar's monotonic clock, so
the expiry is translated (``clock() + expires_at - wall()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from mesh.backoff import Backoff
from mesh.protocol import (
    MAX_SECONDS,
    SUMMARY_MAXLEN,
    ProtocolError,
    RegretSummary,
    encode_summary,
    recommendation_stream,
    summary_stream,
    verify_recommendation,
)
from sidecar.upstreams import UpstreamGroup, UpstreamTable

log = logging.getLogger(__name__)

DEFAULT_EPOCH = 1.0
DEFAULT_TIMEOUT = 0.25
_ID_BAD_CHARS = re.compile(r"[^A-Za-z0-9._-]")


def protocol_id(sidecar_id: str) -> str:
    """The sidecar id as the protocol spells it (``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``)."""
    clean = _ID_BAD_CHARS.sub("-", sidecar_id)[:128]
    if not clean or not clean[0].isalnum():
        clean = ("s" + clean)[:128]
    return clean


@dataclass(frozen=True, slots=True)
class SignalingSettings:
    """How the sidecar talks to the signaling plane (times in seconds)."""

    redis_url: str
    key: bytes
    epoch: float = DEFAULT_EPOCH
    timeout: float = DEFAULT_TIMEOUT
    backoff_min: float = 0.1
    backoff_max: float = 5.0
    max_skew: float = 5.0
    #: A new upstream's policy keeps its starting (even) weights for this many epochs or until
    #: its first recommendation (RegretMatchingPolicy.await_signal); Redis failing ends it.
    first_signal_epochs: float = 3.0


class SignalingMetrics:
    """The sidecar's signaling metrics, registered in the sidecar's own registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.connected = Gauge(
            "equilibrium_signaling_connected", "1 while the last Redis round trip succeeded",
            registry=r,
        )
        self.following = Gauge(
            "equilibrium_signaling_following",
            "1 while the upstream's routing follows a signaler recommendation, 0 while it "
            "falls back to local regret matching", ["upstream"], registry=r,
        )
        self.summaries = Counter(
            "equilibrium_signaling_summaries_published", "Regret summaries appended",
            ["upstream"], registry=r,
        )
        self.accepted = Counter(
            "equilibrium_signaling_recommendations_accepted",
            "Recommendations that verified and are followed", ["upstream"], registry=r,
        )
        self.rejected = Counter(
            "equilibrium_signaling_recommendations_rejected",
            "Recommendations ignored, by reason (stale, expired, bad-signature, unsigned, "
            "malformed, fenced, ...)", ["upstream", "reason"], registry=r,
        )
        self.summaries_invalid = Counter(
            "equilibrium_signaling_summaries_invalid",
            "Summaries not sent because they failed the protocol's validation, by reason",
            ["upstream", "reason"], registry=r,
        )
        self.fallbacks = Counter(
            "equilibrium_signaling_fallbacks",
            "Times routing fell back to local regret matching because Redis failed",
            registry=r,
        )
        self.redis_errors = Counter(
            "equilibrium_signaling_redis_errors", "Failed Redis round trips, by kind", ["kind"],
            registry=r,
        )


# ---------------------------------------------------------------------- summaries


@dataclass(slots=True)
class _Histogram:
    count: float = 0.0
    total: float = 0.0
    buckets: list[tuple[float, float]] = field(default_factory=list)  # (le, cumulative)


def read_histograms(samples: Iterable[Any]) -> dict[tuple[str, str], _Histogram]:
    """Per (upstream, endpoint): count, sum and cumulative buckets of the latency histogram,
    from ``Histogram.collect()`` samples."""
    out: dict[tuple[str, str], _Histogram] = {}
    for sample in samples:
        labels = sample.labels
        key = (labels.get("upstream", ""), labels.get("endpoint", ""))
        hist = out.setdefault(key, _Histogram())
        if sample.name.endswith("_bucket"):
            hist.buckets.append((float(labels["le"]), float(sample.value)))
        elif sample.name.endswith("_count"):
            hist.count = float(sample.value)
        elif sample.name.endswith("_sum"):
            hist.total = float(sample.value)
    for hist in out.values():
        hist.buckets.sort()
    return out


def _quantile(buckets: Sequence[tuple[float, float]], q: float, fallback: float) -> float:
    """The upper bound of the bucket holding quantile ``q`` of (le, count-in-window) pairs."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return fallback
    for le, cumulative in buckets:
        if cumulative >= q * total:
            return fallback if math.isinf(le) else le
    return fallback


def _clip_seconds(value: float) -> float:
    return min(max(value, 0.0), MAX_SECONDS) if math.isfinite(value) else MAX_SECONDS


class SummaryBuilder:
    """Turns one upstream's cumulative counters into per-epoch :class:`RegretSummary` values."""

    def __init__(self, sidecar: str, upstream: str) -> None:
        self.sidecar = sidecar
        self.upstream = upstream
        self._requests: dict[str, int] = {}
        self._failures: dict[str, int] = {}
        self._hist: dict[str, _Histogram] = {}
        self._last: float | None = None

    def build(
        self,
        group: UpstreamGroup,
        histograms: dict[tuple[str, str], _Histogram],
        now: float,
        wall: float,
        epoch_seconds: float,
    ) -> RegretSummary | None:
        """The summary of what happened since the previous call; None when there is nothing
        to report (no snapshot or no endpoints). ``now`` is monotonic, ``wall`` unix time."""
        snapshot = group.snapshot
        if snapshot is None or not snapshot.endpoints:
            return None
        views = list(snapshot.endpoints)
        endpoints = tuple(v.endpoint for v in views)
        elapsed = epoch_seconds if self._last is None else max(now - self._last, 1e-3)
        self._last = now
        requests, failures, means, p50s, p99s = [], [], [], [], []
        for view in views:
            e = view.endpoint
            n = max(view.requests - self._requests.get(e, 0), 0)
            f = min(max(view.failures - self._failures.get(e, 0), 0), n)
            self._requests[e], self._failures[e] = view.requests, view.failures
            hist = histograms.get((self.upstream, e), _Histogram())
            before = self._hist.get(e, _Histogram())
            self._hist[e] = hist
            dn = hist.count - before.count
            estimate = _clip_seconds(view.latency_estimate)
            if n == 0:
                mean = p50 = p99 = None
            elif dn > 0:
                mean = _clip_seconds((hist.total - before.total) / dn)
                prior = dict(before.buckets)
                window = [(le, c - prior.get(le, 0.0)) for le, c in hist.buckets]
                p50 = _clip_seconds(_quantile(window, 0.5, mean))
                p99 = max(_clip_seconds(_quantile(window, 0.99, mean)), p50)
            else:  # only failures (no response head): the policy's charged estimate
                mean = p50 = p99 = estimate
            requests.append(n)
            failures.append(f)
            means.append(mean)
            p50s.append(p50)
            p99s.append(p99)
        k = len(endpoints)
        raw_weights = [max(float(snapshot.weights.get(e, 0.0)), 0.0) for e in endpoints]
        total_weight = math.fsum(w for w in raw_weights if math.isfinite(w))
        if not math.isfinite(total_weight) or total_weight <= 0:
            weights = [1.0 / k] * k
        else:
            weights = [w / total_weight if math.isfinite(w) else 0.0 for w in raw_weights]
            weights[max(range(k), key=weights.__getitem__)] += 1.0 - math.fsum(weights)
        matrix = snapshot.regret_matrix
        if len(matrix) == k and all(len(row) == k for row in matrix):
            regret = tuple(
                tuple(min(max(x, -MAX_SECONDS), MAX_SECONDS) if math.isfinite(x) else 0.0
                      for x in row)
                for row in matrix
            )
        else:
            regret = tuple(tuple(0.0 for _ in range(k)) for _ in range(k))
        return RegretSummary(
            sidecar=self.sidecar,
            upstream=self.upstream,
            epoch=int(wall // epoch_seconds),
            sent_at=wall,
            endpoints=endpoints,
            requests=tuple(requests),
            failures=tuple(failures),
            latency_mean=tuple(means),
            latency_p50=tuple(p50s),
            latency_p99=tuple(p99s),
            in_flight=tuple(max(v.in_flight, 0) for v in views),
            demand=min(sum(requests) / elapsed, 1e9),
            weights=tuple(min(max(w, 0.0), 1.0) for w in weights),
            regret=regret,
        )


# ---------------------------------------------------------------------- the task


@dataclass(slots=True)
class _Followed:
    entry_id: bytes | None = None
    epoch: int | None = None
    fence: int | None = None


class SidecarSignaling:
    """The background task: ``await run()`` (cancelled on shutdown)."""

    def __init__(
        self,
        *,
        sidecar_id: str,
        table: UpstreamTable,
        registry: CollectorRegistry,
        latency_histogram: Any,
        settings: SignalingSettings,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.sidecar = protocol_id(sidecar_id)
        self.table = table
        self.settings = settings
        self.metrics = SignalingMetrics(registry)
        self.latency_histogram = latency_histogram
        self.clock = clock
        self.wall = wall
        self.rng = rng or random.Random()
        self.connected = False
        self._builders: dict[str, SummaryBuilder] = {}
        self._followed: dict[str, _Followed] = {}
        # per upstream, the policy told to wait for its first signal, and its stage: "idle"
        # before its first traffic, "busy" after (a new policy object starts over)
        self._awaiting: dict[str, tuple[object, str]] = {}
        self._redis: aioredis.Redis | None = None

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            t = self.settings.timeout
            self._redis = aioredis.Redis.from_url(
                self.settings.redis_url, socket_timeout=t, socket_connect_timeout=t,
                retry=Retry(NoBackoff(), 0), retry_on_timeout=False, health_check_interval=0,
            )
        return self._redis

    async def _drop_client(self) -> None:
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
            self._redis = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(self.rng, self.settings.backoff_min, self.settings.backoff_max)
        try:
            while True:
                started = loop.time()
                try:
                    # The whole round is bounded too: a Redis that accepts but never answers
                    # cannot hold the task longer than a few timeouts.
                    async with asyncio.timeout(4 * self.settings.timeout):
                        await self.run_round()
                    if not self.connected:
                        log.info("signaling: connected to Redis")
                    self.connected = True
                    self.metrics.connected.set(1)
                    backoff.reset()
                    wait = started + self.settings.epoch - loop.time()
                except Exception as exc:  # Redis errors, timeouts, or a bug: never fatal
                    if not isinstance(exc, RedisError | OSError | TimeoutError):
                        log.exception("signaling: unexpected error; falling back")
                    await self._fall_back(exc)
                    wait = backoff.next()  # mesh.backoff: equal jitter
                self._export_following()
                await asyncio.sleep(max(wait, 0.0))
        finally:
            await self._drop_client()

    async def _fall_back(self, exc: BaseException) -> None:
        """Redis failed: every upstream routes by local regret matching from now on."""
        for group in self.table:
            stop = getattr(group.policy, "stop_following", None)
            if stop is not None:
                stop()
        self.metrics.redis_errors.labels(type(exc).__name__).inc()
        if self.connected:
            self.metrics.fallbacks.inc()
            log.warning("signaling: Redis unavailable (%s); routing falls back to local regret "
                        "matching, reconnecting with backoff", exc or type(exc).__name__)
        self.connected = False
        self.metrics.connected.set(0)
        await self._drop_client()  # a fresh connection next time, not a half-dead one

    def _export_following(self) -> None:
        for group in self.table:
            snap = group.snapshot
            self.metrics.following.labels(group.name).set(
                1 if snap is not None and snap.following else 0)

    def _groups(self) -> list[UpstreamGroup]:
        """Upstreams whose policy can follow (the baselines neither report nor follow)."""
        return [g for g in self.table if hasattr(g.policy, "follow") and g.endpoints]

    async def run_round(self) -> None:
        """One epoch: publish every upstream's summary and read its newest recommendation."""
        groups = self._groups()
        if not groups:
            return
        self._await_first_signals(groups)
        redis = self._client()
        histograms = read_histograms(
            s for metric in self.latency_histogram.collect() for s in metric.samples
        )
        now, wall = self.clock(), self.wall()
        pipe = redis.pipeline(transaction=False)
        for group in groups:
            builder = self._builders.get(group.name)
            if builder is None:
                builder = self._builders[group.name] = SummaryBuilder(self.sidecar, group.name)
            try:
                summary = builder.build(group, histograms, now, wall, self.settings.epoch)
            except ProtocolError as exc:  # e.g. an endpoint id the protocol cannot carry
                self.metrics.summaries_invalid.labels(group.name, exc.reason.value).inc()
                log.debug("signaling: no summary for %s: %s", group.name, exc)
                summary = None
            if summary is not None:
                fields: dict[Any, Any] = dict(encode_summary(summary))
                pipe.xadd(summary_stream(group.name), fields, maxlen=SUMMARY_MAXLEN,
                          approximate=True)
                self.metrics.summaries.labels(group.name).inc()
            pipe.xrevrange(recommendation_stream(group.name, self.sidecar), count=1)
        replies = await pipe.execute()
        recs = [r for r in replies if isinstance(r, list)]
        for group, newest in zip(groups, recs, strict=True):
            if newest:
                entry_id, fields = newest[0]
                self.consider(group, entry_id, fields)

    def _await_first_signals(self, groups: list[UpstreamGroup]) -> None:
        """Tell each new policy to wait for its first recommendation, and again when its first
        traffic shows (the signaler plans only for sidecars that report demand, so the wait
        counts from there)."""
        until = self.clock() + self.settings.first_signal_epochs * self.settings.epoch
        for group in groups:
            held = self._awaiting.get(group.name)
            stage = held[1] if held is not None and held[0] is group.policy else None
            if stage == "busy":
                continue
            snap = group.snapshot
            busy = snap is not None and any(e.requests for e in snap.endpoints)
            if stage is None or busy:
                self._awaiting[group.name] = (group.policy, "busy" if busy else "idle")
                group.policy.await_signal(until)  # type: ignore[attr-defined]

    def consider(self, group: UpstreamGroup, entry_id: bytes, fields: Any) -> bool:
        """Verify a recommendation entry not seen before and follow it; True if followed."""
        followed = self._followed.setdefault(group.name, _Followed())
        if entry_id == followed.entry_id:
            return False
        followed.entry_id = entry_id
        wall = self.wall()
        try:
            rec = verify_recommendation(
                fields, self.settings.key, wall, group.name, self.sidecar,
                min_epoch=followed.epoch, min_fence=followed.fence,
                max_skew=self.settings.max_skew, expected_endpoints=group.endpoints,
            )
        except ProtocolError as exc:
            self.metrics.rejected.labels(group.name, exc.reason.value).inc()
            log.debug("signaling: ignored a recommendation for %s: %s", group.name, exc)
            return False
        followed.epoch = rec.epoch
        followed.fence = rec.fence if followed.fence is None else max(followed.fence, rec.fence)
        group.policy.follow(rec.weight_map(), self.clock() + (rec.expires_at - wall))  # type: ignore[attr-defined]
        self.metrics.accepted.labels(group.name).inc()
        return True


# ---------------------------------------------------------------------- wiring


def signaling_settings(config: Any, mesh_key: bytes | None) -> SignalingSettings | None:
    """How this sidecar joins the signaling plane (None: ``redis`` is not set); decided
    before the runner starts, so that a missing key is a configuration error (exit 2).

    Security default: with ``redis`` set and no mesh key, the sidecar refuses to start; it
    would otherwise follow routing signals anyone with access to Redis could forge.
    """
    from sidecar.config import ConfigError

    url = getattr(config, "redis", None)
    if url is None:
        return None
    if mesh_key is None:
        raise ConfigError(
            "redis is set but there is no mesh key to verify recommendations with: set "
            "EQUILIBRIUM_MESH_SECRET or mesh_secret_file (signaling refuses to run unsigned)"
        )
    epoch = float(getattr(config, "signaling_epoch", DEFAULT_EPOCH))
    # Reconnect attempts are cheap: retry within a few epochs, at most every 5 s.
    return SignalingSettings(redis_url=url, key=mesh_key, epoch=epoch,
                             backoff_max=min(5.0, max(1.0, 4 * epoch)))
