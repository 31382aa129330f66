"""The upstream transport seam: the real listeners driven against an in-memory transport.

The app talks HTTP to a real :class:`OutboundProxy` (or :class:`InboundProxy`) on loopback; the
upstreams are a :class:`MemoryTransport` handler, so routing, retries, header rules and body
streaming are checked without any socket to an upstream and without mocking the proxy. The
process tests (test_sidecar_http, test_sidecar_retries) check the same rules over real sockets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry
from yarl import URL

from mesh.profiles import get_profile
from sidecar.h2_site import OutboundSite
from sidecar.inbound import InboundProxy
from sidecar.metrics import H2Metrics, InboundMetrics, SidecarMetrics
from sidecar.outbound import OutboundProxy
from sidecar.policing_config import parse_policing
from sidecar.transport import (
    AiohttpTransport,
    ConnectError,
    ConnectTimeout,
    MemoryBody,
    MemoryResponse,
    MemoryTransport,
    TransportError,
    UpstreamRequest,
    UpstreamReset,
    WebSocketDialer,
    classify,
    from_aiohttp,
)
from sidecar.upstreams import UpstreamTable

USERS = ("http://10.0.0.1:8080", "http://10.0.0.2:8080")
ORDERS = ("http://10.0.1.1:9090",)
VIA = "1.1 unit-sidecar"


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    url: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Upstreams:
    """The in-memory network: records every attempt, answers with ``respond``."""

    respond: Callable[[UpstreamRequest, int], Awaitable[MemoryResponse]]
    seen: list[Seen] = field(default_factory=list)
    answers: list[MemoryResponse] = field(default_factory=list)
    # attempt n -> the failure of a connection that could not be had (raised before the
    # body is read, as a real transport's connect error is)
    unreachable: dict[int, TransportError] = field(default_factory=dict)

    async def __call__(self, request: UpstreamRequest) -> MemoryResponse:
        failure = self.unreachable.get(len(self.seen) + 1)
        if failure is not None:
            self.seen.append(Seen(request.method, str(request.url), dict(request.headers), b""))
            raise failure
        body = b""
        if request.body is not None:
            body = b"".join([chunk async for chunk in request.body])
        self.seen.append(Seen(request.method, str(request.url), dict(request.headers), body))
        answer = await self.respond(request, len(self.seen))
        self.answers.append(answer)
        return answer


def answer(status: int = 200, body: bytes = b"ok", **headers: str) -> Callable[
    [UpstreamRequest, int], Awaitable[MemoryResponse]
]:
    async def respond(request: UpstreamRequest, n: int) -> MemoryResponse:
        return MemoryResponse(status, headers, body)

    return respond


@dataclass
class Rig:
    proxy: OutboundProxy
    upstreams: Upstreams
    client: aiohttp.ClientSession
    metrics: SidecarMetrics

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


MakeRig = Callable[..., Awaitable[Rig]]


async def _no_h2(stream: object) -> None:
    raise AssertionError("no HTTP/2 in these tests")


@pytest.fixture(params=["http1", "aiohttp"])
async def outbound(request: pytest.FixtureRequest) -> AsyncIterator[MakeRig]:
    """The proxy behind the outbound listener's socket: the sidecar's HTTP/1.1 server (which
    hands upgrades to aiohttp), or aiohttp's own server (transparent interception's)."""
    listener = request.param
    closers: list[Callable[[], Awaitable[object]]] = []

    async def make(respond: Callable[[UpstreamRequest, int], Awaitable[MemoryResponse]],
                   request_timeout: float = 5.0) -> Rig:
        profile = dataclasses.replace(get_profile("balanced"), request_timeout=request_timeout)
        table = UpstreamTable("round-robin", profile)
        table.apply({"users": USERS, "orders": ORDERS}, 0.0)
        upstreams = Upstreams(respond)
        metrics = SidecarMetrics()
        proxy = OutboundProxy(sidecar_id="unit-sidecar", table=table, profile=profile,
                              metrics=metrics.outbound, rng=random.Random(7),
                              transport=MemoryTransport(upstreams))
        await proxy.start()  # nothing to open: the transport was passed in
        runner = web.AppRunner(proxy.make_app(), access_log=None)
        await runner.setup()
        closers.append(runner.cleanup)
        if listener == "http1":
            site: web.BaseSite = OutboundSite(
                runner, "127.0.0.1", 0, handler=_no_h2, metrics=H2Metrics(metrics.registry),
                drain_timeout=1.0, http1=proxy.serve)
        else:
            site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        client = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}")
        closers.insert(0, client.close)
        return Rig(proxy, upstreams, client, metrics)

    yield make
    for close in closers:
        await close()


# ---------------------------------------------------------------- routing


async def test_host_picks_the_upstream_and_the_target_is_kept(outbound: MakeRig) -> None:
    rig = await outbound(answer(body=b"hello"))
    async with rig.client.get("/items?page=2", headers={"Host": "orders:80"}) as resp:
        assert resp.status == 200 and await resp.read() == b"hello"
    [seen] = rig.upstreams.seen
    assert seen.method == "GET" and seen.url == "http://10.0.1.1:9090/items?page=2"
    assert seen.headers["Host"] == "orders:80"  # the authority the app used, untouched
    assert rig.upstreams.answers[0].released and not rig.upstreams.answers[0].closed


async def test_unknown_upstream_and_loops_never_reach_the_transport(outbound: MakeRig) -> None:
    rig = await outbound(answer())
    async with rig.client.get("/", headers={"Host": "nobody"}) as resp:
        assert resp.status == 404 and (await resp.json())["reason"] == "unknown-upstream"
    async with rig.client.get("/", headers={"Host": "users", "Via": VIA}) as resp:
        assert resp.status == 508 and (await resp.json())["reason"] == "loop-detected"
    assert rig.upstreams.seen == []


async def test_made_up_hosts_make_no_metric_series_of_their_own(outbound: MakeRig) -> None:
    # the upstream label of an error before routing is "", whatever the Host: a caller
    # cycling through names must not grow the registry one series per name
    rig = await outbound(answer())
    for i in range(20):
        async with rig.client.get("/", headers={"Host": f"made-up-{i}"}) as resp:
            assert resp.status == 404
    labels = {sample.labels["upstream"] for family in rig.metrics.registry.collect()
              if family.name == "equilibrium_errors" for sample in family.samples}
    assert labels == {""}
    assert rig.sample("equilibrium_errors_total", upstream="", reason="unknown-upstream") == 20


async def test_round_robin_spreads_over_the_upstreams_endpoints(outbound: MakeRig) -> None:
    rig = await outbound(answer())
    for _ in range(4):
        async with rig.client.get("/", headers={"Host": "users"}) as resp:
            assert resp.status == 200
    hits = [seen.url.rsplit("/", 1)[0] for seen in rig.upstreams.seen]
    assert sorted(hits) == sorted(USERS * 2)


# ---------------------------------------------------------------- headers


async def test_hop_by_hop_headers_are_dropped_and_via_xff_appended(outbound: MakeRig) -> None:
    rig = await outbound(answer(**{
        "Keep-Alive": "timeout=5", "Connection": "X-Upstream-Hop", "X-Upstream-Hop": "1",
        "X-GT-Congestion": "0.5", "X-End": "kept",
    }))
    sent = {"Host": "users", "Connection": "keep-alive, X-App-Hop", "X-App-Hop": "1",
            "Proxy-Authorization": "Basic eA==", "X-Forwarded-For": "10.9.9.9",
            "X-GT-Bid": "9", "traceparent": "00-abc-def-01"}
    async with rig.client.get("/", headers=sent) as resp:
        assert resp.status == 200
        got = resp.headers
        assert got["X-End"] == "kept" and got["Via"] == VIA
        assert "X-Upstream-Hop" not in got and "Keep-Alive" not in got
        assert "X-GT-Congestion" not in got  # consumed by the proxy, not handed to the app
    headers = rig.upstreams.seen[0].headers
    assert headers["Via"] == VIA and headers["traceparent"] == "00-abc-def-01"
    assert headers["X-Forwarded-For"] == "10.9.9.9, 127.0.0.1"
    assert headers["X-Forwarded-Proto"] == "http"
    for hop in ("Connection", "X-App-Hop", "Proxy-Authorization"):
        assert hop not in headers
    assert "X-GT-Bid" not in headers  # the app's game headers never leave unvalidated
    assert rig.sample("equilibrium_rejected_headers_total", header="X-GT-Bid",
                      reason="from-app") == 1
    assert rig.sample("equilibrium_rejected_headers_total", header="X-GT-Congestion",
                      reason="malformed") == 1  # "0.5" is not a v=1 congestion value


async def test_game_header_names_the_app_makes_up_are_one_metric_label(
        outbound: MakeRig) -> None:
    """The app chooses the names of the X-GT-* headers it sends; each made-up one is counted
    under the one label ``X-GT-*``, so no caller can make new time series with names."""
    rig = await outbound(answer())
    for i in range(5):
        sent = {"Host": "users", f"X-GT-Made-Up-{i}": "1", "x-gt-bid": "v=1;amount=3"}
        async with rig.client.get("/", headers=sent) as resp:
            assert resp.status == 200
    assert rig.sample("equilibrium_rejected_headers_total", header="X-GT-*",
                      reason="from-app") == 5
    assert rig.sample("equilibrium_rejected_headers_total", header="X-GT-Bid",
                      reason="from-app") == 5
    labels = {sample.labels["header"]
              for family in rig.metrics.registry.collect()
              if family.name == "equilibrium_rejected_headers" for sample in family.samples}
    assert labels == {"X-GT-*", "X-GT-Bid"}
    assert all(not any(k.lower().startswith("x-gt-") for k in seen.headers)
               for seen in rig.upstreams.seen)


async def test_head_204_and_304_answers_carry_no_body(outbound: MakeRig) -> None:
    async def respond(request: UpstreamRequest, n: int) -> MemoryResponse:
        status = {"/none": 204, "/same": 304}.get(request.url.path, 200)
        return MemoryResponse(status, {"Content-Length": "5"}, b"bytes")

    rig = await outbound(respond)
    for method, path, status in (("HEAD", "/", 200), ("GET", "/none", 204),
                                 ("GET", "/same", 304), ("GET", "/", 200)):
        async with rig.client.request(method, path, headers={"Host": "users"}) as resp:
            assert resp.status == status
            assert await resp.read() == (b"bytes" if (method, status) == ("GET", 200) else b"")


# ---------------------------------------------------------------- bodies


async def test_bodies_stream_both_ways(outbound: MakeRig) -> None:
    async def respond(request: UpstreamRequest, n: int) -> MemoryResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                yield bytes([65 + i]) * 100_000

        return MemoryResponse(200, {}, chunks())

    rig = await outbound(respond)

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"u" * 50_000

    async with rig.client.post("/up", data=upload(), headers={"Host": "users"}) as resp:
        assert resp.status == 200
        assert await resp.read() == b"A" * 100_000 + b"B" * 100_000 + b"C" * 100_000
    assert rig.upstreams.seen[0].body == b"u" * 200_000


async def test_a_body_that_breaks_half_way_cuts_the_connection(outbound: MakeRig) -> None:
    async def respond(request: UpstreamRequest, n: int) -> MemoryResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"partial"
            raise UpstreamReset("peer went away")

        return MemoryResponse(200, {"Content-Length": "100"}, chunks())

    rig = await outbound(respond)
    with pytest.raises(aiohttp.ClientPayloadError):
        async with rig.client.get("/", headers={"Host": "users"}) as resp:
            await resp.read()  # never silently short: the app sees a broken body
    answer_ = rig.upstreams.answers[0]
    assert answer_.closed and answer_.released
    assert rig.sample("equilibrium_errors_total", upstream="users",
                      reason="body-relay-failed") == 1


# ---------------------------------------------------------------- retries


async def test_a_get_that_could_not_connect_is_retried_elsewhere(outbound: MakeRig) -> None:
    async def respond(request: UpstreamRequest, n: int) -> MemoryResponse:
        if n == 1:
            raise ConnectError("connection refused")
        return MemoryResponse(200, {}, b"second")

    rig = await outbound(respond)
    async with rig.client.get("/", headers={"Host": "users"}) as resp:
        assert resp.status == 200 and await resp.read() == b"second"
    first, second = rig.upstreams.seen
    assert first.url != second.url  # never the same endpoint twice
    # the first attempt never connected: nothing reached an upstream, so the second is not a
    # re-send and carries no X-GT-Retry (the caller's own retry budget still paid for it)
    assert "X-GT-Retry" not in first.headers and "X-GT-Retry" not in second.headers
    assert rig.sample("equilibrium_retries_total", upstream="users") == 1


async def test_an_error_after_several_attempts_says_why_each_failed(outbound: MakeRig) -> None:
    # The stranger's finding: the answer named only the last attempt's failure, so a first
    # attempt refused for a reason worth knowing (an overloaded pod) was lost from it.
    async def respond(request: UpstreamRequest, n: int) -> MemoryResponse:
        raise ConnectTimeout(f"attempt {n} took too long")

    rig = await outbound(respond)
    async with rig.client.get("/", headers={"Host": "users"}) as resp:
        answer = await resp.json()
    assert resp.status == 502 and len(rig.upstreams.seen) >= 2
    for n, request in enumerate(rig.upstreams.seen, 1):
        endpoint = str(request.url).removesuffix("/")
        assert f"{endpoint}: attempt {n} took too long" in answer["error"], answer


@pytest.mark.parametrize("failure", [ConnectTimeout("slow"), UpstreamReset("reset")])
async def test_failures_before_the_head_are_retried_for_idempotent_requests(
    outbound: MakeRig, failure: TransportError
) -> None:
    async def respond(request: UpstreamRequest, n: int) -> MemoryResponse:
        if n == 1:
            raise failure
        return MemoryResponse(200, {}, b"ok")

    rig = await outbound(respond)
    async with rig.client.delete("/thing", headers={"Host": "users"}) as resp:
        assert resp.status == 200
    assert len(rig.upstreams.seen) == 2


async def test_a_post_is_never_re_sent(outbound: MakeRig) -> None:
    async def respond(request: UpstreamRequest, n: int) -> MemoryResponse:
        raise UpstreamReset("reset after the request went out")

    rig = await outbound(respond)
    async with rig.client.post("/orders", data=b"{}", headers={"Host": "users"}) as resp:
        assert resp.status == 502 and (await resp.json())["reason"] == "upstream-reset"
    assert len(rig.upstreams.seen) == 1
    assert rig.sample("equilibrium_retries_total", upstream="users") == 0


@pytest.mark.parametrize("failure", [ConnectError("connection refused"),
                                     ConnectTimeout("slow")])
async def test_a_post_that_never_connected_goes_to_another_endpoint(
    outbound: MakeRig, failure: TransportError,
) -> None:
    rig = await outbound(answer(200, b"taken"))
    rig.upstreams.unreachable[1] = failure
    async with rig.client.post("/orders", data=b"{}", headers={"Host": "users"}) as resp:
        assert resp.status == 200 and await resp.read() == b"taken"
    first, second = rig.upstreams.seen
    assert first.url != second.url and second.body == b"{}"  # whole, on another endpoint
    assert "X-GT-Retry" not in second.headers  # no app got it twice
    assert rig.sample("equilibrium_retries_total", upstream="users") == 1


async def test_a_body_read_before_a_connect_error_is_not_sent_elsewhere(
    outbound: MakeRig,
) -> None:
    # No real transport reads the body before it has a connection; if one did, what is left
    # of the body could not go to another endpoint whole.
    async def respond(request: UpstreamRequest, n: int) -> MemoryResponse:
        raise ConnectError("connection refused")  # after the body was read (Upstreams)

    rig = await outbound(respond)
    async with rig.client.post("/orders", data=b"{}", headers={"Host": "users"}) as resp:
        assert resp.status == 502 and (await resp.json())["reason"] == "connect-error"
    assert len(rig.upstreams.seen) == 1
    assert rig.sample("equilibrium_retries_total", upstream="users") == 0


async def test_an_answer_that_may_have_been_processed_is_not_retried(outbound: MakeRig) -> None:
    async def respond(request: UpstreamRequest, n: int) -> MemoryResponse:
        raise TransportError("malformed status line")

    rig = await outbound(respond)
    async with rig.client.get("/", headers={"Host": "users"}) as resp:
        body = await resp.json()
        assert resp.status == 502 and body["reason"] == "upstream-protocol-error"
    assert len(rig.upstreams.seen) == 1


async def test_retries_stop_when_every_endpoint_was_tried(outbound: MakeRig) -> None:
    async def respond(request: UpstreamRequest, n: int) -> MemoryResponse:
        raise ConnectError("connection refused")

    rig = await outbound(respond)
    async with rig.client.get("/", headers={"Host": "users"}) as resp:
        assert resp.status == 502
        assert "after 2 attempt(s)" in (await resp.json())["error"]
    assert sorted(seen.url for seen in rig.upstreams.seen) == sorted(u + "/" for u in USERS)


async def test_no_head_within_the_request_timeout_is_504_and_not_retried(outbound: MakeRig) -> None:
    async def respond(request: UpstreamRequest, n: int) -> MemoryResponse:
        await asyncio.sleep(10)
        return MemoryResponse()

    rig = await outbound(respond, request_timeout=0.2)
    async with rig.client.get("/", headers={"Host": "users"}) as resp:
        assert resp.status == 504 and (await resp.json())["reason"] == "upstream-timeout"
    assert len(rig.upstreams.seen) == 1


async def test_websockets_need_a_dialing_transport(outbound: MakeRig) -> None:
    rig = await outbound(answer())
    upgrade = {"Host": "users", "Connection": "Upgrade", "Upgrade": "websocket",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}
    async with rig.client.get("/ws", headers=upgrade) as resp:
        assert resp.status == 501 and (await resp.json())["reason"] == "websocket-not-supported"
    assert not isinstance(rig.proxy.transport, WebSocketDialer)
    assert isinstance(AiohttpTransport(connect_timeout=1.0), WebSocketDialer)


# ---------------------------------------------------------------- inbound


async def test_the_inbound_listener_forwards_to_its_app_through_the_transport() -> None:
    seen: list[UpstreamRequest] = []

    async def app(request: UpstreamRequest) -> MemoryResponse:
        seen.append(request)
        return MemoryResponse(201, {"X-GT-Price": "3", "X-App": "yes"}, b"made")

    proxy = InboundProxy(sidecar_id="unit-inbound", app_url="http://127.0.0.1:8080/",
                         settings=parse_policing({"mode": "off"}),
                         metrics=InboundMetrics(CollectorRegistry()), mesh_key=None,
                         transport=MemoryTransport(app))
    async with TestClient(TestServer(proxy.make_app())) as client, client.get(
        "/orders/7?x=1", headers={"X-GT-Bid": "5", "Connection": "close"}
    ) as resp:
        assert resp.status == 201 and await resp.read() == b"made"
        assert resp.headers["X-App"] == "yes" and "X-GT-Price" not in resp.headers
        assert resp.headers["Via"] == "1.1 unit-inbound"
    [request] = seen
    assert str(request.url) == "http://127.0.0.1:8080/orders/7?x=1"
    assert request.headers["Via"] == "1.1 unit-inbound" and "X-GT-Bid" not in request.headers
    assert "Connection" not in request.headers


# ---------------------------------------------------------------- the pieces


def test_classify_says_what_may_be_retried() -> None:
    assert classify(ConnectError("refused")).reason == "connect-error"
    assert classify(ConnectTimeout("")).detail == "connect timed out"
    assert classify(UpstreamReset("")).nothing_received is True
    assert classify(TimeoutError()).status == 504
    assert classify(TransportError("bad")).nothing_received is False


def test_aiohttp_errors_keep_their_meaning() -> None:
    assert isinstance(from_aiohttp(aiohttp.ServerDisconnectedError()), UpstreamReset)
    assert isinstance(from_aiohttp(aiohttp.ConnectionTimeoutError()), ConnectTimeout)
    plain = TimeoutError()
    assert from_aiohttp(plain) is plain
    other = from_aiohttp(aiohttp.ClientPayloadError())
    assert type(other) is TransportError and str(other) == "ClientPayloadError"


async def test_memory_body_reads_chunks_then_empty() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"a"
        yield b""
        yield b"b"

    body = MemoryBody(chunks())
    assert [await body.readany() for _ in range(3)] == [b"a", b"b", b""]
    whole = MemoryBody(b"xyz")
    assert [await whole.readany(), await whole.readany()] == [b"xyz", b""]


def test_a_memory_response_can_carry_trailers() -> None:
    answer_ = MemoryResponse(200, {}, b"x", trailers=[("grpc-status", "0")])
    assert answer_.trailers is not None and answer_.trailers["Grpc-Status"] == "0"
    assert MemoryResponse().trailers is None


async def test_the_aiohttp_transport_must_be_started() -> None:
    transport = AiohttpTransport(connect_timeout=1.0)
    with pytest.raises(RuntimeError, match="start"):
        await transport.handle_request(
            UpstreamRequest("GET", URL("http://127.0.0.1:9/"), CIMultiDict())
        )


def test_only_failures_before_sending_are_marked_safe_to_retry() -> None:
    assert classify(ConnectionResetError()).nothing_received is False  # unknown OSError
    assert classify(from_aiohttp(aiohttp.ServerDisconnectedError())).nothing_received is True
    timeout = classify(TimeoutError())
    assert (timeout.reason, timeout.status, timeout.nothing_received) == (
        "upstream-timeout", 504, False,
    )
