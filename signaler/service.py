"""The signaler service: consume regret summaries, solve each epoch, publish signed plans.

Owns the signaler's epoch loop over the signal store (:class:`wire.store.SignalStore`, given to
the constructor: Redis in production, in memory in tests and the simulator); the maths is in
:mod:`signaler.planner` and below, the Redis commands in :mod:`wire.redis_store`:

* **Leadership** (:mod:`signaler.leader`): once per epoch, for every upstream, the replica takes
  or renews the upstream's lease. Only the leader reads that upstream's summaries and
  publishes its recommendations; the others stand by and take over when the lease expires
  (``lease_epochs`` epochs after the leader's last renewal).
* **Consuming** ``eq:{u}:summaries`` with the consumer group :data:`wire.keys.SIGNALER_GROUP`
  (``XREADGROUP`` then ``XACK`` once applied). On taking the lease the new leader creates the
  group if needed, warms up from the stream's newest entries (``XREVRANGE``: the latest summary
  of each sidecar, even if the previous leader already acknowledged it), and reclaims with
  ``XAUTOCLAIM`` every entry a crashed consumer left pending, so none is lost. Every entry is
  acknowledged whether it was valid or not; invalid ones are counted by their
  :class:`~wire.errors.Reason` and never stop the loop.
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

Redis down (the store raises :class:`wire.store.StoreError`): every round trip has a short
timeout; the loop backs off exponentially, reports ``/readyz`` 503 and
``equilibrium_signaler_redis_up 0``, and resumes by itself.

One key of the wrong type (:class:`wire.store.KeyTypeError`: a string where an upstream's
summary stream or a sidecar's recommendation stream belongs) is not Redis down: it costs only
its own upstream's epoch (or only that sidecar's recommendation), is counted in
``equilibrium_signaler_key_errors_total`` and logged once a minute; every other upstream keeps
its lease and ``/readyz`` stays 200.

Two replicas started with the same ``--id``: each replica's lease holder is its id plus a
random instance suffix, so the second finds the lease held by a live replica under its own id,
refuses to lead, says so in the log (once a minute per upstream) and in
``equilibrium_signaler_id_conflicts`` and stands by until that lease expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mesh.backoff import Backoff
from mesh.notices import NoticeThrottle
from signaler.admin import SignalerHealth
from signaler.leader import LeaseClient
from signaler.lp import DEFAULT_MAX_CONFIGURATIONS
from signaler.metrics import SignalerMetrics
from signaler.planner import NoDemand, Plan, UpstreamView, make_plan
from signaler.roster import (
    DEFAULT_FORGET_AFTER,
    DEFAULT_PROBE_BUDGET,
    DEFAULT_PROBE_EVERY,
    UpstreamRoster,
)
from signaler.solution import SolverError
from wire.errors import Reason, WireError
from wire.recommendation import Recommendation, sign_recommendations
from wire.store import (
    KeyTypeError,
    SignalStore,
    StoreError,
    StreamEntry,
    error_kind,
    refusal,
)
from wire.summary import DEFAULT_SUMMARY_SKEW, RegretSummary, verify_summary

log = logging.getLogger(__name__)

# what usually makes the sidecars' summaries fail verification here (the operator's next step)
_REJECTION_CAUSES = {
    Reason.BAD_SIGNATURE: "a mesh key that differs from the sidecars' (the Secret behind "
                          "EQUILIBRIUM_MESH_SECRET, or a rotation half done)",
    Reason.UNSIGNED: "sidecars running without the mesh key",
    Reason.EXPIRED: "sidecars that publish less often than this signaler's freshness "
                    "window (their --signaling-epoch longer than its --epoch), or clocks "
                    "apart",
    Reason.NOT_YET_VALID: "clocks apart (sidecars ahead of this signaler)",
    Reason.FUTURE: "clocks apart (sidecars ahead of this signaler)",
}

SERVED_AFTER_REFUSAL = 5
"""Epochs in a row Redis must serve after it refused the signaler (its user, password or ACL),
over two ``discover_every`` at least, before the signaler says it is served again and reads
as ready."""

MAX_OBJECTIVE = 1e12


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
    """A sidecar's summary is planned with for this long after its ``sent_at``; a sidecar
    that stops publishing is forgotten after it (and gets no more recommendations)."""
    summary_skew: float = DEFAULT_SUMMARY_SKEW
    """How far a summary's ``sent_at`` may lie ahead of this replica's clock (seconds)."""
    expiry_epochs: float = 5.0
    """Recommendations outlive a takeover (lease_epochs) and a slow epoch or two."""
    discover_every: float = 2.0
    forget_after: float = DEFAULT_FORGET_AFTER
    """A discovered upstream with no valid summary for this long is forgotten
    (:mod:`signaler.roster`)."""
    probe_every: float = DEFAULT_PROBE_EVERY
    probe_budget: int = DEFAULT_PROBE_BUDGET
    probe_entries: int = 20
    redis_timeout: float = 1.0
    read_count: int = 500
    #: the share of an epoch an upstream's summaries may be read in before it is planned
    consume_share: float = 0.5
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


class SignalerService:
    """One signaler replica. ``await run(stop)`` until ``stop`` is set.

    ``store`` is the signal store it reads and publishes through; the service owns it from
    then on (:meth:`close` closes it).
    """

    def __init__(
        self,
        config: SignalerConfig,
        metrics: SignalerMetrics | None = None,
        *,
        store: SignalStore,
        clock: Callable[[], float] = time.time,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or SignalerMetrics()
        self._cpu = {phase: self.metrics.cpu_seconds.labels(phase)
                     for phase in ("verify", "plan", "sign", "dashboard")}
        self.health = SignalerHealth()
        self.clock = clock
        self.rng = rng or np.random.default_rng(config.seed)
        self.views: dict[str, UpstreamView] = {}
        self.status: dict[str, UpstreamStatus] = {}
        self.epoch_number = 0
        self.store = store
        self._lease = LeaseClient(store, config.signer, config.lease_epochs * config.epoch)
        self._notices = NoticeThrottle(60.0)
        self._rejections = NoticeThrottle(60.0)  # rejected summaries, per upstream and reason
        self._conflicts: set[str] = set()  # upstreams led by another live replica with our id
        self._configured: set[str] = set(config.upstreams)
        self._roster = UpstreamRoster(config.forget_after, config.probe_every,
                                      config.probe_budget)
        self._last_discovery = -math.inf
        self._repair_checked: dict[str, float] = {}  # upstream -> when its stream was looked at
        self._may_repair = True  # False once the store said no (an ACL without XINFO STREAM)
        self._state: dict[str, Any] = {"id": config.signer, "upstreams": {}}
        self._redis_failure_told = False  # the current outage was logged
        self._served_since_refusal = 0  # epochs run since Redis last refused (a setting)
        self._refused_at = -math.inf  # when it last failed (loop time)

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """The epoch loop: one round per epoch, exponential backoff while Redis fails."""
        loop = asyncio.get_running_loop()
        self.health.started = True
        backoff = Backoff(random.Random(self.config.seed), self.config.epoch / 4,
                          self.config.backoff_max)
        try:
            while not stop.is_set():
                started = loop.time()
                try:
                    await self.run_epoch()
                    self._redis_served()
                    backoff.reset()
                    wait = started + self.config.epoch - loop.time()
                except (StoreError, OSError, TimeoutError) as exc:
                    self._redis_failed(exc)
                    wait = backoff.next()  # mesh.backoff: equal jitter
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
        """Close the store's connections (the store reconnects if used again)."""
        await self.store.close()

    def _redis_served(self) -> None:
        """An epoch ran with Redis. After a refusal, only a few in a row, over two scans for
        new streams at least, say it is fixed: an epoch may run without the command refused
        (the scan is every ``discover_every``, not every epoch), and a signaler whose ACL
        lacks it must not read as ready between."""
        if self.health.refused is not None:
            self._served_since_refusal += 1
            quiet = asyncio.get_running_loop().time() - self._refused_at
            if (self._served_since_refusal < SERVED_AFTER_REFUSAL
                    or quiet < 2 * self.config.discover_every):  # two scans at least
                return
            log.info("signaler %s: Redis serves it again", self.config.signer)
            self.health.refused = None
        elif not self.health.redis_ok:
            log.info("signaler %s: Redis reachable", self.config.signer)
        self._redis_failure_told = False
        self.health.redis_ok = True
        self.metrics.redis_up.set(1)

    def _redis_failed(self, exc: BaseException) -> None:
        refused = refusal(exc)
        self._served_since_refusal = 0
        self._refused_at = asyncio.get_running_loop().time()
        if refused is not None:
            if self.health.refused != refused:  # once, until Redis serves it again
                log.warning("signaler %s: Redis refused it (%s: %s); check the user and "
                            "password in --redis and that user's ACL (docs/protocol.md, "
                            "wire/acl.py); retrying with backoff", self.config.signer, refused,
                            exc)
            self.health.refused = refused
        elif self.health.redis_ok or not self._redis_failure_told:  # once per outage
            log.warning("signaler %s: Redis unreachable (%s); retrying with backoff",
                        self.config.signer, exc or type(exc).__name__)
            self._redis_failure_told = True
        self.health.redis_ok = False
        self.metrics.redis_up.set(0)
        self.metrics.redis_errors.labels(error_kind(exc)).inc()
        for upstream in list(self._lease.leadership.tokens):  # cannot renew: assume it is lost
            self._lease.leadership.lose(upstream)
            self._set_leader(upstream, None)

    async def _release_all(self) -> None:
        """On shutdown, hand every lease over at once (best effort, bounded)."""
        for upstream in list(self._lease.leadership.tokens):
            with contextlib.suppress(StoreError, OSError, TimeoutError):
                async with asyncio.timeout(self.config.redis_timeout):
                    await self._lease.release(upstream)
            self._set_leader(upstream, None)

    # ------------------------------------------------------------------ one epoch

    async def run_epoch(self) -> None:
        """Discover upstreams, then for each: lease, consume, plan, publish."""
        now = self.clock()
        self.epoch_number = int(now // self.config.epoch)
        self.metrics.epochs.inc()
        scanned = await self._discover(now)
        served = sorted(self.known)
        for upstream in served:
            try:
                await self._serve(upstream, now)
            except KeyTypeError as exc:  # that upstream's problem only
                self._key_error(exc, upstream)
        if not scanned and not served:
            # nothing to serve (a fresh mesh, or between two discoveries): an epoch that
            # touched no key must still find out whether Redis answers, else it would count
            # as reachable and /readyz would say ready with Redis down
            await self.store.ping()
        self.metrics.id_conflicts.set(len(self._conflicts))
        self.metrics.upstreams.set(len(self.known))

    @property
    def known(self) -> set[str]:
        """The upstreams served: the configured ones, else the active discovered ones."""
        return self._configured or set(self._roster.active)

    async def _serve(self, upstream: str, now: float) -> None:
        """One upstream's epoch: lease, then (leading) consume, plan, publish."""
        lease = self._lease
        await self.store.seed_fence(upstream, int(now * 1000))
        token, transition = await lease.acquire(upstream)
        if transition == "deposed":
            log.warning("signaler %s: lost the lease of %s", self.config.signer, upstream)
        if token == 0:
            self._set_leader(upstream, None)
            self.views.pop(upstream, None)  # a standby keeps no stale state
            await self._check_id_conflict(upstream, now)
            if not self._configured and self._roster.needs_probe(upstream, now):
                await self._probe(upstream, now)  # the leader's sidecars still report?
            return
        self._conflicts.discard(upstream)
        self.metrics.id_conflicts.set(len(self._conflicts))  # before leading shows
        self._set_leader(upstream, token)
        if transition == "elected":
            log.info("signaler %s leads %s (fence %d)", self.config.signer, upstream, token)
            await self._take_over(upstream)
        await self._repair(upstream, now)
        await self._consume(upstream)
        await self._plan_and_publish(upstream)

    async def _repair(self, upstream: str, now: float) -> None:
        """Delete ``upstream``'s summary stream if an append with an id of its own planted a
        last id in the future (``XADD ... MAXLEN 0 <largest id>`` with a sidecar's credentials
        stopped every sidecar's summaries of that upstream for good: a stranger's finding);
        looked at once per ``discover_every`` per upstream."""
        if not self._may_repair \
                or now - self._repair_checked.get(upstream, -math.inf) < self.config.discover_every:
            return
        self._repair_checked[upstream] = now
        try:
            repaired = await self.store.repair_summaries(upstream, now)
        except StoreError as exc:
            if "NOPERM" not in str(exc) and "no permissions" not in str(exc):
                raise
            self._may_repair = False
            log.warning("signaler %s: its Redis user may not run XINFO STREAM, so summary "
                        "streams planted with an id from the future are not repaired; add "
                        "+xinfo|stream to its ACL (wire/acl.py)", self.config.signer)
            return
        if repaired:
            self.metrics.streams_repaired.inc()
            log.warning("signaler %s: deleted the summary stream of %s: its last id lay in the "
                        "future, which only an append with an id of its own puts there (at the "
                        "largest id, every sidecar's append fails); the sidecars' next "
                        "summaries start it again", self.config.signer, upstream)

    async def _check_id_conflict(self, upstream: str, now: float) -> None:
        """Standing by: is the leader another live replica started with this one's id?"""
        holder = await self.store.lease_holder(upstream)
        if holder is None or not self._lease.is_namesake(holder):
            self._conflicts.discard(upstream)
            return
        self._conflicts.add(upstream)
        if self._notices.due(("id-conflict", upstream), now) is not None:
            log.error(
                "signaler %s: refusing to lead %s: its lease is held by another live replica "
                "started with the same id (%s); standing by until that lease expires. Give "
                "every replica its own --id.", self.config.signer, upstream, holder)

    def _key_error(self, exc: KeyTypeError, upstream: str) -> None:
        """Count and (once a minute) log a wrong-typed key; only its upstream is affected."""
        self.metrics.key_errors.labels(upstream, exc.role).inc()
        status = self.status.setdefault(upstream, UpstreamStatus())
        status.last_error = f"{exc.kind} on {exc.key}"
        held = self._notices.due(("key", exc.key, exc.kind), self.clock())
        if held is not None:
            log.error("signaler %s: key %s holds a value the plane cannot use (%s); upstream %s is "
                      "affected, the others carry on (%d more since the last report). Delete "
                      "or rename the key to repair it.", self.config.signer, exc.key, exc.kind,
                      upstream, held)

    async def _discover(self, now: float) -> bool:
        """Forget quiet upstreams; every ``discover_every``, ``SCAN`` and probe candidates.
        True if it asked the store (a ``SCAN``)."""
        if self._configured:
            return False
        for upstream in self._roster.expired(now):
            await self._forget(upstream)
        if now - self._last_discovery < self.config.discover_every:
            return False
        self._last_discovery = now
        found = await self.store.upstreams()
        for gone in [u for u in self._repair_checked if u not in found]:
            del self._repair_checked[gone]  # (bounded by what SCAN finds)
        for upstream in self._roster.discovered(found, now):
            await self._probe(upstream, now)
        return True

    async def _probe(self, upstream: str, now: float) -> None:
        """Does ``upstream``'s stream end with a valid, fresh summary? (one bounded read)"""
        with contextlib.suppress(KeyTypeError):  # a wrong-typed key: the read below says so
            await self._repair(upstream, now)  # a planted id: no summary would ever come
        valid = False
        rejected: WireError | None = None  # the newest entry's, when none is valid
        try:
            for entry in await self.store.newest_summaries(upstream, self.config.probe_entries):
                if entry.fields is None:
                    continue
                try:
                    if self.verify(entry.fields, now).upstream == upstream:
                        valid = True
                        break
                except WireError as exc:
                    rejected = rejected or exc
        except KeyTypeError:
            log.debug("signaler: candidate %s has a wrong-typed summary key", upstream)
        if not valid and rejected is not None:
            # the sidecars publish, and none of it verifies: a mesh key that differs from the
            # sidecars' was silent here (a stranger's finding), every sidecar on its own
            self.metrics.probes_rejected.labels(rejected.reason).inc()
            self._rejected_notice(upstream, rejected, per_upstream=False)
        was_active = upstream in self._roster.active
        self._roster.probed(upstream, valid, now)
        if valid and not was_active:
            log.info("signaler %s: serving discovered upstream %s", self.config.signer,
                     upstream)

    async def _forget(self, upstream: str) -> None:
        """No valid summary for ``forget_after``: release, drop its state and series."""
        if self._lease.leadership.token(upstream) is not None:
            with contextlib.suppress(StoreError, OSError, TimeoutError):
                async with asyncio.timeout(self.config.redis_timeout):
                    await self._lease.release(upstream)
        self._lease.leadership.lose(upstream)
        self.views.pop(upstream, None)
        self.status.pop(upstream, None)
        self._repair_checked.pop(upstream, None)
        self._conflicts.discard(upstream)
        self.metrics.forget_upstream(upstream)
        log.info("signaler %s: forgot upstream %s (no valid summary for %gs)",
                 self.config.signer, upstream, self.config.forget_after)

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

    async def _take_over(self, upstream: str) -> None:
        """New leader: group, warm-up from the newest entries, reclaim the pending ones."""
        await self.store.ensure_group(upstream)
        view = self._view(upstream)
        newest = await self.store.newest_summaries(upstream, self.config.warmup_entries)
        now = self.clock()
        for entry in reversed(newest):
            with contextlib.suppress(WireError):  # counted when the group delivers them
                if entry.fields is None:
                    continue
                summary = self.verify(entry.fields, now)
                if summary.upstream == upstream:
                    view.offer(summary)
        start = "0-0"
        for _ in range(1000):  # bounded: at most 1000 batches of read_count entries
            start, claimed = await self.store.claim_pending(
                upstream, self.config.signer, start, self.config.read_count)
            if claimed:
                self.metrics.entries_reclaimed.labels(upstream).inc(len(claimed))
                self.status[upstream].reclaimed += len(claimed)
                await self._apply_and_ack(upstream, claimed)
            if start == "0-0":
                break

    async def _consume(self, upstream: str) -> None:
        """Read the new summaries, bounded in batches and in time: past ``consume_share`` of
        an epoch the rest waits for the next epoch, so planning and publishing (and renewing
        the lease, next epoch) are never starved by a burst of summaries."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.consume_share * self.config.epoch
        for _ in range(100):  # bounded per epoch; the rest is read next epoch
            entries = await self.store.read_summaries(
                upstream, self.config.signer, self.config.read_count)
            if not entries:
                return
            await self._apply_and_ack(upstream, entries)
            if len(entries) < self.config.read_count:
                return
            if loop.time() > deadline:
                self.metrics.consume_deferred.labels(upstream).inc()
                return

    async def _apply_and_ack(self, upstream: str, entries: Sequence[StreamEntry]) -> None:
        started = time.thread_time()
        now = self.clock()
        accept = self._accept
        applied = sum(1 for entry in entries if accept(upstream, entry.fields, now))
        self._applied(upstream, applied, now)
        self._cpu["verify"].inc(time.thread_time() - started)
        await self.store.ack(upstream, [entry.id for entry in entries])

    def verify(self, fields: Any, now: float) -> RegretSummary:
        """``fields`` as a summary signed with the mesh key and sent within the freshness
        window (``summary_skew`` ahead at most); :class:`WireError` otherwise."""
        return verify_summary(
            fields, self.config.key, now,
            max_age=self.config.freshness_epochs * self.config.epoch,
            max_skew=self.config.summary_skew,
        )

    def apply_entry(self, upstream: str, fields: Any, now: float | None = None) -> bool:
        """Verify one stream entry and offer it to the upstream's view; a bad entry (forged,
        unsigned, stamped too far ahead or too long ago, malformed) is counted by its reason
        and dropped. True if it was a valid summary for ``upstream``."""
        now = self.clock() if now is None else now
        applied = self._accept(upstream, fields, now)
        self._applied(upstream, int(applied), now)
        return applied

    def _rejected_notice(self, upstream: str, exc: WireError, per_upstream: bool = True) -> None:
        """A WARNING for summaries rejected on ``upstream``, once a minute per upstream and
        reason (``per_upstream`` False: per reason, for the streams discovery probes, which
        anyone who may append summaries can make up), with how many more since and the
        usual cause; the metrics count each."""
        if exc.reason in (Reason.DELETED, Reason.WRONG_UPSTREAM):
            log.debug("rejected summary entry on %s: %s", upstream, exc)
            return
        key = (upstream if per_upstream else None, exc.reason)
        held = self._rejections.due(key, self.clock())
        if held is None:
            return
        cause = _REJECTION_CAUSES.get(exc.reason, "a sidecar of another version, or "
                                                  "something else writing to the stream")
        log.warning("signaler %s: rejected summaries on %s: %s (%s)%s; usually %s",
                    self.config.signer, upstream, exc.reason, exc,
                    f", {held} more since the last report" if held else "", cause)

    def _applied(self, upstream: str, count: int, now: float) -> None:
        """``count`` valid summaries for ``upstream`` arrived at ``now`` (counted in bulk)."""
        if count:
            self._roster.seen(upstream, now)
            self.metrics.summaries_consumed.labels(upstream).inc(count)

    def _accept(self, upstream: str, fields: Any, now: float) -> bool:
        """:meth:`apply_entry` but for the valid summaries' count and roster (the caller's)."""
        if fields is None:  # Redis 6.2 reports entries trimmed while pending as nil
            self.metrics.entries_rejected.labels(upstream, Reason.DELETED).inc()
            return False
        try:
            summary = self.verify(fields, now)
            if summary.upstream != upstream:
                raise WireError(
                    Reason.WRONG_UPSTREAM,
                    f"summary for {summary.upstream!r} on the stream of {upstream!r}",
                )
        except WireError as exc:
            self.metrics.entries_rejected.labels(upstream, exc.reason).inc()
            self._rejected_notice(upstream, exc)
            return False
        self._view(upstream).offer(summary)
        return True

    def _shared_ids(self, upstream: str, shared: list[str], now: float) -> None:
        """The gauge of ``upstream``'s shared sidecar ids, and a WARNING naming them once a
        minute while there are any."""
        self.metrics.shared_sidecar_ids.labels(upstream).set(len(shared))
        if shared and self._notices.due(("shared-ids", upstream), now) is not None:
            log.warning("signaler %s: upstream %s: two processes publish summaries under the "
                        "sidecar id(s) %s (of one epoch, or in epochs against their clocks): "
                        "two sidecars started with one --id (each needs its own; the pod's "
                        "name by default), planned as one caller and following one plan",
                        self.config.signer, upstream, ", ".join(shared[:10]))

    # ------------------------------------------------------------------ planning

    async def _plan_and_publish(self, upstream: str) -> None:
        view = self._view(upstream)
        status = self.status[upstream]
        now = self.clock()
        self.metrics.sidecars.labels(upstream).set(len(view.fresh(now)))
        self._shared_ids(upstream, view.shared_ids(now), now)
        self.metrics.ce_gap.labels(upstream, "sidecars").set(view.regret_gap(now))
        started = time.perf_counter()
        try:
            plan = await asyncio.to_thread(self._make_plan, view, now, status.plan)
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

    def _make_plan(self, view: UpstreamView, now: float, previous: Plan | None) -> Plan:
        """:func:`make_plan` in the planning thread, its thread time counted as ``plan``."""
        started = time.thread_time()
        try:
            return make_plan(view, now, self.config.tokens, self.rng, previous=previous,
                             max_configurations=self.config.max_configurations)
        finally:
            self._cpu["plan"].inc(time.thread_time() - started)

    async def _publish(self, upstream: str, plan: Plan, now: float) -> None:
        lease = self._lease
        token = lease.leadership.token(upstream)
        if token is None:
            return
        expires = now + self.config.expiry_epochs * self.config.epoch
        objective = min(max(plan.solution.objective, -MAX_OBJECTIVE), MAX_OBJECTIVE)
        gap = min(max(plan.solution.ce_gap, 0.0), MAX_OBJECTIVE)
        own = []
        for sidecar, weights in plan.weights.items():
            endpoints = plan.sidecar_endpoints[sidecar]
            own.append((sidecar, endpoints, tuple([weights[e] for e in endpoints])))
        if not own:
            return
        first_sidecar, first_endpoints, first_weights = own[0]
        common = Recommendation(
            upstream=upstream, sidecar=first_sidecar, epoch=self.epoch_number, issued_at=now,
            expires_at=expires, endpoints=first_endpoints, weights=first_weights,
            status=plan.status, objective=objective, ce_gap=gap, signer=self.config.signer,
            fence=token,
        )
        # each sidecar's own recommendation, signed; checks and encodings done once per value
        started = time.thread_time()
        signed = sign_recommendations(common, own, self.config.key)
        self._cpu["sign"].inc(time.thread_time() - started)
        batch = [(sidecar, fields) for (sidecar, _, _), fields in zip(own, signed, strict=True)]
        # one round trip for the epoch's recommendations, whatever the number of sidecars
        results = await lease.publish_all(upstream, batch)
        if results is None:
            self.metrics.publish_fenced.labels(upstream).inc()
            self._set_leader(upstream, None)
            log.warning("signaler %s: fenced off %s while publishing", self.config.signer,
                        upstream)
            return
        published = 0
        for result in results:
            if isinstance(result, KeyTypeError):  # that sidecar's stream only
                self._key_error(result, upstream)
            else:
                published += 1
        self.metrics.recommendations_published.labels(upstream).inc(published)
        self.status[upstream].published += published

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
            "id_conflicts": sorted(self._conflicts),
            "upstreams": upstreams,
        }
