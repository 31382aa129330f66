"""A request an endpoint's sidecar refused before its app saw it goes to another endpoint
(real sidecar processes and backends on loopback).

Endpoint ``A`` is an inbound sidecar in front of a slow app (1 s per request) with its limit
pinned to one slot and a short ``max_wait``: requests that find the slot taken are refused
``503 queue-timeout`` with a signed ``X-GT-Refused``. Endpoint ``B`` is a fast plain backend.
The caller's sidecar must send refused requests on to ``B`` whatever their method (a refusal
signed by A's sidecar proves A's app never saw the request; a body goes with it when it fits
the 64 KiB kept for that), answer its own 503 ``upstream-refused`` when no endpoint is left,
and ignore an ``X-GT-Refused`` it cannot verify. Over HTTP/2
gRPC calls refused by A go on to B as well (their bodies are kept for a re-send). Every
request reaches exactly one app: the backends count what they served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from concurrent import futures
from pathlib import Path

import aiohttp
import grpc
import pytest
from aiohttp import web

from tests.integration.inbound_support import MESH_KEY, write_config
from tests.integration.procs import (
    LOOPBACK,
    Backend,
    SidecarProcess,
    async_start_sidecar,
    free_port,
    start_backend,
    start_sidecar,
)

POLICING = {
    "max_wait": 0.15,
    "concurrency": {"initial_limit": 1, "min_limit": 1, "max_limit": 1, "probe_limit": 1},
    "reputation": {"rate_floor": 10_000, "retry_ratio": 10_000},
}
KEY_ENV = {"EQUILIBRIUM_MESH_SECRET": MESH_KEY}


def served(backend: Backend, method: str | None = None) -> int:
    """Requests of the test the backend answered (not the sidecars' probes)."""
    return sum(1 for r in backend.seen
               if r.path.startswith("/r") and (method is None or r.method == method))


async def _stop(procs: list[SidecarProcess]) -> None:
    """Stop the sidecars (at once) and remove what they left."""
    await asyncio.gather(*(asyncio.to_thread(p.stop, 5.0) for p in procs))
    for p in procs:
        p.cleanup()


async def _burst(session: aiohttp.ClientSession, caller: SidecarProcess, count: int,
                 method: str = "GET") -> list[tuple[int, dict[str, object]]]:
    async def one(i: int) -> tuple[int, dict[str, object]]:
        data = b"x" * 10 if method == "POST" else None
        async with session.request(method, caller.outbound_url + f"/r{i}",
                                   headers={"Host": "svc"}, data=data) as resp:
            body = await resp.read()
            try:
                doc = json.loads(body) if resp.status >= 400 else {}
            except ValueError:
                doc = {"raw": body[:80].decode(errors="replace")}
            return resp.status, doc
    return await asyncio.gather(*(one(i) for i in range(count)))


@pytest.mark.slow
async def test_refused_attempts_go_to_another_endpoint_once_whatever_their_method(
    tmp_path: Path,
) -> None:
    slow = await start_backend("slow", latency=1.0)
    fast = await start_backend("fast")
    liar = await start_backend("liar", status=503, headers={
        "X-GT-Refused": "queue-timeout", "X-GT-Signals": "v=1;caller=c;sig=" + "A" * 43})
    port = free_port()
    a_url = f"http://{LOOPBACK}:{port}"
    config = write_config(tmp_path / "p.json", POLICING)
    procs: list[SidecarProcess] = []
    try:
        procs = list(await asyncio.gather(
            async_start_sidecar({}, sidecar_id="a-in", config_file=config, env=KEY_ENV,
                                extra_args=["--inbound", f"{LOOPBACK}:{port}",
                                            "--app", slow.url]),
            async_start_sidecar({"svc": [a_url, fast.url]}, sidecar_id="two", env=KEY_ENV),
            async_start_sidecar({"svc": [a_url]}, sidecar_id="one", env=KEY_ENV),
            async_start_sidecar({"svc": [liar.url, fast.url]}, sidecar_id="lied-to",
                                env=KEY_ENV),
            async_start_sidecar({"svc": [a_url]}, sidecar_id="once", env=KEY_ENV,
                                extra_args=["--max-attempts", "1"])))
        _, two, one, lied_to, once = procs
        async with aiohttp.ClientSession() as session:
            # 1. GETs over A and B: every one answered 200, each served by exactly one app
            answers = await _burst(session, two, 12)
            assert [status for status, _ in answers] == [200] * 12, answers
            refused = await asyncio.to_thread(
                two.metric, "equilibrium_upstream_refused_total", upstream="svc",
                reason="queue-timeout")
            assert refused > 0  # some GETs found A's slot taken and went on to B
            assert served(slow) + served(fast) == 12
            served_by_a = served(slow)

            # 2. A alone: one POST is served, the others are refused, and with no endpoint
            # left get the caller sidecar's own 503 upstream-refused (never sent to A again);
            # GETs alike
            posts = await _burst(session, one, 3, method="POST")
            assert sorted(status for status, _ in posts) == [200, 503, 503]
            assert {doc.get("reason") for status, doc in posts if status == 503} == {
                "upstream-refused"}
            assert served(slow, "POST") == 1
            gets = await _burst(session, one, 3)
            assert sorted(status for status, _ in gets) == [200, 503, 503]
            assert {doc.get("reason") for status, doc in gets if status == 503} == {
                "upstream-refused"}
            assert served(slow) == served_by_a + 2

            # 2a. seven refusals in a row for load (queue-timeout) do not eject A: the app is
            # busy, not broken (a stranger's storm ejected every pod, and the callers' weights
            # stayed 0 for 20 s after it); they count in its cost
            gets = await _burst(session, one, 8)
            assert sorted(status for status, _ in gets) == [200] + [503] * 7
            await asyncio.sleep(0.3)  # a policy tick
            state = await asyncio.to_thread(one.state)
            (view,) = state["upstreams"]["svc"]["endpoints"]
            assert view["usable"] and view["failures"] >= 7, view
            assert served(slow) == served_by_a + 3
            # ... nor when they are relayed as they came (one attempt: no other to try)
            gets = await _burst(session, once, 8)
            assert sorted(status for status, _ in gets) == [200] + [503] * 7
            assert {doc.get("reason") for status, doc in gets if status == 503} == {
                "queue-timeout"}
            await asyncio.sleep(0.3)
            state = await asyncio.to_thread(once.state)
            (view,) = state["upstreams"]["svc"]["endpoints"]
            assert view["usable"] and view["failures"] >= 7, view
            assert served(slow) == served_by_a + 4

            # 2b. POSTs with a body over A and B: the refused ones go on to B, body and all;
            # every one answered 200 and served once
            before = served(slow, "POST") + served(fast, "POST")
            posts = await _burst(session, two, 12, method="POST")
            assert [status for status, _ in posts] == [200] * 12, posts
            assert served(slow, "POST") + served(fast, "POST") == before + 12

            # 3. a plain server's X-GT-Refused does not verify: its 503 is the answer
            before = served(fast)
            lies = await _burst(session, lied_to, 10)
            assert 503 in {status for status, _ in lies}
            assert served(liar) + (served(fast) - before) == 10
            assert await asyncio.to_thread(
                lied_to.metric, "equilibrium_upstream_refused_total") == 0
            assert await asyncio.to_thread(
                lied_to.metric, "equilibrium_caller_bad_signals_total",
                header="x-gt-signals") > 0
    finally:
        await _stop(procs)
        for backend in (slow, fast, liar):
            await backend.stop()


async def test_an_app_down_behind_a_live_sidecar_loses_no_post(tmp_path: Path) -> None:
    """A helper's finding: with A's app down (its sidecar up, answering 503 app-unreachable,
    signed), POSTs reached the caller as 503 though B was up and A's app had never seen
    them: only idempotent bodiless requests were sent on. Now every refused request goes to
    B, its body with it; a body over the 64 KiB kept gets the refusal (a 503), and nothing is
    ever served twice."""
    async def length(request: web.Request) -> web.Response:  # the body as it arrived
        return web.Response(text=str(len(await request.read())))

    fast = await start_backend("fast", handler=length)
    dead_app = f"http://{LOOPBACK}:{free_port()}"  # nothing listens there
    port = free_port()
    a_url = f"http://{LOOPBACK}:{port}"
    procs: list[SidecarProcess] = []
    try:
        # A's sidecar buffers at most 500 bytes of a body before it sends it on, so it
        # refuses a longer one while the app is still sending it
        config = write_config(tmp_path / "a.json", {"upload_buffer": 500})
        procs = list(await asyncio.gather(
            async_start_sidecar({}, sidecar_id="a-in", env=KEY_ENV, config_file=config,
                                extra_args=["--inbound", f"{LOOPBACK}:{port}",
                                            "--app", dead_app]),
            async_start_sidecar({"svc": [a_url, fast.url]}, sidecar_id="two", env=KEY_ENV)))
        _, two = procs
        async with aiohttp.ClientSession() as session:
            async def post(i: int, size: int) -> int:
                async with session.post(two.outbound_url + f"/r{i}", data=b"p" * size,
                                        headers={"Host": "svc"}) as resp:
                    body = await resp.read()
                    if resp.status == 200:
                        assert body == str(size).encode()  # the body arrived whole
                    return resp.status

            small = await asyncio.gather(*(post(i, 1000) for i in range(20)))
            assert small == [200] * 20
            assert served(fast, "POST") == 20

            # the review's finding: a body still arriving when A refused it hung the replay
            # until the request timed out (the stopped upload took the replay's wake-up)
            async def halves(i: int) -> int:
                reader, writer = await asyncio.open_connection(LOOPBACK, two.outbound_port)
                writer.write(b"POST /r%d HTTP/1.1\r\nHost: svc\r\nContent-Length: 2000\r\n"
                             b"Connection: close\r\n\r\n" % (200 + i) + b"h" * 1000)
                await asyncio.sleep(0.3)
                writer.write(b"h" * 1000)
                async with asyncio.timeout(5):
                    answer = await reader.read()
                writer.close()
                assert answer.endswith(b"\r\n\r\n2000"), answer[-200:]
                return int(answer.split(b" ", 2)[1])

            assert await asyncio.gather(*(halves(i) for i in range(6))) == [200] * 6
            assert served(fast, "POST") == 26
            big = await asyncio.gather(*(post(100 + i, 100_000) for i in range(10)))
        assert set(big) <= {200, 503}
        assert served(fast, "POST") == 26 + big.count(200)  # none sent twice
        assert await asyncio.to_thread(
            two.metric, "equilibrium_upstream_refused_total", upstream="svc",
            reason="app-unreachable") > 0
    finally:
        await _stop(procs)
        await fast.stop()


SERVICE = "test.Work"


def _grpc_app(name: str, delay: float, served: list[str]) -> tuple[grpc.Server, str]:
    def work(request: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(delay)
        served.append(name)
        return name.encode()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Work": grpc.unary_unary_rpc_method_handler(work)}),))
    port = server.add_insecure_port(f"{LOOPBACK}:0")
    server.start()
    return server, f"http://{LOOPBACK}:{port}"


@pytest.mark.slow
def test_refused_grpc_calls_go_to_another_endpoint_once(tmp_path: Path) -> None:
    """HTTP/2: gRPC calls (POSTs with a body, kept for a re-send) that A's sidecar refused
    unprocessed go on to B; each call is served by exactly one app."""
    served: list[str] = []
    slow, slow_url = _grpc_app("slow", 1.0, served)
    fast, fast_url = _grpc_app("fast", 0.0, served)
    port = free_port()
    config = write_config(tmp_path / "p.json", POLICING)
    procs: list[SidecarProcess] = []
    try:
        procs.append(start_sidecar({}, sidecar_id="a-in", config_file=config, env=KEY_ENV,
                                   extra_args=["--inbound", f"{LOOPBACK}:{port}",
                                               "--app", slow_url]))
        caller = start_sidecar({"svc": [f"http://{LOOPBACK}:{port}", fast_url]},
                               sidecar_id="two", env=KEY_ENV)
        procs.append(caller)
        with grpc.insecure_channel(f"{LOOPBACK}:{caller.outbound_port}",
                                   options=[("grpc.default_authority", "svc")]) as channel:
            call = channel.unary_unary(f"/{SERVICE}/Work")
            with futures.ThreadPoolExecutor(max_workers=12) as pool:
                answers = list(pool.map(lambda i: call(b"x" * 100, timeout=15), range(12)))
        assert sorted(set(answers)) <= [b"fast", b"slow"] and len(answers) == 12
        assert len(served) == 12  # every call served once, by one app
        assert caller.metric("equilibrium_upstream_refused_total", upstream="svc",
                             reason="queue-timeout") > 0
    finally:
        for p in procs:
            p.stop(5.0)
            p.cleanup()
        slow.stop(0).wait(5)
        fast.stop(0).wait(5)


@pytest.mark.slow
async def test_a_dead_app_behind_a_live_sidecar_costs_the_caller_no_error() -> None:
    """The app behind A is gone (connection refused), its sidecar is up. A answers a signed
    ``503 app-unreachable`` (the app never saw the request): the caller's sidecar sends GETs
    on to B and learns A as failing; a POST (its body went to A) gets the refusal. Over HTTP/2,
    gRPC calls go on to B too."""
    fast = await start_backend("fast")
    port = free_port()
    a_url = f"http://{LOOPBACK}:{port}"
    dead_app = f"http://{LOOPBACK}:{free_port()}"
    procs: list[SidecarProcess] = []
    served_grpc: list[str] = []
    grpc_fast, grpc_fast_url = _grpc_app("fast", 0.0, served_grpc)
    try:
        procs = list(await asyncio.gather(
            async_start_sidecar({}, sidecar_id="a-in", env=KEY_ENV,
                                extra_args=["--inbound", f"{LOOPBACK}:{port}",
                                            "--app", dead_app]),
            async_start_sidecar({"svc": [a_url, fast.url]}, sidecar_id="two", env=KEY_ENV,
                                policy="round-robin"),
            async_start_sidecar({"svc": [a_url, grpc_fast_url]}, sidecar_id="grpc-two",
                                env=KEY_ENV, policy="round-robin")))
        a_in, two, grpc_two = procs
        async with aiohttp.ClientSession() as session:
            answers = await _burst(session, two, 10)
            assert [status for status, _ in answers] == [200] * 10, answers
            assert served(fast) == 10
            refused = await asyncio.to_thread(
                two.metric, "equilibrium_upstream_refused_total", upstream="svc",
                reason="app-unreachable")
            assert refused > 0  # round-robin sent some to A first
            assert await asyncio.to_thread(
                two.metric, "equilibrium_retries_total", upstream="svc") == refused
            posts = await _burst(session, two, 4, method="POST")
            assert {status for status, _ in posts} <= {200, 503}
            assert {doc.get("reason") for status, doc in posts if status == 503} <= {
                "app-unreachable"}
        assert await asyncio.to_thread(
            a_in.metric, "equilibrium_inbound_requests_total", outcome="app-error") > 0

        def grpc_calls() -> list[bytes]:
            with grpc.insecure_channel(f"{LOOPBACK}:{grpc_two.outbound_port}",
                                       options=[("grpc.default_authority", "svc")]) as channel:
                call = channel.unary_unary(f"/{SERVICE}/Work")
                return [call(b"x" * 100, timeout=15) for _ in range(6)]

        assert await asyncio.to_thread(grpc_calls) == [b"fast"] * 6
        assert await asyncio.to_thread(
            grpc_two.metric, "equilibrium_upstream_refused_total", upstream="svc",
            reason="app-unreachable") > 0
    finally:
        await _stop(procs)
        await fast.stop()
        grpc_fast.stop(0).wait(5)


async def test_an_app_that_breaks_its_connection_behind_its_sidecar_costs_a_get_nothing(
) -> None:
    """A helper's finding: behind its inbound sidecar, an app that closed its connection
    before answering reached the caller as its sidecar's ``502 upstream-reset``, relayed,
    where the same app reached directly costs a GET nothing (the caller's sidecar sends it
    elsewhere). The inbound answer now signs ``X-GT-Refused: app-reset``: the caller's
    sidecar sends an idempotent request without a body on to B, and relays the 502 of
    anything else (the app may have seen it: a POST is never sent twice)."""
    seen: list[bytes] = []

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            seen.append(await reader.readuntil(b"\r\n\r\n"))  # the head, then nothing
        writer.close()

    closer = await asyncio.start_server(hang_up, LOOPBACK, 0)
    closer_url = f"http://{LOOPBACK}:{closer.sockets[0].getsockname()[1]}"
    fast = await start_backend("fast")
    port = free_port()
    a_url = f"http://{LOOPBACK}:{port}"
    procs: list[SidecarProcess] = []
    try:
        procs = list(await asyncio.gather(
            async_start_sidecar({}, sidecar_id="a-in", env=KEY_ENV,
                                extra_args=["--inbound", f"{LOOPBACK}:{port}",
                                            "--app", closer_url]),
            async_start_sidecar({"svc": [a_url, fast.url]}, sidecar_id="two", env=KEY_ENV,
                                policy="round-robin")))
        _, two = procs
        async with aiohttp.ClientSession() as session:
            answers = [(await _burst(session, two, 1))[0] for _ in range(10)]
            assert [status for status, _ in answers] == [200] * 10, answers
            assert served(fast) == 10
            reset = await asyncio.to_thread(
                two.metric, "equilibrium_upstream_refused_total", upstream="svc",
                reason="app-reset")
            assert reset >= 4  # round-robin: every other request went to A first
            assert await asyncio.to_thread(
                two.metric, "equilibrium_retries_total", upstream="svc") == reset
            gets_at_a = len(seen)
            assert gets_at_a == reset
            posts = [(await _burst(session, two, 1, method="POST"))[0] for _ in range(6)]
        at_a = [doc for status, doc in posts if status != 200]
        assert at_a and all(doc.get("reason") == "upstream-reset" for doc in at_a), posts
        assert len(seen) - gets_at_a == len(at_a)  # each POST reached one app, once
        assert served(fast, "POST") == len(posts) - len(at_a)
    finally:
        await _stop(procs)
        await fast.stop()
        closer.close()
