"""The inbound side of probes, in process: who gets an answer, and what it says."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from prometheus_client import CollectorRegistry

from sidecar.metrics import ProbeAnswerMetrics
from sidecar.policing_config import parse_policing
from sidecar.probe_answer import (
    CHECK_INTERVAL,
    FAILED_CHECK,
    IDLE_AFTER,
    ProbeResponder,
    is_probe,
)
from wire.identity import BoundRequest, new_nonce, sign_identity
from wire.probe import PROBE, PROBE_PATH, format_request, parse_answer

KEY = b"probe-answer-test-key-0123456789"
NONCE = "0123456789abcdefghijkl"
HOST = "pod-1:8080"


class App:
    in_flight = 3

    def probe_load(self) -> tuple[float, int]:
        return 0.25, 12


def responder(key: bytes | None = KEY) -> ProbeResponder:
    """A responder whose clock stands still (so no token comes back)."""
    return ProbeResponder(App(), mesh_key=key, metrics=ProbeAnswerMetrics(CollectorRegistry()),
                          max_skew=30.0, clock=lambda: 5.0, wall_clock=lambda: 1_800_000_000.0)


def probe(identity: str | None = None, nonce: str | None = NONCE) -> web.Request:
    headers = {"Host": HOST}
    if identity is not None:
        headers["X-GT-Identity"] = identity
    if nonce is not None:
        headers[PROBE] = format_request(nonce)
    return make_mocked_request("GET", PROBE_PATH, headers=headers)


def signed(key: bytes = KEY, caller: str = "caller-1", target: str = PROBE_PATH) -> str:
    """A fresh identity, bound to a probe of this pod (or to ``target``)."""
    return sign_identity(caller, key, 1_800_000_000.0, BoundRequest("GET", HOST, target),
                         new_nonce(os.urandom(12)))


def test_only_a_get_of_the_reserved_path_is_a_probe() -> None:
    assert is_probe(probe())
    assert not is_probe(make_mocked_request("POST", PROBE_PATH))
    assert not is_probe(make_mocked_request("GET", PROBE_PATH + "?x=1"))
    assert not is_probe(make_mocked_request("GET", "/"))


def test_a_mesh_caller_gets_a_signed_answer_of_the_window_and_the_load() -> None:
    r = responder()
    for latency in (0.010, 0.020, 0.030):
        r.record(4.0, latency)  # within the last 2 s of the clock (5.0)
    r.draining = lambda: True
    answer = r.answer(probe(signed()))
    assert answer.status == 200
    assert answer.content_type.startswith("text/plain")
    report = parse_answer(answer.body.decode(), KEY, NONCE)
    assert (report.in_flight, report.samples, report.limit, report.draining) == (3, 3, 12, True)
    assert (report.p50, report.p90, report.congestion) == (0.020, 0.030, 0.25)
    assert abs(report.mean - 0.020) < 1e-9


def test_an_answer_states_the_stall_of_requests_waiting_at_the_app() -> None:
    r = responder()
    for latency in (0.010, 0.020, 0.030):
        r.record(4.0, latency)
    r.awaited.sent(2.0)
    r.awaited.sent(3.0)  # the clock stands at 5.0: two requests unanswered for 2 s and more
    report = parse_answer(r.answer(probe(signed())).body.decode(), KEY, NONCE)
    assert (report.mean, report.p50, report.p90, report.samples) == (2.0, 2.0, 2.0, 3)


def test_strangers_bad_probes_and_floods_get_no_answer() -> None:
    assert responder(key=None).answer(probe(signed())).status == 404  # cannot sign
    r = responder()
    assert r.answer(probe()).status == 403  # no identity
    assert r.answer(probe(signed(b"another-key-0123456789abcdef", "x"))).status == 403
    assert r.answer(probe(signed(), nonce=None)).status == 400
    statuses = [r.answer(probe(signed())).status for _ in range(300)]  # at one instant
    # the burst of 100 answers, less the malformed probe above (a mesh caller's: it took a
    # token); the strangers' refusals took none
    assert statuses.count(200) == 99 and statuses[99:] == [429] * 201
    counted = {s.labels["result"]: s.value for m in r.metrics.probes.collect()
               for s in m.samples if s.name.endswith("_total")}
    assert counted["untrusted"] == 2 and counted["malformed"] == 1
    assert counted["rate-limited"] == 201 and counted["answered"] == 99


def test_a_strangers_flood_leaves_the_mesh_its_probe_budget() -> None:
    r = responder()
    forged = signed(b"another-key-0123456789abcdef", "x")
    assert {r.answer(probe(identity)).status
            for identity in [None, forged] * 500} == {403}  # 1,000 at one instant
    assert [r.answer(probe(signed())).status for _ in range(100)] == [200] * 100


def test_the_idle_check_path_is_a_path() -> None:
    assert parse_policing({"app_check_path": "/healthz"}).app_check_path == "/healthz"
    assert parse_policing({}).app_check_path is None
    for bad in ("healthz", "/a b", 5, "/" + "x" * 300):
        try:
            parse_policing({"app_check_path": bad})
        except ValueError as exc:
            assert "app_check_path" in str(exc)
        else:
            raise AssertionError(f"{bad!r} accepted")


def test_an_identity_for_another_request_or_used_twice_gets_no_answer() -> None:
    r = responder()
    assert r.answer(probe(signed(target="/orders"))).status == 403  # bound to another target
    identity = signed()
    assert r.answer(probe(identity)).status == 200
    assert r.answer(probe(identity)).status == 403  # replayed


async def _health_app(health: Callable[[web.Request], Awaitable[web.Response]]
                      ) -> tuple[web.AppRunner, int]:
    """An app on loopback answering ``GET /healthz`` with ``health``: its runner and port."""
    app = web.Application()
    app.router.add_get("/healthz", health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


@contextlib.asynccontextmanager
async def _checking(port: int, timeout: float) -> AsyncIterator[ProbeResponder]:
    """A responder whose app has nothing in flight (only the checks measure it), its idle
    check of ``http://127.0.0.1:PORT/healthz`` running while the block does."""
    unused = App()
    unused.in_flight = 0
    r = ProbeResponder(unused, mesh_key=KEY, metrics=ProbeAnswerMetrics(CollectorRegistry()),
                       max_skew=30.0, clock=asyncio.get_running_loop().time)
    task = asyncio.create_task(r.check_app(f"http://127.0.0.1:{port}", "/healthz", timeout))
    try:
        yield r
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_idle_check_comes_every_check_interval_and_stops_while_callers_are_served(
) -> None:
    """An idle app is checked every CHECK_INTERVAL (the checks' own samples do not make it
    look busy, or they would come only every IDLE_AFTER, too few for the window's floor of
    16 to be refreshed in about 2 s); a caller's request makes it busy again."""
    checks: list[float] = []

    async def health(_: web.Request) -> web.Response:
        checks.append(asyncio.get_running_loop().time())
        return web.Response(text="ok")

    runner, port = await _health_app(health)
    loop = asyncio.get_running_loop()
    try:
        async with _checking(port, 1.0) as r:
            await asyncio.sleep(1.5)
            idle = len(checks)
            # at least twice what one check per IDLE_AFTER would give (3 in 1.5 s)
            assert idle >= 2 * 1.5 / IDLE_AFTER, f"{idle} checks in 1.5 s"
            assert r.window.summary(loop.time())[3] == idle  # each recorded, all within 2 s
            assert r.served_at is None  # the checks are not callers' requests
            busy_at = loop.time()
            for _ in range(8):  # callers' requests every 0.1 s: the app is busy, no check
                r.record(loop.time(), 0.01)
                await asyncio.sleep(0.1)
            assert [t for t in checks if t > busy_at + 0.05] == []
            await asyncio.sleep(IDLE_AFTER + 4 * CHECK_INTERVAL)  # idle again: checked again
            assert checks[-1] > busy_at + 0.8
    finally:
        await runner.cleanup()


async def test_a_failed_idle_check_counts_as_a_failure_not_as_the_whole_time_budget() -> None:
    """A helper's finding: an app failing half its checks at once read as a latency of 10 s
    (each failed check counted as the 15 s budget), in the answers and in the callers' logs.
    A failed check is now charged as a caller charges a failure: at least 1 s."""

    async def health(_: web.Request) -> web.Response:
        return web.Response(status=503, text="no")

    runner, port = await _health_app(health)
    try:
        async with _checking(port, 15.0) as r:
            await asyncio.sleep(IDLE_AFTER + 4 * CHECK_INTERVAL)
            mean, p50, p90, n = r.window.summary(asyncio.get_running_loop().time())
            assert n >= 2 and p50 == p90 == FAILED_CHECK == 1.0 and mean == 1.0
    finally:
        await runner.cleanup()


async def test_an_app_that_speaks_no_http1_is_not_charged_for_the_checks(
        caplog: pytest.LogCaptureFixture) -> None:
    """A helper's finding: behind its inbound sidecar, a gRPC app (HTTP/2 only) failed every
    HTTP/1.1 idle check; each counted as 1 s and made the healed pod look slow, so callers
    never took it back. A check the app hangs up on says nothing of it: not recorded, said
    once in the log."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.readuntil(b"\r\n\r\n")
        writer.write(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00")  # HTTP/2 bytes, not a status line
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    try:
        async with _checking(server.sockets[0].getsockname()[1], 15.0) as r:
            with caplog.at_level("WARNING", logger="sidecar.probe_answer"):
                await asyncio.sleep(IDLE_AFTER + 4 * CHECK_INTERVAL)
            assert r.window.summary(asyncio.get_running_loop().time())[3] == 0
            warned = [rec for rec in caplog.records if "gets no HTTP/1.1 answer" in rec.message]
            assert len(warned) == 1
    finally:
        server.close()
