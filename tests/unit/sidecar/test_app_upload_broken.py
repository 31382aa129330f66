"""An app whose upload breaks off is not the endpoint's failure.

The outbound listener's HTTP/1.1 server, the real proxy and its real upstream client, in
front of an aiohttp upstream on loopback that reads whole bodies. The app (raw sockets) sends
a POST and then half-closes short of its ``Content-Length``, or garbles its chunked framing.
Or it stalls mid-upload. Either way the endpoint did nothing wrong, and did nothing right
either: the policy learns nothing from the attempt (its failures, failure streak and latency
estimate stay as they were), it is not answered as an upstream error, and the app, if it can
still read, is told its body did not arrive (400) or stalled (408).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mesh.policy import Outcome
from mesh.profiles import get_profile
from sidecar.h2_site import OutboundSite
from sidecar.http1.client import H1Transport
from sidecar.metrics import H2Metrics, SidecarMetrics
from sidecar.outbound import OutboundProxy
from sidecar.upstreams import UpstreamTable

STALL = 0.5  # the request timeout: the longest a stall may last


@dataclasses.dataclass
class Rig:
    port: int
    metrics: SidecarMetrics
    table: UpstreamTable
    upstream: str
    bodies: list[bytes]
    heads: list[str]  # every request the upstream began to receive

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def failures(self) -> int:
        group = self.table.get("users")
        assert group is not None
        snapshot = group.policy.snapshot()
        return sum(view.failures for view in snapshot.endpoints)

    def learned(self) -> tuple[int, int, int, float]:
        """What the policy knows of the endpoint: requests, failures, failure streak,
        latency estimate."""
        group = self.table.get("users")
        assert group is not None
        stats = group.policy.stats[self.upstream]  # type: ignore[attr-defined]
        return (stats.requests, stats.failures, stats.consecutive_failures,
                stats.latency_estimate(0.0))

    def fail_twice(self) -> None:
        """Two failures of the endpoint the policy saw before the test's request."""
        group = self.table.get("users")
        assert group is not None
        for _ in range(2):
            group.policy.on_start(self.upstream, 0.0)
            group.policy.on_outcome(Outcome(self.upstream, 1.0, False, 0.0))


async def _no_h2(stream: object) -> None:
    raise AssertionError("no HTTP/2 here")


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    bodies: list[bytes] = []
    heads: list[str] = []

    async def echo(request: web.Request) -> web.Response:
        heads.append(request.path)
        body = await request.read()
        bodies.append(body)
        return web.Response(body=body)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    upstream = TestServer(app, host="127.0.0.1")
    await upstream.start_server()
    endpoint = f"http://127.0.0.1:{upstream.port}"
    profile = dataclasses.replace(get_profile("balanced"), request_timeout=STALL)
    table = UpstreamTable("round-robin", profile)
    table.apply({"users": (endpoint,)}, 0.0)
    metrics = SidecarMetrics()
    transport = H1Transport(connect_timeout=1.0)
    proxy = OutboundProxy(sidecar_id="h1", table=table, profile=profile,
                          metrics=metrics.outbound, rng=random.Random(1), transport=transport)
    runner = web.AppRunner(proxy.make_app(), access_log=None)
    await runner.setup()
    site = OutboundSite(runner, "127.0.0.1", 0, handler=_no_h2,
                        metrics=H2Metrics(metrics.registry), drain_timeout=1.0,
                        max_connections=100, http1=proxy.serve)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield Rig(port, metrics, table, endpoint, bodies, heads)
    await runner.cleanup()
    await transport.close()
    await upstream.close()


async def _settled(rig: Rig) -> None:
    """Until the attempt has been observed (in flight back to zero)."""
    group = rig.table.get("users")
    assert group is not None
    for _ in range(100):
        if all(view.in_flight == 0 for view in group.policy.snapshot().endpoints):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the attempt was never observed")


async def test_an_app_half_closing_short_of_its_length_gets_400_and_charges_nobody(
    rig: Rig,
) -> None:
    rig.fail_twice()
    before = rig.learned()
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: users\r\nContent-Length: 100\r\n\r\n0123456789")
    await writer.drain()
    await asyncio.sleep(0.1)  # the attempt is under way, its body part-sent
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 5)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"connection: close" in head.lower()
    assert json.loads(body)["reason"] == "app-hung-up"
    await _settled(rig)
    assert rig.learned() == before  # neither a failure nor a success: the streak stays
    assert rig.sample("equilibrium_errors_total", upstream="users", reason="app-hung-up") == 1
    assert rig.sample("equilibrium_errors_total", upstream="users",
                      reason="upstream-protocol-error") == 0
    assert rig.sample("equilibrium_requests_total", upstream="users", endpoint=rig.upstream,
                      code="upstream-protocol-error") == 0
    assert rig.bodies == []  # the upstream never saw a whole request
    writer.close()


async def test_an_app_garbling_its_chunks_mid_upload_charges_nobody(rig: Rig) -> None:
    before = rig.learned()
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: users\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"5\r\nhello\r\n")
    await writer.drain()
    await asyncio.sleep(0.1)  # the attempt is under way
    writer.write(b"zz\r\nbad\r\n")  # not a chunk size: the body is broken
    answer = await asyncio.wait_for(reader.read(), 5)
    head, _, body = answer.partition(b"\r\n\r\n")  # told so (it used to be cut unanswered)
    assert head.startswith(b"HTTP/1.1 400") and b"connection: close" in head.lower()
    assert json.loads(body)["reason"] == "app-hung-up"
    assert b"broke its framing" in body
    await _settled(rig)
    assert rig.learned() == before
    assert rig.sample("equilibrium_errors_total", upstream="users", reason="app-hung-up") == 1
    assert rig.sample("equilibrium_http1_rejected_requests_total", reason="malformed") == 1
    writer.close()


async def test_a_body_broken_before_the_attempt_is_never_sent(rig: Rig) -> None:
    # The review's finding: framing that broke in the same read as the head still went out
    # as an attempt (head and the first chunk upstream, then a cut). It is answered at once.
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: users\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"5\r\nhello\r\nzz\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 400") and b"app-hung-up" in answer
    attempts = [sample for family in rig.metrics.registry.collect()
                if family.name == "equilibrium_requests"
                for sample in family.samples if sample.name.endswith("_total")]
    assert attempts == [] and rig.heads == []  # no attempt was made
    writer.close()


async def test_an_app_stalling_its_upload_gets_408_and_charges_nobody(rig: Rig) -> None:
    rig.fail_twice()
    before = rig.learned()
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: users\r\nContent-Length: 100\r\n\r\n0123456789")
    await writer.drain()  # and nothing more: the request timeout runs out on the app
    answer = await asyncio.wait_for(reader.read(), 10 * STALL)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and json.loads(body)["reason"] == "upload-timeout"
    await _settled(rig)
    assert rig.learned() == before
    assert rig.sample("equilibrium_errors_total", upstream="users", reason="upload-timeout") == 1
    assert rig.sample("equilibrium_requests_total", upstream="users", endpoint=rig.upstream,
                      code="upstream-timeout") == 0
    writer.close()


async def test_a_whole_upload_still_goes_through(rig: Rig) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: users\r\nContent-Length: 10\r\n\r\n0123456789")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    assert await asyncio.wait_for(reader.readexactly(10), 5) == b"0123456789"
    assert rig.bodies == [b"0123456789"] and rig.failures() == 0
    writer.close()
