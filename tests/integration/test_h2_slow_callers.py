"""Slow callers over HTTP/2 against a real inbound sidecar (issue 14, finding 1, the h2c side).

The HTTP/1.1 attack of test_slow_callers.py, replayed with the ``h2`` library's client on raw
sockets: streams that send a request head and then their body (or gRPC message) one byte at a
time. A stream's request side is received before it asks for a slot (within the upload
deadline, else DEADLINE_EXCEEDED for gRPC, 408 otherwise); a late or abandoned upload counts
against its caller in the same metrics as HTTP/1.1; a gRPC streaming call gets its slot after
its first message and gives it back ``upload_timeout`` later if it is still sending, going on
as a long-lived exchange of its caller (capped per caller); h2c connections count against the
listener's per-source connection cap. The app is a real grpcio server; the well-behaved
caller a real grpcio client through its own sidecar.

Everything on loopback, bounded in count and time.
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import h2.events
import pytest
from h2.errors import ErrorCodes

from tests.integration.procs import LOOPBACK, SidecarProcess, free_port, start_sidecar
from tests.integration.test_grpc_outbound import RawH2, _grpc_frame

pytestmark = [pytest.mark.slow, pytest.mark.http2]

SERVICE = "test.Echo"  # the name RawH2 calls
MESH_KEY = "h2-slow-callers-test-key-0123456789abcdef"
UPLOAD_TIMEOUT = 2.0
LIMIT = 3  # the app's slots at the inbound side
SLOW_STREAMS = 12  # four times the slots
DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED = 4, 8


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def _chat(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    yield from requests


def start_app() -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
        "Chat": grpc.stream_stream_rpc_method_handler(_chat),
    }),))
    port = server.add_insecure_port(f"{LOOPBACK}:0")
    server.start()
    return server, port


@dataclass
class Rig:
    inbound: SidecarProcess
    port: int
    caller: SidecarProcess | None

    def metric(self, name: str, **labels: str) -> float:
        return self.inbound.metric(name, **labels)

    def polite_echo(self, payload: bytes) -> bytes:
        assert self.caller is not None
        with grpc.insecure_channel(f"{LOOPBACK}:{self.caller.outbound_port}",
                                   options=[("grpc.default_authority", "svc")]) as channel:
            answer: bytes = channel.unary_unary(f"/{SERVICE}/Echo")(payload, timeout=10)
            return answer


def _rig(tmp_path: Path, policing: dict[str, object], caller: bool = True) -> Iterator[Rig]:
    config = tmp_path / "sidecar.json"
    config.write_text(json.dumps({"policing": {
        "upload_timeout": UPLOAD_TIMEOUT, "max_wait": 1.0,
        "concurrency": {"initial_limit": LIMIT, "min_limit": LIMIT, "max_limit": LIMIT,
                        "probe_limit": LIMIT, "probe_samples": 1},
        **policing}}))
    app, app_port = start_app()
    env = {"EQUILIBRIUM_MESH_SECRET": MESH_KEY}
    port = free_port()
    procs: list[SidecarProcess] = []
    try:
        inbound = start_sidecar({}, sidecar_id="app-sidecar", config_file=config, env=env,
                                extra_args=["--inbound", f"{LOOPBACK}:{port}",
                                            "--app", f"http://{LOOPBACK}:{app_port}"])
        procs.append(inbound)
        polite = None
        if caller:
            polite = start_sidecar({"svc": [f"http://{LOOPBACK}:{port}"]}, sidecar_id="polite",
                                   env=env, extra_args=["--max-attempts", "1"])
            procs.append(polite)
        yield Rig(inbound, port, polite)
        assert "Traceback" not in inbound.output()
    finally:
        for proc in procs:
            proc.stop()
            proc.cleanup()
        app.stop(0).wait(5)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    yield from _rig(tmp_path, {})


def _plain_post(client: RawH2) -> int:
    """A non-gRPC HTTP/2 upload promising 1000 bytes."""
    stream_id = client.conn.get_next_available_stream_id()
    client.conn.send_headers(stream_id, [
        (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/upload"),
        (b":authority", b"app"), (b"content-type", b"application/octet-stream"),
        (b"content-length", b"1000")])
    client.flush()
    client.events[stream_id] = []
    return stream_id


def _trickle(port: int, stop: threading.Event, results: list[tuple[int | None, bytes]],
             plain: bool = False) -> None:
    """One connection of slow streams: SLOW_STREAMS // 3 gRPC calls (a message prefix
    promising 1000 bytes, then one byte every 0.5 s), or plain POSTs; until every stream
    ended. Records each stream's grpc-status (None for plain) and :status."""
    client = RawH2(port)
    client.sock.settimeout(0.5)
    try:
        if plain:
            streams = [_plain_post(client) for _ in range(SLOW_STREAMS // 3)]
        else:
            streams = [client.start_call("Echo") for _ in range(SLOW_STREAMS // 3)]
            for sid in streams:
                client.send(sid, _grpc_frame(b"x" * 1000)[:6], end=False)
        deadline = time.monotonic() + 4 * UPLOAD_TIMEOUT
        while not stop.is_set() and time.monotonic() < deadline:
            for sid in streams:
                if not client.ended(sid):
                    client.conn.send_data(sid, b"x")
            client.flush()
            try:
                client.pump(lambda: all(client.ended(s) for s in streams), timeout=0.5)
            except AssertionError:
                continue  # not all ended yet: one more byte each
            break
        for sid in streams:
            head: dict[bytes, bytes] = {}
            for event in client.events[sid]:
                if isinstance(event, h2.events.ResponseReceived):
                    head.update(event.headers)
            results.append((client.status(sid), head.get(b":status", b"")))
    finally:
        client.close()


def test_slow_h2_uploads_hold_no_slot_and_count_against_their_caller(rig: Rig) -> None:
    stop = threading.Event()
    results: list[tuple[int | None, bytes]] = []
    attack = [threading.Thread(target=_trickle, args=(rig.port, stop, results, i == 2))
              for i in range(3)]
    for thread in attack:
        thread.start()
    answers = []
    try:
        time.sleep(0.5)  # every slow stream is in its upload
        for i in range(20):  # ~4 s at 5 calls/s: past the upload deadline and beyond
            answers.append(rig.polite_echo(b"order-%d" % i))
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in attack:
            thread.join(30)
    assert answers == [b"order-%d" % i for i in range(20)]
    assert len(results) == SLOW_STREAMS
    grpc_results = results_of(results, plain=False)
    plain_results = results_of(results, plain=True)
    assert grpc_results == [DEADLINE_EXCEEDED] * (SLOW_STREAMS - SLOW_STREAMS // 3)
    assert plain_results == [b"408"] * (SLOW_STREAMS // 3)
    assert rig.metric("equilibrium_inbound_slow_uploads_total", caller="anonymous",
                      outcome="timeout") == SLOW_STREAMS
    assert rig.metric("equilibrium_inbound_requests_total", caller="anonymous",
                      outcome="upload-timeout") == SLOW_STREAMS
    assert rig.metric("equilibrium_inbound_caller_punishment_level", caller="anonymous") >= 1
    assert rig.metric("equilibrium_inbound_caller_punishment_level", caller="polite") == 0


def results_of(results: list[tuple[int | None, bytes]], *, plain: bool) -> list[object]:
    if plain:
        return [status for grpc_status, status in results if grpc_status is None]
    return [grpc_status for grpc_status, _ in results if grpc_status is not None]


def test_abandoned_h2_uploads_are_counted_as_such(rig: Rig) -> None:
    client = RawH2(rig.port)
    try:
        reset = client.start_call("Echo")
        client.send(reset, _grpc_frame(b"y" * 1000)[:300], end=False)  # a third of a message
        time.sleep(0.2)
        client.conn.reset_stream(reset, ErrorCodes.CANCEL)
        client.flush()
        fine = client.start_call("Echo")  # the connection goes on
        client.send(fine, _grpc_frame(b"fine"), end=True)
        client.pump(lambda: client.ended(fine))
        assert client.status(fine) == 0 and client.body(fine)[5:] == b"fine"
    finally:
        client.close()
    hang_up = RawH2(rig.port)  # the whole connection goes, a plain body half-sent
    try:
        stream_id = _plain_post(hang_up)
        hang_up.send(stream_id, b"z" * 400, end=False)
        time.sleep(0.2)
    finally:
        hang_up.close()
    deadline = time.monotonic() + 5
    while rig.metric("equilibrium_inbound_slow_uploads_total", outcome="abandoned") < 2:
        assert time.monotonic() < deadline, "the abandoned uploads were not counted"
        time.sleep(0.1)
    assert rig.metric("equilibrium_inbound_requests_total", caller="anonymous",
                      outcome="upload-abandoned") == 2
    assert rig.metric("equilibrium_inbound_slow_uploads_total", outcome="timeout") == 0


def test_a_message_trickled_after_the_slot_still_meets_its_deadline(rig: Rig) -> None:
    """A streaming call passes its first message at once (it gets a slot), then trickles the
    second: DEADLINE_EXCEEDED once that message is ``upload_timeout`` old, counted."""
    client = RawH2(rig.port)
    client.sock.settimeout(0.5)
    try:
        call = client.start_call("Chat")
        client.send(call, _grpc_frame(b"hello"), end=False)
        client.pump(lambda: len(client.body(call)) >= 10)  # the app echoed it: admitted
        assert client.body(call)[5:10] == b"hello"
        client.send(call, _grpc_frame(b"w" * 500)[:20], end=False)
        started = time.monotonic()
        while not client.ended(call):
            assert time.monotonic() - started < 4 * UPLOAD_TIMEOUT, "never cut"
            client.send(call, b"w", end=False)
            with contextlib.suppress(AssertionError):  # not ended yet: one more byte
                client.pump(lambda: client.ended(call), timeout=0.4)
        assert client.status(call) == DEADLINE_EXCEEDED
    finally:
        client.close()
    assert rig.metric("equilibrium_inbound_slow_uploads_total", caller="anonymous",
                      outcome="timeout") == 1


def test_bidi_streams_give_their_slot_back_and_are_capped_per_caller(
        tmp_path: Path) -> None:
    """Three idle bidi streams on an app with three slots: after ``upload_timeout`` the first
    two go on without a slot (the caller's cap of long-lived exchanges is 2), the third is
    ended with RESOURCE_EXHAUSTED, and unary calls are served meanwhile; the two still talk."""
    for rig in _rig(tmp_path, {"websocket_max_per_caller": 2}):
        channel = grpc.insecure_channel(f"{LOOPBACK}:{rig.port}",
                                        options=[("grpc.default_authority", "app")])
        chat = channel.stream_stream(f"/{SERVICE}/Chat")
        outboxes: list[queue.Queue[bytes | None]] = [queue.Queue() for _ in range(3)]
        calls = []
        try:
            for box in outboxes:
                box.put(b"hi")
                calls.append(chat(iter(box.get, None), timeout=30))
            for call in calls:
                assert next(call) == b"hi"  # each got a slot: all three slots are held
            time.sleep(UPLOAD_TIMEOUT + 1.0)  # the streams still send: past their slot time
            assert rig.polite_echo(b"served") == b"served"  # the slots are free again
            statuses = []
            for box, call in zip(outboxes, calls, strict=True):
                box.put(b"again")
                try:
                    statuses.append((next(call), None))
                except grpc.RpcError as exc:
                    statuses.append((b"", exc.code()))
            assert sorted(statuses, key=repr) == sorted(
                [(b"again", None), (b"again", None),
                 (b"", grpc.StatusCode.RESOURCE_EXHAUSTED)], key=repr)
            assert rig.metric("equilibrium_inbound_requests_total", caller="anonymous",
                              outcome="websocket-limit") == 1
            assert rig.metric("equilibrium_inbound_slow_uploads_total") == 0
        finally:
            for box in outboxes:
                box.put(None)
            for call in calls:
                call.cancel()
            channel.close()


def test_h2c_connections_count_against_the_per_source_cap(tmp_path: Path) -> None:
    for rig in _rig(tmp_path, {"max_connections_per_source": 4}, caller=False):
        http1 = [socket.create_connection((LOOPBACK, rig.port)) for _ in range(2)]
        for sock in http1:
            sock.sendall(b"GET /")  # a request head under way: HTTP/1.1
        h2c = [RawH2(rig.port) for _ in range(2)]
        try:
            for client in h2c:  # both served: 4 connections from this address
                call = client.start_call("Echo")
                client.send(call, _grpc_frame(b"ok"), end=True)
                client.pump(lambda c=client, s=call: c.ended(s))
                assert client.status(call) == 0
            extra = RawH2(rig.port)  # the fifth, an h2c one: closed at once
            extra.sock.settimeout(5)
            try:
                assert extra.sock.recv(65536) == b""
            except ConnectionResetError:
                pass
            finally:
                extra.close()
            assert rig.metric("equilibrium_inbound_connections_rejected_total",
                              reason="per-source") == 1
            h2c.pop().close()  # one closes: an h2c connection may come in again
            time.sleep(0.3)
            again = RawH2(rig.port)
            h2c.append(again)
            back = again.start_call("Echo")
            again.send(back, _grpc_frame(b"back"), end=True)
            again.pump(lambda c=again, s=back: c.ended(s))
            assert again.status(back) == 0
            # and an HTTP/1.1 one past the cap is refused too (h2c ones count for it)
            late = socket.create_connection((LOOPBACK, rig.port))
            late.settimeout(5)
            try:
                late.sendall(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
                assert late.recv(65536) == b""
            except ConnectionResetError:
                pass
            finally:
                late.close()
            assert rig.metric("equilibrium_inbound_connections_rejected_total",
                              reason="per-source") == 2
        finally:
            for client in h2c:
                client.close()
            for sock in http1:
                sock.close()
