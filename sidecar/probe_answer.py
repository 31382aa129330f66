"""The inbound side of probes: answering a caller's probe without touching the app.

Owns ``GET /.well-known/equilibrium/probe`` on the inbound listener (:data:`wire.probe.PROBE_PATH`):
:class:`ProbeResponder` checks the caller's signed identity and the probe's nonce, bounds the
rate of answers, and answers with what the listener knows of its app (requests in flight, the
latency of the last window's requests, congestion level, concurrency limit, draining), signed
with the mesh key over the caller's nonce (:mod:`wire.probe`). Without a mesh key nothing can be
signed, so the path answers 404 like any unmeshed server: a probe answer from outside the mesh
is worth nothing.

It also owns the record those answers are made from (:class:`mesh.probes.LatencyWindow`, fed
by :mod:`sidecar.inbound` with each request the app finished) and the optional *idle check*:
when the app has served nobody for ``idle_after`` seconds (every caller's probes told it to
avoid this pod), :meth:`ProbeResponder.check_app` sends one ``GET`` to the configured path of
the app every eighth of a second, at most one at a time, so that a pod that heals is seen to
heal without a user request being spent on it: the answers are made of the last 16 samples
(:class:`mesh.probes.LatencyWindow`), which a healed pod replaces in about 2 s. It costs the
app at most eight requests a second however many callers probe, and it is off unless
``policing.app_check_path`` is set; without it an idle pod's answers carry no latency
(``n=0``) and callers fall back to exploring it with user requests.

It must not forward a probe to the app, and it never answers an unverified caller.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Protocol

import aiohttp

from mesh.probes import AwaitedAnswers, LatencyWindow, ProbeReport
from sidecar.exchange import TEXT_TYPE, Answer, RequestHead, json_answer
from sidecar.metrics import ProbeAnswerMetrics
from wire.errors import Reason, WireError
from wire.headers import IDENTITY
from wire.identity import BoundRequest, IdentityRejection, verify_identity
from wire.nonces import NonceBook
from wire.probe import PROBE, PROBE_PATH, format_answer, parse_request

log = logging.getLogger(__name__)

__all__ = ["ProbeResponder", "ProbeResult", "ProbedApp", "is_probe"]

ANSWER_RATE = 200.0
"""Probe answers per second, all callers together (a few per second per caller and endpoint
is what the prober sends; the rest is refused with 429)."""
ANSWER_BURST = 100.0
IDLE_AFTER = 0.5
CHECK_INTERVAL = 0.125
"""Seconds between idle checks: 16 samples (the window's floor) in about 2 s."""
FAILED_CHECK = 1.0
"""Seconds a failed idle check (a 5xx, no answer) counts as, at least: what a caller's sidecar
charges a failed request (the profiles' ``failure_penalty``). It was the check's whole time
budget, 15 s: an app failing half its checks quickly read as a latency of 10 s in the answers,
the callers' estimates and their logs, which points an operator at a slow pod, not a failing
one."""


class ProbeResult(StrEnum):
    """The ``result`` label of ``equilibrium_inbound_probes``."""

    ANSWERED = "answered"
    UNTRUSTED = "untrusted"
    """403: the caller's identity did not verify."""
    MALFORMED = "malformed"
    """400: no or a bad ``X-GT-Probe`` header."""
    RATE_LIMITED = "rate-limited"
    """429: more probes than :data:`ANSWER_RATE` per second."""
    NO_KEY = "no-key"
    """404: this sidecar has no mesh key, so it cannot sign an answer."""


class ProbedApp(Protocol):
    """What the responder reads of the inbound listener (:class:`sidecar.inbound.InboundProxy`)."""

    in_flight: int

    def probe_load(self) -> tuple[float, int]:
        """(congestion level in [0, 1], concurrency limit)."""
        ...


def is_probe(request: RequestHead) -> bool:
    """Whether a request to the inbound listener is a probe for this sidecar to answer."""
    return request.method == "GET" and request.raw_path == PROBE_PATH


class ProbeResponder:
    def __init__(
        self,
        app: ProbedApp,
        *,
        mesh_key: bytes | None,
        metrics: ProbeAnswerMetrics,
        max_skew: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        window: LatencyWindow | None = None,
        nonces: NonceBook | None = None,
    ) -> None:
        self.app = app
        self.mesh_key = mesh_key
        self.metrics = metrics
        self.max_skew = max_skew
        self.clock = clock
        self.wall_clock = wall_clock
        self.window = window or LatencyWindow()
        self.nonces = nonces or NonceBook(max_skew)  # the listener's, so one use in all
        self.draining: Callable[[], bool] = lambda: False
        self.served_at: float | None = None
        """When the app last finished a request of a caller (the idle check's own excluded)."""
        self.awaited = AwaitedAnswers()
        """Callers' requests at the app with no answer head yet (the listeners keep it)."""
        self._tokens, self._tokens_at = ANSWER_BURST, clock()
        self._check_unusable = False  # the idle check got no HTTP/1.1 answer (logged once)

    def record(self, now: float, latency: float) -> None:
        """The app finished a caller's request in ``latency`` seconds (called by the
        listener)."""
        self.window.add(now, latency)
        self.served_at = now

    def report(self, now: float) -> ProbeReport:
        mean, p50, p90, n = self.awaited.fold(now, self.window.summary(now))
        congestion, limit = self.app.probe_load()
        return ProbeReport(in_flight=self.app.in_flight, mean=mean, p50=p50, p90=p90,
                           samples=n, congestion=congestion, limit=limit,
                           draining=self.draining())

    def _take_token(self, now: float) -> bool:
        self._tokens = min(ANSWER_BURST, self._tokens + (now - self._tokens_at) * ANSWER_RATE)
        self._tokens_at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _refuse(self, result: ProbeResult, status: int, detail: str) -> Answer:
        self.metrics.probes.labels(result).inc()
        return json_answer(status, {"error": detail, "reason": str(result)})

    def answer(self, request: RequestHead) -> Answer:
        """The answer to one probe (see the module docstring)."""
        if self.mesh_key is None:
            return self._refuse(ProbeResult.NO_KEY, 404, "this sidecar answers no probes")
        now = self.clock()
        wall = self.wall_clock()
        # the caller first (one HMAC): probes from outside the mesh, forged or replayed, must
        # not spend the rate budget that the mesh's own probers share
        checked = verify_identity(
            request.headers.get(IDENTITY), self.mesh_key, wall, self.max_skew,
            BoundRequest(request.method, request.headers.get("Host", ""), request.raw_path))
        if isinstance(checked, IdentityRejection):
            return self._refuse(ProbeResult.UNTRUSTED, 403,
                                f"probes are answered to the mesh only ({checked.reason})")
        if not self.nonces.first_use(checked.nonce, checked.issued_at, wall):
            return self._refuse(ProbeResult.UNTRUSTED, 403,
                                f"probes are answered to the mesh only ({Reason.REPLAYED})")
        if not self._take_token(now):
            return self._refuse(ProbeResult.RATE_LIMITED, 429, "too many probes")
        try:
            nonce = parse_request(request.headers.get(PROBE))
        except WireError as exc:
            return self._refuse(ProbeResult.MALFORMED, 400, str(exc))
        self.metrics.probes.labels(ProbeResult.ANSWERED).inc()
        body = format_answer(self.mesh_key, nonce, self.report(now))
        return Answer(200, body.encode(), {"Cache-Control": "no-store"}, TEXT_TYPE)

    async def check_app(self, app_url: str, path: str | None, timeout: float) -> None:
        """Background task: the idle check (module docstring); returns at once without a
        path."""
        if not path:
            return
        url = app_url.rstrip("/") + path
        client_timeout = aiohttp.ClientTimeout(total=timeout)
        async with aiohttp.ClientSession(timeout=client_timeout, trust_env=False) as session:
            while True:
                await asyncio.sleep(CHECK_INTERVAL)
                # idle: no caller's request for IDLE_AFTER (the checks' own samples do not
                # count, or the checks would come every IDLE_AFTER, not every CHECK_INTERVAL)
                last = self.served_at
                if self.app.in_flight or (last is not None
                                          and self.clock() - last < IDLE_AFTER):
                    continue
                started = self.clock()
                spoke = True  # the app answered HTTP/1.1, or said nothing at all
                try:
                    async with session.get(url, allow_redirects=False) as response:
                        await response.read()
                        ok = response.status < 500
                except (aiohttp.ClientConnectorError, TimeoutError) as exc:
                    ok = False  # not listening, or hung: the app's failure
                    log.debug("app check %s failed: %r", url, exc)
                except (aiohttp.ClientError, OSError) as exc:
                    # it hung up on an HTTP/1.1 request or answered something else (a gRPC
                    # app speaks HTTP/2 only): the check says nothing of the app, and
                    # charged as a failure it made a healthy pod look slow (a helper's
                    # finding); said once
                    ok, spoke = False, False
                    if not self._check_unusable:
                        self._check_unusable = True
                        log.warning("app check %s gets no HTTP/1.1 answer from the app (%r): "
                                    "its checks are not counted in probe answers (a gRPC "
                                    "app? docs/protocol.md, 'Idle check')", url, exc)
                now = self.clock()
                self.metrics.app_checks.labels("ok" if ok else "failed").inc()
                if ok:
                    self.window.add(now, now - started)
                elif spoke:  # charged as a caller's sidecar charges a failed request
                    self.window.add(now, max(FAILED_CHECK, now - started))
