"""What the HTTP/2 protocol engine alone costs per unary gRPC call: the ``h2`` library
against libnghttp2 (through ``ctypes``), side by side in one run.

A proxied unary call runs the engine twice over: the caller's connection (server side:
request head and message in, answer head, message and trailers out) and the upstream one
(client side: the same, the other way). So one *exchange* here is one call between a client
and a server connection of the same engine, in memory (the bytes one writes are fed to the
other; no socket, no event loop): exactly the protocol work the sidecar's gRPC path does per
call, and nothing else. Both connections live for the whole run (the HPACK tables fill as
on a real keep-alive connection), flow-control credit is given back as each message is
taken, as the sidecar does.

``h2`` is the pure-Python engine; libnghttp2 is the C engine of curl, Apache httpd and Node.js
(``libnghttp2.so.14`` on these machines, a dependency of libcurl), here through the sidecar's
own binding, :mod:`sidecar.nghttp2` (``ctypes``, the same ``h2.events`` out, callbacks
included): the engine the sidecar runs on where the library loads. Both sides of the
exchange use one engine.

CPU time of this thread over ``--calls`` exchanges per turn, engines alternated for
``--rounds`` rounds; the answer of every exchange is checked (status, message, trailers).

    python scripts/h2_engine_cost.py --calls 5000 --rounds 3
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events

from sidecar import nghttp2

PATH = b"/bench.Echo/Unary"
MESSAGE = b"\x00\x00\x00\x00\x0bhello world"  # one gRPC message (5-byte prefix + payload)
REQUEST = [
    (b":method", b"POST"), (b":scheme", b"http"), (b":path", PATH),
    (b":authority", b"backend"), (b"content-type", b"application/grpc"),
    (b"te", b"trailers"), (b"grpc-timeout", b"5S"), (b"user-agent", b"grpc-python/1.0"),
]
RESPONSE = [(b":status", b"200"), (b"content-type", b"application/grpc")]
TRAILERS = [(b"grpc-status", b"0"), (b"grpc-message", b"")]


# ---------------------------------------------------------------- an engine's two ends

def h2_connection(client_side: bool) -> Any:
    return h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=client_side, header_encoding=None))


def ng_connection(client_side: bool) -> Any:
    return nghttp2.NgConnection(nghttp2.library(), client_side=client_side)


class Pair:
    """A client and a server connection of one engine (``h2``'s interface) joined in memory."""

    def __init__(self, make: Callable[[bool], Any] = h2_connection) -> None:
        self.client = make(True)
        self.server = make(False)
        self.client.initiate_connection()
        self.server.initiate_connection()
        self._to_server(self.client.data_to_send())
        self._to_client(self.server.data_to_send())
        self._to_server(self.client.data_to_send())

    def _to_server(self, data: bytes) -> list[h2.events.Event]:
        return self.server.receive_data(data) if data else []

    def _to_client(self, data: bytes) -> list[h2.events.Event]:
        return self.client.receive_data(data) if data else []

    def call(self) -> tuple[bytes, bytes, bytes]:
        client, server = self.client, self.server
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, REQUEST)
        client.send_data(sid, MESSAGE, end_stream=True)
        got = b""
        for event in self._to_server(client.data_to_send()):
            if isinstance(event, h2.events.DataReceived):
                got += event.data
                server.acknowledge_received_data(event.flow_controlled_length, sid)
        server.send_headers(sid, RESPONSE)
        server.send_data(sid, got)
        server.send_headers(sid, TRAILERS, end_stream=True)
        status = body = grpc_status = b""
        for event in self._to_client(server.data_to_send()):
            if isinstance(event, h2.events.ResponseReceived):
                status = dict(event.headers)[b":status"]
            elif isinstance(event, h2.events.DataReceived):
                body += event.data
                client.acknowledge_received_data(event.flow_controlled_length, sid)
            elif isinstance(event, h2.events.TrailersReceived):
                grpc_status = dict(event.headers)[b"grpc-status"]
        self._to_server(client.data_to_send())  # the window updates
        return status, body, grpc_status


# ---------------------------------------------------------------- the measurement

def measure(call: Callable[[], tuple[bytes, bytes, bytes]], calls: int) -> float:
    """µs of this thread's CPU per exchange, every answer checked."""
    started = time.thread_time()
    for _ in range(calls):
        status, body, grpc_status = call()
        if (status, body, grpc_status) != (b"200", MESSAGE, b"0"):
            raise AssertionError(f"wrong answer: {status!r} {body!r} {grpc_status!r}")
    return (time.thread_time() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000, help="exchanges per turn (5000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of turns (3)")
    args = parser.parse_args()
    engines: dict[str, Callable[[], tuple[bytes, bytes, bytes]]] = {"h2": Pair().call}
    if not nghttp2.available():
        print(f"{nghttp2.SONAME} does not load: only the h2 row")
    else:
        engines["nghttp2 (sidecar.nghttp2)"] = Pair(ng_connection).call
    for call in engines.values():
        measure(call, min(500, args.calls))  # warm-up (tables filled, code paths hot)
    print(f"unary gRPC exchanges in memory, {args.calls} per turn, client + server side "
          "of one engine (the protocol work of one proxied call)")
    print("| round | " + " | ".join(engines) + " | ratio |")
    print("| ---: | " + " | ".join("---:" for _ in engines) + " | ---: |")
    for r in range(1, args.rounds + 1):
        cost = {name: measure(call, args.calls) for name, call in engines.items()}
        values = list(cost.values())
        ratio = f"{values[0] / values[1]:.1f}×" if len(values) > 1 else "–"
        print(f"| {r} | " + " | ".join(f"{v:.1f} µs" for v in values) + f" | {ratio} |")


if __name__ == "__main__":
    main()
