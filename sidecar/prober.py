"""The caller side of probes: asking each endpoint's inbound sidecar how its app is doing.

Owns the background task (started by :mod:`sidecar.runner`) that probes every endpoint of
every upstream on the timetable of :class:`mesh.probes.ProbeSchedule` (a few probes a second
for an endpoint this sidecar does not use, fewer for one that carries its traffic, jittered),
at most one probe in flight per endpoint, each bounded by ``timeout``. A probe is
``GET <endpoint>/.well-known/equilibrium/probe`` with this sidecar's signed identity (bound to
that request, single-use) and a fresh random nonce (:mod:`wire.probe`); it goes only to
endpoints in the mesh (:mod:`sidecar.membership`: static upstreams unless declared outside it,
discovered endpoints once they answered a request with signed signals); only an answer
signed with the mesh key over that nonce is handed to the policies (``policy.on_probe``) of the
upstreams the endpoint belongs to.
Anything else (no answer, 404 from a server without a sidecar, a forged, unsigned, replayed or
malformed answer) is counted in ``equilibrium_probes{result}`` and changes nothing: such an
endpoint simply is not covered by probes, and the policy keeps exploring it with requests.

Without a mesh key this task does not run (nothing could be verified). It never touches the
request path; a probe is a separate connection from the outbound pool.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Callable

import aiohttp
from yarl import URL

from mesh.notices import NoticeThrottle
from mesh.probes import ProbeRates, ProbeSchedule
from sidecar.membership import MeshMembership
from sidecar.metrics import ProberMetrics
from sidecar.phases import RequestContext
from sidecar.upstreams import UpstreamTable
from wire.errors import WireError
from wire.headers import IDENTITY
from wire.identity import BoundRequest, new_nonce, sign_identity
from wire.probe import PROBE, PROBE_PATH, format_request, is_answer_shaped, parse_answer

log = logging.getLogger(__name__)

__all__ = ["BUSY_WEIGHT", "Prober"]

BUSY_WEIGHT = 0.02
"""An endpoint with at least this routing weight carries this caller's traffic (probed at the
busy rate: its responses report congestion anyway)."""
MAX_ANSWER_BYTES = 1024
REFUSED_NOTICE_INTERVAL = 60.0
"""Seconds between two log lines about one endpoint's refused probe answers."""


class Prober:
    def __init__(
        self,
        table: UpstreamTable,
        *,
        caller_id: str,
        mesh_key: bytes,
        metrics: ProberMetrics,
        rates: ProbeRates | None = None,
        timeout: float = 1.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        membership: MeshMembership | None = None,
    ) -> None:
        self.table = table
        self.membership = membership or MeshMembership()  # who may see the identity
        self.caller_id = caller_id
        self.mesh_key = mesh_key
        self.metrics = metrics
        self.schedule = ProbeSchedule(rates)
        self.timeout = timeout
        self.rng = rng or random.Random()
        self.clock = clock
        self.wall_clock = wall_clock
        self._pending: dict[str, asyncio.Task[None]] = {}
        self._notices = NoticeThrottle(REFUSED_NOTICE_INTERVAL)
        self.sent = 0

    def _endpoints(self) -> tuple[dict[str, list[str]], set[str]]:
        """endpoint -> names of the upstreams it serves; and the endpoints that are busy."""
        owners: dict[str, list[str]] = {}
        busy: set[str] = set()
        for group in self.table:
            if group.dormant:  # no request routes there yet: nothing to probe for
                continue
            for endpoint in group.endpoints:
                owners.setdefault(endpoint, []).append(group.name)
            snapshot = group.snapshot
            if snapshot is not None:
                busy.update(e for e, w in snapshot.weights.items() if w >= BUSY_WEIGHT)
        return owners, busy

    async def run(self) -> None:
        """Probe until cancelled (see the module docstring)."""
        try:
            sign_identity(self.caller_id, self.mesh_key, self.wall_clock(),
                          BoundRequest("GET", "probe", PROBE_PATH), new_nonce(bytes(12)))
        except ValueError as exc:
            log.warning("probes are off: %s", exc)
            return
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        connector = aiohttp.TCPConnector(limit=64, force_close=False)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector,
                                         trust_env=False) as session:
            try:
                while True:
                    now = self.clock()
                    owners, busy = self._endpoints()
                    self.schedule.sync(owners, now, self.rng)
                    for endpoint in self.schedule.due(now, busy, self.rng):
                        if endpoint in self._pending:
                            continue  # the previous probe is still out: never pile up
                        if not self._in_mesh(endpoint, owners[endpoint]):
                            continue  # no identity outside the mesh (sidecar.membership)
                        task = asyncio.create_task(
                            self._probe(session, endpoint, owners[endpoint]))
                        self._pending[endpoint] = task
                        task.add_done_callback(self._forget)
                    next_at = self.schedule.next_at()
                    wait = 0.25 if next_at is None else min(max(next_at - now, 0.005), 0.25)
                    await asyncio.sleep(wait)
            finally:
                for task in list(self._pending.values()):
                    task.cancel()

    def _in_mesh(self, endpoint: str, upstreams: list[str]) -> bool:
        """Whether ``endpoint`` may get this sidecar's identity for one of its upstreams."""
        for name in upstreams:
            ctx = RequestContext(started=0.0, method="GET", target=PROBE_PATH, authority="",
                                 group=self.table.get(name), endpoint=endpoint)
            if self.membership.admits(ctx):
                return True
        return False

    def _forget(self, task: asyncio.Task[None]) -> None:
        for endpoint, pending in list(self._pending.items()):
            if pending is task:
                del self._pending[endpoint]

    async def _probe(self, session: aiohttp.ClientSession, endpoint: str,
                     upstreams: list[str]) -> None:
        nonce = secrets.token_urlsafe(16)
        authority = _authority(endpoint)  # the identity is bound to this one request
        headers = {"Host": authority, PROBE: format_request(nonce), IDENTITY: sign_identity(
            self.caller_id, self.mesh_key, self.wall_clock(),
            BoundRequest("GET", authority, PROBE_PATH), new_nonce(secrets.token_bytes(12)))}
        started = self.clock()
        self.sent += 1
        try:
            async with session.get(endpoint.rstrip("/") + PROBE_PATH, headers=headers,
                                   allow_redirects=False) as response:
                status = response.status
                body = await response.content.read(MAX_ANSWER_BYTES)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            self._count(upstreams, "no-answer")
            log.debug("probe %s: no answer: %r", endpoint, exc)
            return
        done = self.clock()
        if status == 429:  # a sidecar over its probe budget: not now, the usual rate
            self._count(upstreams, "busy")
            return
        text = body.decode("ascii", "replace")
        if status != 200 or not is_answer_shaped(text):  # no sidecar answered it
            self._count(upstreams, "not-meshed")
            self.schedule.refused(endpoint, done, self.rng)
            if status == 200 and (held := self._notices.due((endpoint, "not-meshed"),
                                                            done)) is not None:
                log.info("probe %s: answered by something that is not a sidecar (an app "
                         "outside the mesh that answers every path?)%s", endpoint,
                         f" ({held} more since the last report)" if held else "")
            return
        try:
            report = parse_answer(text, self.mesh_key, nonce)
        except WireError as exc:
            self._count(upstreams, str(exc.reason))
            self.schedule.refused(endpoint, done, self.rng)
            held = self._notices.due((endpoint, str(exc.reason)), done)
            if held is not None:  # once a minute per endpoint and reason, not per probe
                log.info("probe %s: answer refused: %s%s", endpoint, exc,
                         f" ({held} more since the last report)" if held else "")
            return
        self.schedule.answered(endpoint)
        self.metrics.duration.observe(done - started)
        self._count(upstreams, "ok")
        for name in upstreams:
            group = self.table.get(name)
            if group is not None and endpoint in group.endpoints:
                group.policy.on_probe(endpoint, report, done)

    def _count(self, upstreams: list[str], result: str) -> None:
        for name in upstreams:
            self.metrics.probes.labels(name, result).inc()


def _authority(endpoint: str) -> str:
    """The ``Host`` a probe to ``endpoint`` (``http://HOST:PORT``) is sent with."""
    url = URL(endpoint)
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"
    return host if url.port in (None, 80) else f"{host}:{url.port}"
