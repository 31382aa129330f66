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

``h2`` is what :mod:`sidecar.h2_connection` uses today (pure Python). libnghttp2 is the C
engine of curl, Apache httpd and Node.js; these machines have it as a dependency of libcurl
(``libnghttp2.so.14``), and ``ctypes`` reaches it without a compiler. The ctypes wrapper
here is the smallest that does the exchange (callbacks for headers, data and stream close;
``mem_send``/``mem_recv``): what a binding would cost at least, callbacks included.

CPU time of this thread over ``--calls`` exchanges per turn, engines alternated for
``--rounds`` rounds; the answer of every exchange is checked (status, message, trailers).

    python scripts/h2_engine_cost.py --calls 5000 --rounds 3
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import time
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events

PATH = b"/bench.Echo/Unary"
MESSAGE = b"\x00\x00\x00\x00\x0bhello world"  # one gRPC message (5-byte prefix + payload)
REQUEST = [
    (b":method", b"POST"), (b":scheme", b"http"), (b":path", PATH),
    (b":authority", b"backend"), (b"content-type", b"application/grpc"),
    (b"te", b"trailers"), (b"grpc-timeout", b"5S"), (b"user-agent", b"grpc-python/1.0"),
]
RESPONSE = [(b":status", b"200"), (b"content-type", b"application/grpc")]
TRAILERS = [(b"grpc-status", b"0"), (b"grpc-message", b"")]


# ---------------------------------------------------------------- the h2 library

class H2Pair:
    """A client and a server ``h2`` connection joined in memory."""

    def __init__(self) -> None:
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None))
        self.server = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None))
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


# ---------------------------------------------------------------- libnghttp2 via ctypes

class _Nv(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("value", ctypes.c_void_p),
                ("namelen", ctypes.c_size_t), ("valuelen", ctypes.c_size_t),
                ("flags", ctypes.c_uint8)]


class _FrameHd(ctypes.Structure):  # the head of every nghttp2_frame
    _fields_ = [("length", ctypes.c_size_t), ("stream_id", ctypes.c_int32),
                ("type", ctypes.c_uint8), ("flags", ctypes.c_uint8),
                ("reserved", ctypes.c_uint8)]


_READ = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p,
                         ctypes.c_size_t, ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p,
                         ctypes.c_void_p)


class _DataProvider(ctypes.Structure):
    _fields_ = [("source", ctypes.c_void_p), ("read_callback", _READ)]


_ON_HEADER = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(_FrameHd),
                              ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                              ctypes.c_size_t, ctypes.c_uint8, ctypes.c_void_p)
_ON_DATA = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint8, ctypes.c_int32,
                            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_ON_FRAME = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(_FrameHd),
                             ctypes.c_void_p)
_ON_CLOSE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int32, ctypes.c_uint32,
                             ctypes.c_void_p)

DATA_FLAG_EOF = 0x01
DATA_FLAG_NO_END_STREAM = 0x02
FRAME_HEADERS = 0x01


def _library() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("nghttp2") or "libnghttp2.so.14"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    vp, i32 = ctypes.c_void_p, ctypes.c_int32
    lib.nghttp2_session_mem_send.restype = ctypes.c_ssize_t
    lib.nghttp2_session_mem_send.argtypes = [vp, ctypes.POINTER(ctypes.c_void_p)]
    lib.nghttp2_session_mem_recv.restype = ctypes.c_ssize_t
    lib.nghttp2_session_mem_recv.argtypes = [vp, ctypes.c_char_p, ctypes.c_size_t]
    lib.nghttp2_submit_request.restype = i32
    lib.nghttp2_submit_request.argtypes = [vp, vp, ctypes.POINTER(_Nv), ctypes.c_size_t,
                                           ctypes.POINTER(_DataProvider), vp]
    lib.nghttp2_submit_response.argtypes = [vp, i32, ctypes.POINTER(_Nv), ctypes.c_size_t,
                                            ctypes.POINTER(_DataProvider)]
    lib.nghttp2_submit_trailer.argtypes = [vp, i32, ctypes.POINTER(_Nv), ctypes.c_size_t]
    lib.nghttp2_submit_settings.argtypes = [vp, ctypes.c_uint8, vp, ctypes.c_size_t]
    lib.nghttp2_session_consume.argtypes = [vp, i32, ctypes.c_size_t]
    lib.nghttp2_session_callbacks_new.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    for setter, kind in (("on_header", _ON_HEADER), ("on_data_chunk_recv", _ON_DATA),
                         ("on_frame_recv", _ON_FRAME), ("on_stream_close", _ON_CLOSE)):
        getattr(lib, f"nghttp2_session_callbacks_set_{setter}_callback").argtypes = [vp, kind]
    lib.nghttp2_session_client_new.argtypes = [ctypes.POINTER(ctypes.c_void_p), vp, vp]
    lib.nghttp2_session_server_new.argtypes = [ctypes.POINTER(ctypes.c_void_p), vp, vp]
    return lib


def _nva(fields: list[tuple[bytes, bytes]]) -> tuple[ctypes.Array[_Nv], list[bytes]]:
    """An nghttp2_nv array over ``fields`` (the bytes kept alive by the list returned)."""
    keep = [part for pair in fields for part in pair]
    nva = (_Nv * len(fields))()
    for i, (name, value) in enumerate(fields):
        nva[i].name = ctypes.cast(ctypes.c_char_p(name), ctypes.c_void_p)
        nva[i].value = ctypes.cast(ctypes.c_char_p(value), ctypes.c_void_p)
        nva[i].namelen, nva[i].valuelen, nva[i].flags = len(name), len(value), 0
    return nva, keep


class NgSession:
    """One nghttp2 session (client or server side) with Python callbacks: headers and
    data are collected per stream; a body to send is served from ``outgoing``."""

    def __init__(self, lib: ctypes.CDLL, *, server: bool) -> None:
        self.lib = lib
        self.headers: dict[int, list[tuple[bytes, bytes]]] = {}
        self.data: dict[int, bytes] = {}
        self.ended: set[int] = set()
        # a body to send, and the trailer section after it (submitted from the read
        # callback, as nghttp2 asks: before it, the trailers would end the stream first)
        self.outgoing: dict[int, tuple[bytes, tuple[ctypes.Array[_Nv], int] | None]] = {}
        self._callbacks = [  # kept alive for the session's life
            _ON_HEADER(self._on_header), _ON_DATA(self._on_data),
            _ON_FRAME(self._on_frame), _ON_CLOSE(self._on_close), _READ(self._read)]
        cbs = ctypes.c_void_p()
        lib.nghttp2_session_callbacks_new(ctypes.byref(cbs))
        for setter, callback in zip(("on_header", "on_data_chunk_recv", "on_frame_recv",
                                     "on_stream_close"), self._callbacks, strict=False):
            getattr(lib, f"nghttp2_session_callbacks_set_{setter}_callback")(cbs, callback)
        self.session = ctypes.c_void_p()
        new = lib.nghttp2_session_server_new if server else lib.nghttp2_session_client_new
        if new(ctypes.byref(self.session), cbs, None) != 0:
            raise RuntimeError("nghttp2 session not created")
        lib.nghttp2_session_callbacks_del(cbs)
        lib.nghttp2_submit_settings(self.session, 0, None, 0)
        self.provider = _DataProvider(None, self._callbacks[4])

    def _on_header(self, _s: int, frame: Any, name: int, namelen: int, value: int,
                   valuelen: int, _flags: int, _u: int) -> int:
        sid = frame.contents.stream_id
        self.headers.setdefault(sid, []).append(
            (ctypes.string_at(name, namelen), ctypes.string_at(value, valuelen)))
        return 0

    def _on_data(self, _s: int, _flags: int, sid: int, data: int, length: int, _u: int) -> int:
        self.data[sid] = self.data.get(sid, b"") + ctypes.string_at(data, length)
        self.lib.nghttp2_session_consume(self.session, sid, length)  # taken: credit back
        return 0

    def _on_frame(self, _s: int, frame: Any, _u: int) -> int:
        hd = frame.contents
        if hd.flags & 0x1 and hd.type in (0x0, FRAME_HEADERS):  # END_STREAM
            self.ended.add(hd.stream_id)
        return 0

    def _on_close(self, _s: int, sid: int, _code: int, _u: int) -> int:
        return 0

    def _read(self, _s: int, sid: int, buf: int, length: int, flags: Any,
              _src: int, _u: int) -> int:
        body, trailers = self.outgoing.pop(sid, (b"", None))
        n = min(len(body), length)
        ctypes.memmove(buf, body, n)
        flags[0] = DATA_FLAG_EOF
        if trailers is not None:
            flags[0] |= DATA_FLAG_NO_END_STREAM
            self.lib.nghttp2_submit_trailer(self.session, sid, *trailers)
        return n

    def send(self) -> bytes:
        out = []
        data = ctypes.c_void_p()
        while (n := self.lib.nghttp2_session_mem_send(self.session, ctypes.byref(data))) > 0:
            out.append(ctypes.string_at(data, n))
        if n < 0:
            raise RuntimeError(f"nghttp2 mem_send: {n}")
        return b"".join(out)

    def receive(self, data: bytes) -> None:
        if data and self.lib.nghttp2_session_mem_recv(self.session, data, len(data)) < 0:
            raise RuntimeError("nghttp2 mem_recv failed")


class NgPair:
    """A client and a server nghttp2 session joined in memory."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.client = NgSession(lib, server=False)
        self.server = NgSession(lib, server=True)
        self.request, self._keep_req = _nva(REQUEST)
        self.response, self._keep_resp = _nva(RESPONSE)
        self.trailers, self._keep_tr = _nva(TRAILERS)
        for _ in range(2):
            self.server.receive(self.client.send())
            self.client.receive(self.server.send())

    def call(self) -> tuple[bytes, bytes, bytes]:
        lib, client, server = self.lib, self.client, self.server
        sid = lib.nghttp2_submit_request(client.session, None, self.request, len(REQUEST),
                                         ctypes.byref(client.provider), None)
        client.outgoing[sid] = (MESSAGE, None)
        server.receive(client.send())
        got = server.data.pop(sid, b"")
        server.headers.pop(sid, None)
        server.outgoing[sid] = (got, (self.trailers, len(TRAILERS)))
        lib.nghttp2_submit_response(server.session, sid, self.response, len(RESPONSE),
                                    ctypes.byref(server.provider))
        client.receive(server.send())
        server.receive(client.send())  # the window updates
        fields = client.headers.pop(sid, [])
        body = client.data.pop(sid, b"")
        client.ended.discard(sid)
        server.ended.discard(sid)
        named = dict(fields)
        return named.get(b":status", b""), body, named.get(b"grpc-status", b"")


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
    lib = _library()
    engines: dict[str, Callable[[], tuple[bytes, bytes, bytes]]] = {"h2": H2Pair().call}
    if lib is None:
        print("libnghttp2 not found: only the h2 row")
    else:
        engines["nghttp2 (ctypes)"] = NgPair(lib).call
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
