"""The sidecar's side of the signaling plane: publish regret summaries, follow recommendations.

Owns the sidecar's use of the signal store (:class:`wire.store.SignalStore`, given to the
constructor: Redis in production, in memory in tests) and one background task (started by
:class:`sidecar.runner.SidecarRunner`). Every epoch, for each upstream whose policy takes part
(:class:`mesh.policy.FollowingPolicy`: ``equilibrium``), in one round trip
(:meth:`~wire.store.SignalStore.exchange`):

1. append a :class:`~wire.summary.RegretSummary`, signed with the mesh key
   (:func:`wire.summary.sign_summary`: the signaler drops unsigned or forged ones), built by
   :class:`mesh.summary.SummaryBuilder`
   from the policy's last snapshot (requests, failures, weights, Hart & Mas-Colell's
   conditional regret matrix) and its epoch windows (what each endpoint did since the previous
   epoch: mean, p50, p99 latency), to ``eq:{u}:summaries``;
2. read the newest recommendation on ``eq:{u}:recs:<id>``. A new one is checked with
   :func:`wire.recommendation.verify_recommendation` (signature under the mesh key, this upstream
   and sidecar, this endpoint set, not older than the epoch followed, not from a fenced-off
   leader, not expired) and handed to ``policy.follow(weights, expires_at)``; the policy still
   shapes it with the thundering-herd guard. Anything else is counted by reason and ignored.

A new upstream's policy first waits for its recommendation (``policy.await_signal``, started by
:class:`mesh.first_signal.FirstSignalWait`): it keeps its starting, even weights for
``first_signal_epochs`` epochs or until the first recommendation verifies, so a mesh-wide cold
start does not herd before the signaler has spoken.

A key of the wrong type under ``eq:`` (this upstream's summary stream, this sidecar's
recommendation stream: :class:`wire.store.KeyTypeError`) is not Redis down: only that
upstream stops following (local regret matching), counted in
``equilibrium_signaling_key_errors_total`` and logged once a minute; the others go on.

Never on the request path. The request path reads only the policy's routing snapshot; this task
runs beside it with a short timeout on every round trip. When the store fails or is slow, every
policy stops following at once (``stop_following()``: the next policy tick routes by local
regret matching again), the task retries with exponential backoff and jitter, and it resumes
following when a fresh recommendation verifies. No request ever waits for Redis.

Clocks: recommendations carry unix times; the policy runs on the sidecar's monotonic clock, so
the expiry is translated (``clock() + expires_at - wall()``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from mesh.backoff import Backoff
from mesh.errors import ConfigError
from mesh.first_signal import FirstSignalWait
from mesh.notices import NoticeThrottle
from mesh.policy import FollowingPolicy
from mesh.summary import SummaryBuilder
from sidecar.config import SidecarConfig
from sidecar.metrics import SignalingMetrics
from sidecar.upstreams import UpstreamGroup, UpstreamTable
from wire.entries import MAX_SECONDS
from wire.errors import WireError
from wire.keys import unverified_tls
from wire.recommendation import verify_recommendation
from wire.store import Fields, KeyTypeError, SignalStore, StoreError, error_kind
from wire.summary import RegretSummary, sign_summary

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


# ---------------------------------------------------------------------- the task


@dataclass(slots=True)
class _Followed:
    entry_id: str | None = None
    epoch: int | None = None
    fence: int | None = None


class SidecarSignaling:
    """The background task: ``await run()`` (cancelled on shutdown).

    ``store`` is the signal store it talks to; the task owns it from then on (it closes it on
    failure, to start again from a fresh connection, and when it ends).
    """

    def __init__(
        self,
        *,
        sidecar_id: str,
        table: UpstreamTable,
        metrics: SignalingMetrics,
        settings: SignalingSettings,
        store: SignalStore,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.sidecar = protocol_id(sidecar_id)
        self.table = table
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.wall = wall
        self.rng = rng or random.Random()
        self.connected = False
        self._ever_failed = False  # the first failure is logged even with no connection yet
        # per upstream, what the log said last ("following", or "lost": no fresh plan while
        # busy), and since when its summaries have reported demand (None: the last did not)
        self._told: dict[str, str] = {}
        self._busy_since: dict[str, float | None] = {}
        self._builders: dict[str, SummaryBuilder] = {}
        self._followed: dict[str, _Followed] = {}
        # per upstream, the policy told to wait for its first signal and its wait's machine
        # (a new policy object starts over)
        self._awaiting: dict[str, tuple[FollowingPolicy, FirstSignalWait]] = {}
        self._notices = NoticeThrottle(60.0)

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
                except Exception as exc:  # store errors, timeouts, or a bug: never fatal
                    if not isinstance(exc, StoreError | OSError | TimeoutError):
                        log.exception("signaling: unexpected error; falling back")
                    await self._fall_back(exc)
                    wait = backoff.next()  # mesh.backoff: equal jitter
                self._export_following()
                await asyncio.sleep(max(wait, 0.0))
        finally:
            await self.store.close()

    async def _fall_back(self, exc: BaseException) -> None:
        """The store failed: every upstream routes by local regret matching from now on."""
        for group in self.table:
            if isinstance(group.policy, FollowingPolicy):
                group.policy.stop_following()
        self.metrics.redis_errors.labels(error_kind(exc)).inc()
        if self.connected:
            self.metrics.fallbacks.inc()
            log.warning("signaling: Redis unavailable (%s); routing falls back to local regret "
                        "matching, reconnecting with backoff", exc or type(exc).__name__)
        elif not self._ever_failed:  # never connected: a wrong host, port or password
            log.warning("signaling: cannot reach Redis (%s); routing by local regret matching "
                        "until it answers, retrying with backoff", exc or type(exc).__name__)
        self._ever_failed = True
        self.connected = False
        self.metrics.connected.set(0)
        await self.store.close()  # a fresh connection next time, not a half-dead one

    def _export_following(self) -> None:
        """The following gauge of each upstream, and a log line when it changes: the
        signaler stopping (recommendations expire) or coming back shows in the log, as Redis
        does, not only in a gauge. A caller that sends the upstream nothing gets no plan (the
        signaler plans for the demand sidecars report), so its recommendation expires while
        it is idle: no fault, and nothing is said, neither then nor when it follows again;
        only a caller with traffic for :meth:`_busy`'s grace and no plan is warned about (a
        stranger's finding: a request every 7 s made a WARNING blaming the signaler, and an
        INFO line back, at each of them)."""
        for group in self.table:
            if group.dormant:  # a discovered upstream nobody called yet: no series
                continue
            snap = group.snapshot
            following = snap is not None and snap.following
            self.metrics.following.labels(group.name).set(1 if following else 0)
            busy = self._busy(group.name)
            self.metrics.unplanned.labels(group.name).set(0 if following or not busy else 1)
            told = self._told.get(group.name)  # None: nothing said yet
            if following:
                if told != "following":
                    log.info("signaling: upstream %s follows the signaler's plan%s",
                             group.name, "" if told is None else " again")
                    self._told[group.name] = "following"
            elif told == "following" and busy:
                log.warning("signaling: upstream %s has no fresh recommendation (the signaler "
                            "stopped, or cannot be heard): routing by local regret matching",
                            group.name)
                self._told[group.name] = "lost"

    def _busy(self, upstream: str) -> bool:
        """Whether this sidecar's summaries of ``upstream`` have reported demand for long
        enough that the signaler should plan for it: the first recommendation's wait and two
        epochs more."""
        since = self._busy_since.get(upstream)
        grace = (self.settings.first_signal_epochs + 2.0) * self.settings.epoch
        return since is not None and self.clock() - since >= grace

    def _groups(self) -> list[tuple[UpstreamGroup, FollowingPolicy]]:
        """Upstreams whose policy takes part (the baselines neither report nor follow)."""
        return [(g, g.policy) for g in self.table
                if isinstance(g.policy, FollowingPolicy) and g.endpoints and not g.dormant]

    async def run_round(self) -> None:
        """One epoch: publish every upstream's summary and read its newest recommendation."""
        groups = self._groups()
        if not groups:
            return
        self._await_first_signals(groups)
        now, wall = self.clock(), self.wall()
        summaries: list[tuple[str, Fields]] = []
        for group, policy in groups:
            summary = self._summary(group, policy, now, wall)
            if summary is not None:
                summaries.append((group.name, sign_summary(summary, self.settings.key)))
            if summary is None or summary.demand <= 0.0:
                self._busy_since[group.name] = None
            elif self._busy_since.get(group.name) is None:
                self._busy_since[group.name] = now
        newest = await self.store.exchange(
            summaries, [(group.name, self.sidecar) for group, _ in groups])
        for exc in newest.append_errors.values():
            self._key_error(exc)
        for name, _ in summaries:  # counted once appended: not when Redis refused them
            if name not in newest.append_errors:
                self.metrics.summaries.labels(name).inc()
        for (group, policy), entry in zip(groups, newest, strict=True):
            if isinstance(entry, KeyTypeError):
                policy.stop_following()  # this upstream only: its stream cannot be read
                self._key_error(entry)
            elif entry is not None:
                self.consider(group, entry.id, entry.fields)

    def _key_error(self, exc: KeyTypeError) -> None:
        self.metrics.key_errors.labels(exc.upstream, exc.role).inc()
        held = self._notices.due((exc.key, exc.kind), self.clock())
        if held is not None:
            log.warning("signaling: key %s holds a value the plane cannot use (%s); upstream %s "
                        "routes by local regret matching until it is repaired, the others "
                        "carry on (%d more since the last report)", exc.key, exc.kind,
                        exc.upstream, held)

    def _summary(
        self, group: UpstreamGroup, policy: FollowingPolicy, now: float, wall: float
    ) -> RegretSummary | None:
        """This epoch's summary of ``group``; None when there is nothing (valid) to send."""
        builder = self._builders.get(group.name)
        if builder is None:
            builder = self._builders[group.name] = SummaryBuilder(MAX_SECONDS)
        report = builder.build(group.snapshot, policy.take_epoch(), now, wall,
                               self.settings.epoch)
        if report is None:
            return None
        try:
            return RegretSummary(sidecar=self.sidecar, upstream=group.name, **asdict(report))
        except WireError as exc:  # e.g. an endpoint id the protocol cannot carry
            self.metrics.summaries_invalid.labels(group.name, exc.reason.value).inc()
            log.debug("signaling: no summary for %s: %s", group.name, exc)
            return None

    def _await_first_signals(self, groups: list[tuple[UpstreamGroup, FollowingPolicy]]) -> None:
        """Tell each new policy to wait for its first recommendation, and again when its first
        traffic shows (the signaler plans only for sidecars that report demand, so the wait
        counts from there)."""
        until = self.clock() + self.settings.first_signal_epochs * self.settings.epoch
        for group, policy in groups:
            held = self._awaiting.get(group.name)
            if held is None or held[0] is not policy:
                held = self._awaiting[group.name] = (policy, FirstSignalWait())
            snap = group.snapshot
            traffic = snap is not None and any(e.requests for e in snap.endpoints)
            if held[1].step(traffic):
                policy.await_signal(until)

    def consider(self, group: UpstreamGroup, entry_id: str, fields: Any) -> bool:
        """Verify a recommendation entry not seen before and follow it; True if followed."""
        policy = group.policy
        if not isinstance(policy, FollowingPolicy):
            return False
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
        except WireError as exc:
            self.metrics.rejected.labels(group.name, exc.reason.value).inc()
            log.debug("signaling: ignored a recommendation for %s: %s", group.name, exc)
            return False
        followed.epoch = rec.epoch
        followed.fence = rec.fence if followed.fence is None else max(followed.fence, rec.fence)
        policy.follow(rec.weight_map(), self.clock() + (rec.expires_at - wall))
        self.metrics.accepted.labels(group.name).inc()
        return True


# ---------------------------------------------------------------------- wiring


def signaling_settings(config: SidecarConfig, mesh_key: bytes | None) -> SignalingSettings | None:
    """How this sidecar joins the signaling plane (None: ``redis`` is not set); decided
    before the runner starts, so that a missing key is a configuration error (exit 2).

    Security default: with ``redis`` set and no mesh key, the sidecar refuses to start; it
    would otherwise follow routing signals anyone with access to Redis could forge.
    """
    url = config.redis
    if url is None:
        return None
    if mesh_key is None:
        raise ConfigError(
            "redis is set but there is no mesh key to verify recommendations with: set "
            "EQUILIBRIUM_MESH_SECRET or mesh_secret_file (signaling refuses to run unsigned)"
        )
    if (weak := unverified_tls(url)) is not None:
        log.warning("signaling: the Redis URL's TLS verifies nothing (%s)", weak)
    epoch = config.signaling_epoch
    # Reconnect attempts are cheap: retry within a few epochs, at most every 5 s.
    return SignalingSettings(redis_url=url, key=mesh_key, epoch=epoch,
                             backoff_max=min(5.0, max(1.0, 4 * epoch)))
