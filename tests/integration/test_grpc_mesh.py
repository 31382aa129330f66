"""gRPC through the whole mesh: grpcio client -> outbound sidecar -> inbound sidecar -> grpcio
server, every hop h2c, every stream policed on its own at the inbound side.

Real processes: one grpcio server (the app), its inbound sidecar (``--inbound``, policing
with a small fixed concurrency limit so that a flood congests it), and one outbound sidecar
per caller ("polite" and "flood"), all with one mesh key. The module's processes are shared;
tests compare counters before and after.
"""

from __future__ import annotations

import json
import os
import signal
import socketserver
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes

from tests.integration.procs import LOOPBACK, SidecarProcess, free_port, start_sidecar
from tests.integration.test_grpc_outbound import (
    ClosedWindowEarlyAnswerPod,
    RawH2,
    _grpc_frame,
    send_with_trailers,
)
from wire.identity import BoundRequest, new_nonce, sign_identity

pytestmark = pytest.mark.http2  # run again on the other engine by make test

SERVICE = "test.Echo"  # the name RawH2 calls
MIB = 1024 * 1024
MESH_KEY = "grpc-mesh-test-key-0123456789abcdef0123"
LIMIT = 4  # the app's concurrency limit at the inbound side (fixed: min = initial = max)
POLICING = {
    "capacity": 20, "max_wait": 2,
    "concurrency": {"initial_limit": LIMIT, "min_limit": LIMIT, "max_limit": LIMIT},
    "ladder": {"base_punishment": 3, "max_punishment": 3, "probation": 1},
}


def _meta(request: bytes, context: grpc.ServicerContext) -> bytes:
    """The metadata the app got, as JSON (names -> values; binary values dropped)."""
    got: dict[str, list[str]] = {}
    for key, value in context.invocation_metadata():
        if isinstance(value, str):
            got.setdefault(key, []).append(value)
    context.set_trailing_metadata((("x-app-trailer", "yes"),))
    return json.dumps(got).encode()


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def _slow(request: bytes, context: grpc.ServicerContext) -> bytes:
    end = time.monotonic() + float(request.decode())
    while time.monotonic() < end and context.is_active():
        time.sleep(0.005)
    return b"slept"


class _AtOnce:
    """How many calls of a handler run at once, and the most there were."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = self.most = 0

    def __enter__(self) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def __exit__(self, *_: object) -> None:
        with self.lock:
            self.now -= 1


HEAD_FIRST = _AtOnce()


def _head_first(request: bytes, context: grpc.ServicerContext) -> bytes:
    """A unary handler that sends its metadata at once, then works (gRPC servers allow it)."""
    context.send_initial_metadata((("x-started", "1"),))
    with HEAD_FIRST:
        time.sleep(float(request.decode()))
    return b"worked"


def _watch_meta(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    """A watch that sends its metadata at once, then waits for a change (``request``
    seconds) before its first message."""
    context.send_initial_metadata((("x-watching", "1"),))
    end = time.monotonic() + float(request.decode())
    while time.monotonic() < end and context.is_active():
        time.sleep(0.01)
    yield b"changed"


def _collect(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    """A client-streaming handler: every request message, joined, once the caller ends."""
    return b"|".join(requests)


def _ticks(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(int(request.decode())):
        if not context.is_active():
            return
        time.sleep(0.02)
        yield b"tick-%d" % i


def start_app() -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=[
        ("grpc.max_receive_message_length", 8 * MIB), ("grpc.max_send_message_length", 8 * MIB)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Meta": grpc.unary_unary_rpc_method_handler(_meta),
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
        "Slow": grpc.unary_unary_rpc_method_handler(_slow),
        "Ticks": grpc.unary_stream_rpc_method_handler(_ticks),
        "HeadFirst": grpc.unary_unary_rpc_method_handler(_head_first),
        "Collect": grpc.stream_unary_rpc_method_handler(_collect),
        "WatchMeta": grpc.unary_stream_rpc_method_handler(_watch_meta),
    }),))
    port = server.add_insecure_port(f"{LOOPBACK}:0")
    server.start()
    return server, port


@dataclass
class Mesh:
    app: grpc.Server
    inbound: SidecarProcess
    inbound_port: int
    callers: dict[str, SidecarProcess]

    def channel(self, caller: str) -> grpc.Channel:
        return grpc.insecure_channel(f"{LOOPBACK}:{self.callers[caller].outbound_port}", options=[
            ("grpc.default_authority", "svc"),
            ("grpc.max_receive_message_length", 8 * MIB),
            ("grpc.max_send_message_length", 8 * MIB),
        ])

    def inbound_metric(self, name: str, **labels: str) -> float:
        return self.inbound.metric(name, **labels)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    config: Path = tmp_path_factory.mktemp("grpc-mesh") / "policing.json"
    config.write_text(json.dumps({"policing": POLICING}))
    app, app_port = start_app()
    env = {"EQUILIBRIUM_MESH_SECRET": MESH_KEY}
    port = free_port()
    procs: list[SidecarProcess] = []
    try:
        inbound = start_sidecar({}, sidecar_id="app-sidecar", config_file=config, env=env,
                                extra_args=["--inbound", f"{LOOPBACK}:{port}",
                                            "--app", f"http://{LOOPBACK}:{app_port}"])
        procs.append(inbound)
        callers = {}
        for name in ("polite", "flood"):
            callers[name] = start_sidecar({"svc": [f"http://{LOOPBACK}:{port}"]},
                                          sidecar_id=name, config_file=config, env=env,
                                          extra_args=["--max-attempts", "1"])
            procs.append(callers[name])
        yield Mesh(app, inbound, port, callers)
    finally:
        for proc in procs:
            assert proc.stop() == 0, proc.output()
        app.stop(0).wait(5)


def _unary(channel: grpc.Channel, method: str) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(f"/{SERVICE}/{method}")


def test_a_call_crosses_both_sidecars_policed_as_its_verified_caller(mesh: Mesh) -> None:
    admitted = mesh.inbound_metric("equilibrium_inbound_requests_total", caller="polite",
                                   outcome="admitted")
    caller = mesh.callers["polite"]
    stripped = {name: caller.metric("equilibrium_rejected_headers_total", header=name,
                                    reason="from-app") for name in ("X-GT-Bid", "X-GT-*")}
    with mesh.channel("polite") as channel:
        body, call = _unary(channel, "Meta").with_call(b"", metadata=(
            ("x-echo", "hi"), ("x-gt-bid", "999"), ("x-gt-made-up-7", "1"),
            ("x-equilibrium-bid", "2")), timeout=10)
    got = json.loads(body)
    # the app sees neither the mesh's headers nor the caller's forged one; Via names both hops
    assert not [k for k in got if k.startswith("x-gt-")], got
    assert got["x-echo"] == ["hi"]
    assert any("app-sidecar" in v for v in got["via"]) and any("polite" in v for v in got["via"])
    assert got["x-forwarded-proto"] == ["http"]
    # the signals came back and were consumed by the caller's sidecar: the app learns the price
    initial = dict(call.initial_metadata())
    assert "x-equilibrium-price" in initial, initial
    assert not [k for k in initial if k.startswith("x-gt-")], initial
    assert dict(call.trailing_metadata())["x-app-trailer"] == "yes"
    assert mesh.inbound_metric("equilibrium_inbound_requests_total", caller="polite",
                               outcome="admitted") == admitted + 1
    assert mesh.inbound_metric("equilibrium_inbound_connections_total", protocol="h2c") >= 1
    # the forged headers were counted, a made-up name under the one label X-GT-*
    for name, before in stripped.items():
        assert caller.metric("equilibrium_rejected_headers_total", header=name,
                             reason="from-app") == before + 1, name
    assert caller.metric("equilibrium_rejected_headers_total", header="x-gt-made-up-7",
                         reason="from-app") == 0


def test_4_mib_messages_both_ways(mesh: Mesh) -> None:
    payload = bytes(range(256)) * (4 * MIB // 256)
    with mesh.channel("polite") as channel:
        assert _unary(channel, "Echo")(payload, timeout=20) == payload


def test_a_client_that_hangs_up_mid_stream_is_not_charged_and_connections_stay(
        mesh: Mesh) -> None:
    caller = mesh.callers["polite"]
    with mesh.channel("polite") as channel:  # the caller's sidecar holds its connection
        assert _unary(channel, "Echo")(b"warm", timeout=10) == b"warm"
    failures = sum(e["failures"] for e in caller.state()["upstreams"]["svc"]["endpoints"])
    h2c = mesh.inbound_metric("equilibrium_inbound_connections_total", protocol="h2c")
    cancelled = caller.metric("equilibrium_h2_streams_cancelled_total", upstream="svc")
    with mesh.channel("polite") as channel:
        ticks = channel.unary_stream(f"/{SERVICE}/Ticks")(b"200", timeout=20)
        assert next(ticks) == b"tick-0"
        ticks.cancel()  # RST_STREAM(CANCEL) from the client, mid-answer
        for _ in range(3):  # the mesh goes on serving over the same connections
            assert _unary(channel, "Echo")(b"after", timeout=10) == b"after"
    deadline = time.monotonic() + 5
    while caller.metric("equilibrium_h2_streams_cancelled_total", upstream="svc") <= cancelled:
        assert time.monotonic() < deadline, "the cancel was not seen"
        time.sleep(0.05)
    assert sum(e["failures"] for e in caller.state()["upstreams"]["svc"]["endpoints"]) == failures
    assert mesh.inbound_metric("equilibrium_inbound_connections_total",
                               protocol="h2c") == h2c  # the pooled connection was kept
    wait_idle(mesh)

    # the same when the client closes its whole connection mid-answer
    client = RawH2(caller.outbound_port)
    try:
        ticks_id = client.start_call("Ticks")
        client.send(ticks_id, _grpc_frame(b"200"), end=True)
        client.pump(lambda: len(client.body(ticks_id)) > 0)
    finally:
        client.close()
    deadline = time.monotonic() + 5
    while caller.metric("equilibrium_h2_streams_cancelled_total", upstream="svc") <= cancelled + 1:
        assert time.monotonic() < deadline, "the hang-up was not seen"
        time.sleep(0.05)
    with mesh.channel("polite") as channel:
        assert _unary(channel, "Echo")(b"later", timeout=10) == b"later"
    assert sum(e["failures"] for e in caller.state()["upstreams"]["svc"]["endpoints"]) == failures
    assert mesh.inbound_metric("equilibrium_inbound_connections_total", protocol="h2c") == h2c
    wait_idle(mesh)


def test_calls_their_caller_cancels_are_counted_caller_hung_up(mesh: Mesh) -> None:
    """A helper's finding: cancelled streams were in no outcome of
    ``equilibrium_inbound_requests_total`` at the inbound side (HTTP/1.1 counts them
    ``caller-hung-up``)."""
    def hung_up() -> float:
        return mesh.inbound_metric("equilibrium_inbound_requests_total", caller="polite",
                                   outcome="caller-hung-up")
    before = hung_up()
    with mesh.channel("polite") as channel:
        for _ in range(3):
            ticks = channel.unary_stream(f"/{SERVICE}/Ticks")(b"200", timeout=20)
            assert next(ticks) == b"tick-0"
            ticks.cancel()
    deadline = time.monotonic() + 5
    while hung_up() < before + 3:
        assert time.monotonic() < deadline, f"counted {hung_up() - before} of 3"
        time.sleep(0.05)
    wait_idle(mesh)


def test_a_caller_that_resets_mid_message_is_counted_once_as_an_abandoned_upload(
        mesh: Mesh) -> None:
    """The review's finding: a call whose caller reset it in the middle of a request message,
    after it was forwarded, was counted both caller-hung-up and upload-abandoned."""
    def outcome(name: str) -> float:
        return mesh.inbound_metric("equilibrium_inbound_requests_total", caller="anonymous",
                                   outcome=name)
    before = {name: outcome(name) for name in ("caller-hung-up", "upload-abandoned")}
    client = RawH2(mesh.inbound_port)
    try:
        call = client.start_call("Collect")
        client.send(call, _grpc_frame(b"whole"), end=False)
        time.sleep(0.3)  # forwarded to the app meanwhile (a whole message, nothing more)
        client.send(call, _grpc_frame(b"cut short")[:7], end=False)
        time.sleep(0.1)
        client.conn.reset_stream(call, ErrorCodes.CANCEL)
        client.flush()
        deadline = time.monotonic() + 5
        while outcome("upload-abandoned") < before["upload-abandoned"] + 1:
            assert time.monotonic() < deadline, "the abandoned upload was not counted"
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        client.close()
    assert outcome("caller-hung-up") == before["caller-hung-up"]
    assert outcome("upload-abandoned") == before["upload-abandoned"] + 1
    wait_idle(mesh)


def wait_idle(mesh: Mesh) -> None:
    """The inbound side's in-flight gauge (refreshed every 0.5 s) comes back to 0: no call
    holds a slot any more."""
    deadline = time.monotonic() + 5
    while mesh.inbound_metric("equilibrium_inbound_in_flight") != 0:
        assert time.monotonic() < deadline, "a finished call still holds its slot"
        time.sleep(0.05)


BIG_BLOCK = ((b"x-big-1", b"b" * 50_000), (b"x-big-2", b"b" * 50_000))  # 100 KB, two fields


def test_oversized_header_block_is_refused_alone(mesh: Mesh) -> None:
    client = RawH2(mesh.inbound_port)
    try:
        first = client.start_call("Echo", extra=BIG_BLOCK)
        client.send(first, _grpc_frame(b"x"), end=True)
        second = client.start_call("Echo")
        client.send(second, _grpc_frame(b"fine"), end=True)
        client.pump(lambda: client.ended(first) and client.ended(second))
        assert client.status(first) == 8  # RESOURCE_EXHAUSTED, the connection goes on
        assert client.status(second) == 0 and client.body(second)[5:] == b"fine"
        assert client.terminated is None and not client.closed
    finally:
        client.close()


def test_a_header_field_over_64_kib_is_refused_alone_or_ends_the_connection_by_engine(
        mesh: Mesh) -> None:
    """One field over 64 KiB: ``h2`` decodes it (up to its 1 MiB limit) and the stream is
    refused alone; libnghttp2's decoder has a fixed limit of 64 KiB a field and ends the
    connection (COMPRESSION_ERROR), as servers built on it do (docs/grpc.md). Either way the
    sidecar goes on serving others."""
    client = RawH2(mesh.inbound_port)
    try:
        call = client.start_call("Echo", extra=((b"x-big", b"b" * 100_000),), flush=False)
        client.send(call, _grpc_frame(b"x"), end=True)  # one write
        client.pump(lambda: client.ended(call) or client.closed)
        if mesh.inbound.h2_engine() == "nghttp2":
            assert client.terminated is not None
            assert client.terminated.error_code == ErrorCodes.COMPRESSION_ERROR
        else:
            assert client.status(call) == 8 and client.terminated is None
    finally:
        client.close()
    with mesh.channel("polite") as channel:
        assert _unary(channel, "Echo")(b"after", timeout=5) == b"after"


def test_server_streams_longer_than_the_queue_wait_do_not_starve_each_other(
        mesh: Mesh) -> None:
    """A helper's finding: each server-streaming call held its slot for its whole length, so
    with the app's limit taken by streams longer than the queue's wait (2 s), the next ones
    were refused though the app was idle. A call whose answer still streams a second after
    it began gives its slot back and goes on as a long-lived exchange of its caller: twice
    the limit of 3-second streams at once all arrive whole."""
    with mesh.channel("polite") as channel:
        ticks = channel.unary_stream(f"/{SERVICE}/Ticks")
        streams = [ticks(b"150", timeout=20) for _ in range(2 * LIMIT)]
        got = [list(stream) for stream in streams]
    assert [len(messages) for messages in got] == [150] * (2 * LIMIT)
    assert mesh.inbound_metric("equilibrium_inbound_concurrency_limit") == LIMIT


def test_a_unary_call_that_sends_its_head_first_keeps_its_slot_while_it_works(
        mesh: Mesh) -> None:
    """The review's finding: the first version gave the slot back a second after the
    answer's head, so a unary handler that sends its metadata first and then works lost it,
    and the app ran every such call at once. A call gives its slot back only once its first
    response message has come and more may follow."""
    HEAD_FIRST.most = 0
    with mesh.channel("polite") as channel:
        call = _unary(channel, "HeadFirst")
        futures_ = [call.future(b"1.5", timeout=20) for _ in range(2 * LIMIT)]
        assert [f.result() for f in futures_] == [b"worked"] * (2 * LIMIT)
    assert HEAD_FIRST.most <= LIMIT


def test_a_watch_that_sent_only_its_metadata_gives_its_slot_back_after_the_upload_timeout(
        tmp_path: Path) -> None:
    """The second review's finding: with the slot given back only after a first message, a
    watch that sends its metadata at once and waits for a change held its slot until then,
    and such watches took the app's whole limit. After ``upload_timeout`` with no message
    it goes on as a long-lived exchange (a unary call that sent its metadata first and works
    looks the same: the bound is that much longer than a second)."""
    config = tmp_path / "policing.json"
    config.write_text(json.dumps({"policing": {
        "upload_timeout": 1, "max_wait": 2,
        "concurrency": {"initial_limit": 2, "min_limit": 2, "max_limit": 2}}}))
    app, app_port = start_app()
    port = free_port()
    inbound = start_sidecar({}, sidecar_id="app-sidecar-watch", config_file=config,
                            extra_args=["--inbound", f"{LOOPBACK}:{port}",
                                        "--app", f"http://{LOOPBACK}:{app_port}"])
    try:
        with grpc.insecure_channel(f"{LOOPBACK}:{port}") as channel:
            watch = channel.unary_stream(f"/{SERVICE}/WatchMeta")
            # more than the whole limit (the gate allows 3 with these settings)
            watches = [watch(b"4", timeout=20) for _ in range(4)]
            time.sleep(0.3)
            assert _unary(channel, "Echo")(b"meanwhile", timeout=10) == b"meanwhile"
            assert [list(w) for w in watches] == [[b"changed"]] * 4
    finally:
        assert inbound.stop() == 0, inbound.output()
        app.stop(0).wait(5)


def test_caller_reset_at_the_inbound_side_leaves_other_streams(mesh: Mesh) -> None:
    client = RawH2(mesh.inbound_port)
    try:
        slow = client.start_call("Slow")
        client.send(slow, _grpc_frame(b"5"), end=True)
        quick = client.start_call("Echo")
        client.send(quick, _grpc_frame(b"quick"), end=True)
        client.pump(lambda: client.ended(quick))
        client.conn.reset_stream(slow, ErrorCodes.CANCEL)
        client.flush()
        again = client.start_call("Echo")
        client.send(again, _grpc_frame(b"again"), end=True)
        client.pump(lambda: client.ended(again))
        assert client.status(quick) == 0 and client.status(again) == 0
    finally:
        client.close()
    wait_idle(mesh)


def test_a_flooding_caller_is_throttled_per_stream_while_a_polite_one_passes(
        mesh: Mesh) -> None:
    statuses: dict[str, list[grpc.StatusCode]] = {"polite": [], "flood": []}
    messages: list[str] = []
    stop = time.monotonic() + 6.0
    lock = threading.Lock()

    def caller(name: str, pause: float, calls: int) -> None:
        with mesh.channel(name) as channel:
            slow = _unary(channel, "Slow")
            for _ in range(calls):  # bounded in count and in time
                if time.monotonic() > stop:
                    return
                try:
                    slow(b"0.05", timeout=10)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    code = exc.code()
                    with lock:
                        messages.append(exc.details() or "")
                with lock:
                    statuses[name].append(code)
                time.sleep(pause)

    threads = [threading.Thread(target=caller, args=("flood", 0.0, 400)) for _ in range(8)]
    threads.append(threading.Thread(target=caller, args=("polite", 0.25, 24)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    flood, polite = statuses["flood"], statuses["polite"]
    story = (f"flood {len(flood)} calls, {flood.count(grpc.StatusCode.RESOURCE_EXHAUSTED)} "
             f"RESOURCE_EXHAUSTED; polite {polite}; messages {sorted(set(messages))[:4]}")
    # the flood is punished: its calls refused with RESOURCE_EXHAUSTED, first by the inbound
    # side (per stream, as its verified caller), then by its own sidecar backing off
    assert flood.count(grpc.StatusCode.RESOURCE_EXHAUSTED) > 0, story
    assert mesh.inbound_metric("equilibrium_inbound_requests_total", caller="flood",
                               outcome="throttled") > 0, story
    assert mesh.callers["flood"].metric("equilibrium_caller_backoff_total") > 0, story
    # the polite caller's calls all pass
    assert polite and all(code == grpc.StatusCode.OK for code in polite), story
    # the refusals are the caller's doing: the flood's sidecar does not blame the pod
    endpoints = mesh.callers["flood"].state()["upstreams"]["svc"]["endpoints"]
    assert sum(e["failures"] for e in endpoints) == 0, (story, endpoints)


def _headers(client: RawH2, stream_id: int) -> dict[bytes, bytes]:
    found: dict[bytes, bytes] = {}
    for event in client.events[stream_id]:
        found.update(getattr(event, "headers", None) or ())
    return found


def test_refusals_are_grpc_statuses_for_grpc_callers_and_json_otherwise(mesh: Mesh) -> None:
    def bad_bid(method: str, authority: str, path: str) -> tuple[tuple[bytes, bytes], ...]:
        identity = sign_identity("polite", MESH_KEY.encode(), time.time(),  # one per stream
                                 BoundRequest(method, authority, path), new_nonce(os.urandom(12)))
        return (b"x-gt-identity", identity.encode()), (b"x-gt-bid", b"lots")

    client = RawH2(mesh.inbound_port)
    try:
        grpc_call = client.start_call("Echo", extra=bad_bid("POST", "svc", f"/{SERVICE}/Echo"))
        client.send(grpc_call, _grpc_frame(b"x"), end=True)
        stream_id = client.conn.get_next_available_stream_id()  # a plain HTTP/2 request
        client.conn.send_headers(stream_id, [
            (b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/plain"),
            (b":authority", b"app"), *bad_bid("GET", "app", "/plain")], end_stream=True)
        client.flush()
        client.events[stream_id] = []
        client.pump(lambda: client.ended(grpc_call) and client.ended(stream_id))
        head = _headers(client, grpc_call)
        assert client.status(grpc_call) == 3  # INVALID_ARGUMENT, trailers-only
        assert head[b"grpc-message"].startswith(b"bad-bid: ")
        assert b"x-gt-reputation" in head and b"x-gt-congestion" in head
        plain = _headers(client, stream_id)
        assert plain[b":status"] == b"400"
        assert plain[b"content-type"].startswith(b"application/json")
        body = json.loads(client.body(stream_id))
        assert (body["reason"], body["caller"]) == ("bad-bid", "polite")
    finally:
        client.close()


def test_a_callers_request_trailers_reach_the_app_without_game_headers(mesh: Mesh) -> None:
    """The game headers in a caller's HTTP/2 request trailers are stripped before the app
    (no signal rides in a trailer section), counted as on HTTP/1.1."""
    before = mesh.inbound_metric("equilibrium_inbound_stripped_headers_total",
                                 source="in-trailers")
    identity = sign_identity("polite", MESH_KEY.encode(), time.time(),
                             BoundRequest("POST", "svc", f"/{SERVICE}/Echo"),
                             new_nonce(os.urandom(12)))
    client = RawH2(mesh.inbound_port)
    try:
        call = client.start_call("Echo", extra=((b"x-gt-identity", identity.encode()),))
        send_with_trailers(client, call, _grpc_frame(b"x"),
                           [(b"x-gt-bid", b"v=1;amount=9"), (b"x-kept", b"1")])
        client.pump(lambda: client.ended(call))
        assert client.status(call) == 0
        assert client.body(call)[5:] == b"x"
    finally:
        client.close()
    assert mesh.inbound_metric("equilibrium_inbound_stripped_headers_total",
                               source="in-trailers") == before + 1


@pytest.mark.parametrize("mode", ["equilibrium", "off"])
def test_trailers_an_early_answer_left_unrelayed_still_count_at_the_inbound(
        mode: str, tmp_path: Path) -> None:
    """The app answered before it took the body (a pod with a closed window): the caller's
    trailers never reach it, but their game headers are counted, whether the sidecar had
    buffered them before the slot (policing on) or relays them as they come (off)."""
    pod = ClosedWindowEarlyAnswerPod()
    config = tmp_path / "policing.json"
    config.write_text(json.dumps({"policing": {"mode": mode}}))
    port = free_port()
    inbound = start_sidecar({}, sidecar_id="app-sidecar-early", config_file=config,
                            extra_args=["--inbound", f"{LOOPBACK}:{port}",
                                        "--app", f"http://{LOOPBACK}:{pod.port}"])
    client = RawH2(port)
    try:
        for _ in range(3):
            call = client.start_call("Echo", flush=False)
            send_with_trailers(client, call, _grpc_frame(b"x"), [(b"x-gt-bid", b"v=1")])
            client.pump(lambda sid=call: client.ended(sid))  # type: ignore[misc]
            assert client.status(call) == 0, inbound.output()[-2000:]
        assert inbound.metric("equilibrium_inbound_stripped_headers_total",
                              source="in-trailers") == 3
    finally:
        client.close()
        assert inbound.stop() == 0, inbound.output()
        pod.stop()


def test_sigterm_lets_an_admitted_call_finish_at_the_inbound_side() -> None:
    app, app_port = start_app()
    port = free_port()
    inbound = start_sidecar({}, sidecar_id="app-sidecar-drain",
                            extra_args=["--inbound", f"{LOOPBACK}:{port}",
                                        "--app", f"http://{LOOPBACK}:{app_port}"])
    try:
        with grpc.insecure_channel(f"{LOOPBACK}:{port}") as channel:
            slow = _unary(channel, "Slow")
            assert slow(b"0.01", timeout=5) == b"slept"
            call = slow.future(b"1.0", timeout=10)
            time.sleep(0.3)
            inbound.send_signal(signal.SIGTERM)
            assert call.result() == b"slept"  # in flight: finishes after GOAWAY
        assert inbound.wait(15) == 0, inbound.output()
    finally:
        inbound.stop()
        app.stop(0).wait(5)


def test_a_call_with_a_deadline_may_outlast_the_inbound_request_timeout() -> None:
    # as on the outbound side: the call's grpc-timeout, not the request timeout, bounds it
    app, app_port = start_app()
    port = free_port()
    inbound = start_sidecar({}, sidecar_id="app-sidecar-deadline",
                            extra_args=["--inbound", f"{LOOPBACK}:{port}",
                                        "--app", f"http://{LOOPBACK}:{app_port}",
                                        "--request-timeout", "0.5"])
    try:
        with grpc.insecure_channel(f"{LOOPBACK}:{port}") as channel:
            slow = _unary(channel, "Slow")
            assert slow(b"1.2", timeout=10) == b"slept"
            with pytest.raises(grpc.RpcError) as err:
                slow(b"3", timeout=1.0)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        assert inbound.stop() == 0, inbound.output()
        app.stop(0).wait(5)


class _BigHeaderBackend(socketserver.BaseRequestHandler):
    """An h2c endpoint (the ``h2`` library's server side) whose answer to ``/big`` carries a
    100 KB header block in two fields (over the 64 KiB the sidecar announces); other paths
    answer ``ok``."""

    connections = 0

    def handle(self) -> None:
        type(self).connections += 1
        conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None))
        conn.initiate_connection()
        self.request.sendall(conn.data_to_send())
        while data := self.request.recv(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    big = dict(event.headers)[b":path"] == b"/big"
                    extra = list(BIG_BLOCK) if big else []
                    conn.send_headers(event.stream_id, [(b":status", b"200"), *extra])
                    conn.send_data(event.stream_id, b"ok", end_stream=True)
            self.request.sendall(conn.data_to_send())


def test_an_oversized_answer_head_fails_its_call_alone() -> None:
    server = socketserver.ThreadingTCPServer((LOOPBACK, 0), _BigHeaderBackend)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sidecar = start_sidecar({"raw": [f"http://{LOOPBACK}:{server.server_address[1]}"]},
                            sidecar_id="sc-big-head")
    client = RawH2(sidecar.outbound_port)

    def get(path: bytes) -> int:
        stream_id = client.conn.get_next_available_stream_id()
        client.conn.send_headers(stream_id, [(b":method", b"GET"), (b":scheme", b"http"),
                                             (b":path", path), (b":authority", b"raw")],
                                 end_stream=True)
        client.events[stream_id] = []
        client.flush()
        return stream_id

    try:
        first = get(b"/first")  # the sidecar's one connection to the endpoint
        client.pump(lambda: client.ended(first))
        ids = []
        for path in (b"/big", b"/small"):
            stream_id = client.conn.get_next_available_stream_id()
            client.conn.send_headers(stream_id, [
                (b":method", b"GET"), (b":scheme", b"http"), (b":path", path),
                (b":authority", b"raw")], end_stream=True)
            client.events[stream_id] = []
            ids.append(stream_id)
        client.flush()
        client.pump(lambda: all(client.ended(i) for i in ids))
        big, small = (_headers(client, i) for i in ids)
        assert big[b":status"] == b"502" and small[b":status"] == b"200"
        again = get(b"/again")
        client.pump(lambda: client.ended(again))
        assert _headers(client, again)[b":status"] == b"200"
        assert _BigHeaderBackend.connections == 1  # the upstream connection stayed
    finally:
        client.close()
        assert sidecar.stop() == 0, sidecar.output()
        server.shutdown()
        server.server_close()
