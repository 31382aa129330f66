"""The signaler service: consume regret summaries, solve each epoch, publish signed plans.

Owns the Redis side of the signaler (the maths is in :mod:`signaler.planner` and below):

* **Leadership** (:mod:`signaler.leader`): once per epoch, for every upstream, the replica takes
  or renews the upstream's lease. Only the leader reads that upstream's summaries and
  publishes its recommendations; the others stand by and take over when the lease expires
  (``lease_epochs`` epochs after the leader's last renewal).
* **Consuming** ``eq:{u}:summaries`` with the consumer group :data:`SIGNALER_GROUP`
  (``XREADGROUP`` then ``XACK`` once applied). On taking the lease the new leader creates the
  group if needed, warms up from the stream's newest entries (``XREVRANGE``: the latest summary
  of each sidecar, even if the previous leader already acknowledged it), and reclaims with
  ``XAUTOCLAIM`` every entry a crashed consumer left pending, so none is lost. Every entry is
  acknowledged whether it was valid or not; invalid ones are counted by their
  :class:`~mesh.protocol.Reason` and never stop the loop.
* **Planning**: :func:`signaler.planner.make_plan` in a worker thread (cvxpy blocks), so the
  admin listener keeps answering during a long solve. A solver failure is counted and logged
  and the previous recommendations stay in force until they expire.
* **Publishing** each sidecar's private recommendation, signed with the mesh key, to
  ``eq:{u}:recs:<sidecar>`` through the fenced ``XADD`` script, so a deposed leader cannot
  publish. Recommendations carry the epoch number ``floor(unix time / epoch)`` (the same on
  every replica) and expire ``expiry_epochs`` epochs after they were issued.

Fencing across a Redis restart: the fence counter lives in Redis and would restart at 1 after a
restart that lost the data, below what sidecars have already seen. Before each election the
counter is seeded with ``SET eq:{u}:fence <unix milliseconds> NX`` (no-op when it exists), so a
new token is always above every earlier one as long as elections are less frequent than one per
millisecond (they are at most one per lease time-to-live).

Redis down: every round trip has a short timeout; the loop backs off exponentially, reports
``/readyz`` 503 and ``equilibrium_signaler_redis_up 0``, and resumes by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from mesh.protocol import (
    RECOMMENDATION_MAXLEN,
    SIGNALER_GROUP,
    ProtocolError,
    Reason,
    Recommendation,
    decode_summary,
    fence_key,
    recommendation_stream,
    sign_recommendation,
    summary_stream,
)
from signaler.leader import LeaseClient
from signaler.lp import DEFAULT_MAX_CONFIGURATIONS
from signaler.metrics import SignalerHealth, SignalerMetrics
from signaler.planner import NoDemand, Plan, UpstreamView, make_plan
from signaler.solution import SolverError

log = logging.getLogger(__name__)

MAX_OBJECTIVE = 1e12
_UPSTREAM_IN_KEY = re.compile(rb"^eq:\{([A-Za-z0-9][A-Za-z0-9._-]{0,127})\}:summaries$")


@dataclass(frozen=True, slots=True)
class SignalerConfig:
    """Settings of one signaler replica (times in seconds)."""

    redis_url: str
    signer: str
    key: bytes
    epoch: float = 1.0
    tokens: int = 32
    upstreams: tuple[str, ...] = ()
    """Upstreams to serve; empty: discover them from the summary streams (``SCAN``)."""
    lease_epochs: float = 3.0
    freshness_epochs: float = 5.0
    expiry_epochs: float = 5.0
    """Recommendations outlive a takeover (lease_epochs) and a slow epoch or two."""
    discover_every: float = 2.0
    redis_timeout: float = 1.0
    read_count: int = 500
    warmup_entries: int = 1000
    max_configurations: int = DEFAULT_MAX_CONFIGURATIONS
    backoff_max: float = 5.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epoch) and self.epoch > 0):
            raise ValueError(f"epoch must be a positive number of seconds, got {self.epoch!r}")
        if self.tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {self.tokens}")
        if self.lease_epochs <= 1:
            raise ValueError("the lease must outlive at least one epoch (lease_epochs > 1)")


@dataclass(slots=True)
class UpstreamStatus:
    """What /debug/state shows of one upstream (rebuilt at the end of each epoch)."""

    leader: bool = False
    fence: int | None = None
    published: int = 0
    plan: Plan | None = None
    last_error: str | None = None
    reclaimed: int = 0


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


class SignalerService:
    """One signaler replica. ``await run(stop)`` until ``stop`` is set."""

    def __init__(
        self,
        config: SignalerConfig,
        metrics: SignalerMetrics | None = None,
        *,
        clock: Callable[[], float] = time.time,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or SignalerMetrics()
        self.health = SignalerHealth()
        self.clock = clock
        self.rng = rng or np.random.default_rng(config.seed)
        self.views: dict[str, UpstreamView] = {}
        self.status: dict[str, UpstreamStatus] = {}
        self.epoch_number = 0
        self._redis: aioredis.Redis | None = None
        self._lease: LeaseClient | None = None
        self._known: set[str] = set(config.upstreams)
        self._last_discovery = -math.inf
        self._state: dict[str, Any] = {"id": config.signer, "upstreams": {}}

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """The epoch loop: one round per epoch, exponential backoff while Redis fails."""
        loop = asyncio.get_running_loop()
        self.health.started = True
        backoff = 0.0
        try:
            while not stop.is_set():
                started = loop.time()
                try:
                    await self.run_epoch()
                    if not self.health.redis_ok:
                        log.info("signaler %s: Redis reachable", self.config.signer)
                    self.health.redis_ok = True
                    self.metrics.redis_up.set(1)
                    backoff = 0.0
                    wait = started + self.config.epoch - loop.time()
                except (RedisError, OSError, TimeoutError) as exc:
                    self._redis_failed(exc)
                    backoff = min(max(2 * backoff, self.config.epoch / 4), self.config.backoff_max)
                    wait = backoff
                except Exception as exc:  # a bug must not stop the signaler: log, count, go on
                    log.exception("signaler %s: epoch failed", self.config.signer)
                    self.metrics.epoch_errors.labels(type(exc).__name__).inc()
                    wait = self.config.epoch
                self._state = self._build_state()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(wait, 0.0))
        finally:
            self.health.stopping = True
            await self._release_all()
            await self.close()

    async def close(self) -> None:
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
            self._redis = None
            self._lease = None

    def _client(self) -> tuple[aioredis.Redis, LeaseClient]:
        if self._redis is None or self._lease is None:
            self._redis = make_client(self.config.redis_url, self.config.redis_timeout)
            self._lease = LeaseClient(
                self._redis, self.config.signer, self.config.lease_epochs * self.config.epoch
            )
        return self._redis, self._lease

    def _redis_failed(self, exc: BaseException) -> None:
        if self.health.redis_ok or not self.health.started:
            log.warning("signaler %s: Redis unreachable (%s); retrying with backoff",
                        self.config.signer, exc or type(exc).__name__)
        self.health.redis_ok = False
        self.metrics.redis_up.set(0)
        self.metrics.redis_errors.labels(type(exc).__name__).inc()
        if self._lease is not None:  # cannot renew: assume the lease is lost
            for upstream in list(self._lease.leadership.tokens):
                self._lease.leadership.lose(upstream)
                self._set_leader(upstream, None)

    async def _release_all(self) -> None:
        """On shutdown, hand every lease over at once (best effort, bounded)."""
        if self._lease is None:
            return
        for upstream in list(self._lease.leadership.tokens):
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(self.config.redis_timeout):
                    await self._lease.release(upstream)
            self._set_leader(upstream, None)

    # ------------------------------------------------------------------ one epoch

    async def run_epoch(self) -> None:
        """Discover upstreams, then for each: lease, consume, plan, publish."""
        redis, lease = self._client()
        now = self.clock()
        self.epoch_number = int(now // self.config.epoch)
        self.metrics.epochs.inc()
        await self._discover(redis, now)
        for upstream in sorted(self._known):
            await redis.set(fence_key(upstream), int(now * 1000), nx=True)
            token, transition = await lease.acquire(upstream)
            if transition == "deposed":
                log.warning("signaler %s: lost the lease of %s", self.config.signer, upstream)
            if token == 0:
                self._set_leader(upstream, None)
                self.views.pop(upstream, None)  # a standby keeps no stale state
                continue
            self._set_leader(upstream, token)
            if transition == "elected":
                log.info("signaler %s leads %s (fence %d)", self.config.signer, upstream, token)
                await self._take_over(redis, upstream)
            await self._consume(redis, upstream)
            await self._plan_and_publish(upstream)

    async def _discover(self, redis: aioredis.Redis, now: float) -> None:
        if self.config.upstreams or now - self._last_discovery < self.config.discover_every:
            return
        self._last_discovery = now
        async for key in redis.scan_iter(match="eq:{*}:summaries", count=1000):
            match = _UPSTREAM_IN_KEY.match(key if isinstance(key, bytes) else key.encode())
            if match:
                self._known.add(match.group(1).decode())

    def _view(self, upstream: str) -> UpstreamView:
        view = self.views.get(upstream)
        if view is None:
            view = UpstreamView(
                upstream, freshness=self.config.freshness_epochs * self.config.epoch
            )
            self.views[upstream] = view
        return view

    def _set_leader(self, upstream: str, token: int | None) -> None:
        status = self.status.setdefault(upstream, UpstreamStatus())
        status.leader, status.fence = token is not None, token
        self.metrics.leader.labels(upstream).set(1 if token is not None else 0)
        self.metrics.fence.labels(upstream).set(token or 0)

    # ------------------------------------------------------------------ consuming

    async def _ensure_group(self, redis: aioredis.Redis, stream: str) -> None:
        try:
            await redis.xgroup_create(stream, SIGNALER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _take_over(self, redis: aioredis.Redis, upstream: str) -> None:
        """New leader: group, warm-up from the newest entries, reclaim the pending ones."""
        stream = summary_stream(upstream)
        await self._ensure_group(redis, stream)
        view = self._view(upstream)
        newest: Any = await redis.xrevrange(stream, count=self.config.warmup_entries)
        for _, fields in reversed(newest):
            with contextlib.suppress(ProtocolError):
                summary = decode_summary(fields)
                if summary.upstream == upstream:
                    view.offer(summary)
        start: Any = "0-0"
        for _ in range(1000):  # bounded: at most 1000 batches of read_count entries
            claim: Any = await redis.xautoclaim(
                stream, SIGNALER_GROUP, self.config.signer, min_idle_time=0,
                start_id=start, count=self.config.read_count,
            )
            start, claimed = claim[0], claim[1]
            if claimed:
                self.metrics.entries_reclaimed.labels(upstream).inc(len(claimed))
                self.status[upstream].reclaimed += len(claimed)
                await self._apply_and_ack(redis, upstream, claimed)
            if start in (b"0-0", "0-0"):
                break

    async def _consume(self, redis: aioredis.Redis, upstream: str) -> None:
        stream = summary_stream(upstream)
        for _ in range(100):  # bounded per epoch; the rest is read next epoch
            try:
                reply: Any = await redis.xreadgroup(
                    SIGNALER_GROUP, self.config.signer, {stream: ">"},
                    count=self.config.read_count,
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._ensure_group(redis, stream)  # the stream or group was lost
                continue
            entries = reply[0][1] if reply else []
            if not entries:
                return
            await self._apply_and_ack(redis, upstream, entries)
            if len(entries) < self.config.read_count:
                return

    async def _apply_and_ack(
        self, redis: aioredis.Redis, upstream: str, entries: list[Any]
    ) -> None:
        ids = [entry_id for entry_id, _ in entries]
        for _, fields in entries:
            self.apply_entry(upstream, fields)
        await redis.xack(summary_stream(upstream), SIGNALER_GROUP, *ids)

    def apply_entry(self, upstream: str, fields: Any) -> bool:
        """Decode one stream entry and offer it to the upstream's view; a bad entry is counted
        by its reason and dropped. True if it was a valid summary for ``upstream``."""
        if fields is None:  # Redis 6.2 reports entries trimmed while pending as nil
            self.metrics.entries_rejected.labels(upstream, "deleted").inc()
            return False
        try:
            summary = decode_summary(fields)
            if summary.upstream != upstream:
                raise ProtocolError(
                    Reason.WRONG_UPSTREAM,
                    f"summary for {summary.upstream!r} on the stream of {upstream!r}",
                )
        except ProtocolError as exc:
            self.metrics.entries_rejected.labels(upstream, exc.reason.value).inc()
            log.debug("rejected summary entry on %s: %s", upstream, exc)
            return False
        self._view(upstream).offer(summary)
        self.metrics.summaries_consumed.labels(upstream).inc()
        return True

    # ------------------------------------------------------------------ planning

    async def _plan_and_publish(self, upstream: str) -> None:
        view = self._view(upstream)
        status = self.status[upstream]
        now = self.clock()
        self.metrics.sidecars.labels(upstream).set(len(view.fresh(now)))
        self.metrics.ce_gap.labels(upstream, "sidecars").set(view.regret_gap(now))
        started = time.perf_counter()
        try:
            plan = await asyncio.to_thread(
                make_plan, view, now, self.config.tokens, self.rng, previous=status.plan,
                max_configurations=self.config.max_configurations,
            )
        except NoDemand:
            return
        except Exception as exc:  # SolverError, bad model input, or a solver bug: never fatal
            self.metrics.solver_failures.labels(upstream, type(exc).__name__).inc()
            status.last_error = f"{type(exc).__name__}: {exc}"
            log.error("signaler: no plan for %s this epoch (previous recommendations stay in "
                      "force until they expire): %s", upstream, exc,
                      exc_info=not isinstance(exc, SolverError | ValueError))
            return
        self.metrics.solve_seconds.labels(upstream).observe(time.perf_counter() - started)
        solution = plan.solution
        self.metrics.lp_variables.labels(upstream).set(solution.n_variables)
        self.metrics.lp_constraints.labels(upstream).set(solution.n_constraints)
        self.metrics.lp_tokens.labels(upstream).set(solution.n_tokens)
        self.metrics.objective.labels(upstream).set(solution.objective)
        self.metrics.ce_gap.labels(upstream, "plan").set(solution.ce_gap)
        status.plan, status.last_error = plan, None
        await self._publish(upstream, plan, now)

    async def _publish(self, upstream: str, plan: Plan, now: float) -> None:
        _, lease = self._client()
        token = lease.leadership.token(upstream)
        if token is None:
            return
        expires = now + self.config.expiry_epochs * self.config.epoch
        objective = min(max(plan.solution.objective, -MAX_OBJECTIVE), MAX_OBJECTIVE)
        gap = min(max(plan.solution.ce_gap, 0.0), MAX_OBJECTIVE)
        for sidecar, weights in plan.weights.items():
            endpoints = plan.sidecar_endpoints[sidecar]
            rec = Recommendation(
                upstream=upstream, sidecar=sidecar, epoch=self.epoch_number, issued_at=now,
                expires_at=expires, endpoints=endpoints,
                weights=tuple(weights[e] for e in endpoints), status=plan.status,
                objective=objective, ce_gap=gap, signer=self.config.signer, fence=token,
            )
            fields = sign_recommendation(rec, self.config.key)
            entry = await lease.publish(
                upstream, recommendation_stream(upstream, sidecar), fields, RECOMMENDATION_MAXLEN
            )
            if entry is None:
                self.metrics.publish_fenced.labels(upstream).inc()
                self._set_leader(upstream, None)
                log.warning("signaler %s: fenced off %s while publishing", self.config.signer,
                            upstream)
                return
            self.metrics.recommendations_published.labels(upstream).inc()
            self.status[upstream].published += 1

    # ------------------------------------------------------------------ observers

    def state(self) -> dict[str, Any]:
        """The last end-of-epoch snapshot for ``/debug/state`` (never touched mid-solve)."""
        return self._state

    def _build_state(self) -> dict[str, Any]:
        now = self.clock()
        upstreams: dict[str, Any] = {}
        for upstream in sorted(set(self.status) | set(self.views)):
            status = self.status.get(upstream, UpstreamStatus())
            view = self.views.get(upstream)
            entry: dict[str, Any] = {
                "leader": status.leader,
                "fence": status.fence,
                "published": status.published,
                "reclaimed": status.reclaimed,
                "last_error": status.last_error,
            }
            if view is not None:
                entry["sidecars"] = [s.sidecar for s in view.fresh(now)]
                entry["regret_gap"] = view.regret_gap(now)
                entry["models"] = {e: {"d": m.d, "mu": m.mu} for e, m in view.models.items()}
            plan = status.plan
            if plan is not None:
                entry["plan"] = {
                    "status": plan.status,
                    "method": plan.solution.method,
                    "objective": plan.solution.objective,
                    "ce_gap": plan.solution.ce_gap,
                    "tokens": plan.solution.n_tokens,
                    "variables": plan.solution.n_variables,
                    "constraints": plan.solution.n_constraints,
                    "solve_seconds": plan.solution.solve_seconds,
                    "endpoints": list(plan.endpoints),
                    "marginal": plan.solution.marginal().tolist(),
                    "configuration": list(plan.configuration),
                    "kept_distribution": plan.kept_distribution,
                    "kept_deal": plan.kept_deal,
                    "weights": {s: dict(w) for s, w in plan.weights.items()},
                    # the curves the program priced (fits after the trust region and pooling)
                    "models": [{"d": m.d, "mu": m.mu} for m in plan.models],
                }
            upstreams[upstream] = entry
        return {
            "id": self.config.signer,
            "epoch": self.epoch_number,
            "redis": self.health.redis_ok,
            "upstreams": upstreams,
        }
