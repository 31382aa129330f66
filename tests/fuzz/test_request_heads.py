"""Hostile HTTP/1.1 requests against real sidecar processes: never a 500, never a hang, never a
traceback, and the next good request is served.

One caller sidecar (outbound listener, upstream ``svc``) and one app sidecar (inbound listener
with the mesh key) in front of a real aiohttp backend, all on loopback. Each example is one
raw request head (hostile method, target, version and headers, ``X-GT-*`` and framing headers
included, with a body or not) written on a fresh connection, which is then half-closed; the
answer, if any, must be a well-formed status line that is not 500, and must come (or the
connection close) within a bound. After every example a plain request must still get 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz.budget import fuzz
from tests.fuzz.strategies import header_values, numbers
from tests.integration.inbound_support import MESH_KEY
from tests.integration.procs import (
    LOOPBACK,
    Backend,
    SidecarProcess,
    free_port,
    start_backend,
    start_sidecar,
)

ANSWER_WITHIN = 8.0  # seconds for an answer or a close (the sidecars' own timers are shorter)

METHODS = st.one_of(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE",
                     "CONNECT", "PRI", "get", "G\x00T", "GET GET", "", "X" * 300]),
    st.text(alphabet=st.characters(codec="ascii", exclude_characters=" \r\n"), min_size=1,
            max_size=10),
)
TARGETS = st.one_of(
    st.sampled_from(["/", "/x?y=1", "*", "http://svc/x", "http://app:8080/a?b#c", "//", "/%00",
                     "/%zz", "/" + "a" * 9_000, "svc:80", "/\x7f", "/é", "?", "/a b"]),
    st.text(alphabet=st.characters(codec="ascii", exclude_characters=" \r\n"), max_size=40)
    .map(lambda t: "/" + t),
)
VERSIONS = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "HTTP/9.9",
                            "HTTP/1.1 x", "http/1.1", ""])
NAMES = st.one_of(
    st.sampled_from(["Host", "host", "Content-Length", "Transfer-Encoding", "Connection",
                     "Expect", "Upgrade", "Sec-WebSocket-Key", "Sec-WebSocket-Version",
                     "X-GT-Identity", "X-GT-Bid", "X-GT-Regret", "X-GT-Retry", "X_GT_Price",
                     "x-gt-reputation", "X-Forwarded-For", "Via", "TE", "Trailer",
                     "Proxy-Connection", "Keep-Alive", "Content-Type", "Te st", "H\x00st",
                     "", ":authority", " Host"]),
    st.text(alphabet=st.characters(codec="ascii", exclude_characters="\r\n:"), min_size=1,
            max_size=16),
)
FRAMING = st.sampled_from([
    ("Content-Length", "5"), ("Content-Length", "-1"), ("Content-Length", "1, 2"),
    ("Content-Length", "99999999999999999999"), ("Transfer-Encoding", "chunked"),
    ("Transfer-Encoding", "gzip, chunked"), ("Transfer-Encoding", "chunked, identity"),
    ("Expect", "100-continue"), ("Connection", "Upgrade"), ("Upgrade", "websocket"),
])
BODIES = st.one_of(
    st.just(b""), st.binary(max_size=64),
    st.sampled_from([b"5\r\nhello\r\n0\r\n\r\n", b"ffffffffffffffffff\r\n", b"0\r\nX: y\r\n\r\n",
                     b"1;ext=\x00\r\na\r\n0\r\n\r\n", b"-1\r\n"]),
)


def encoded(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape") if not text.isascii() else text.encode()


@st.composite
def requests(draw: st.DrawFn, host: str) -> bytes:
    method, target, version = draw(METHODS), draw(TARGETS), draw(VERSIONS)
    headers = [(n, v) for n, v in draw(st.lists(st.tuples(NAMES, header_values()), max_size=6))]
    headers += draw(st.lists(FRAMING, max_size=2))
    if draw(st.booleans()):
        headers.insert(draw(st.integers(0, len(headers))), ("Host", host))
    if draw(st.booleans()):
        headers.append(("X-GT-Bid", draw(numbers())))
    lines = [encoded(f"{method} {target} {version}".rstrip())]
    lines += [encoded(name) + b": " + encoded(value.replace("\r", "").replace("\n", ""))
              for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + draw(BODIES)


class _Loop:
    """An event loop in a thread: the backend serves while the sync tests block on sockets."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


@dataclass
class Mesh:
    backend: Backend
    caller: SidecarProcess
    app_sidecar: SidecarProcess
    inbound_port: int


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    loop = _Loop()
    backend = loop.run(start_backend("app"))
    inbound_port = free_port()
    env = {"EQUILIBRIUM_MESH_SECRET": MESH_KEY}
    caller = start_sidecar({"svc": [backend.url]}, sidecar_id="fuzz-caller", env=env)
    app_sidecar = start_sidecar({}, sidecar_id="fuzz-app", env=env, extra_args=[
        "--inbound", f"{LOOPBACK}:{inbound_port}", "--app", backend.url])
    try:
        yield Mesh(backend, caller, app_sidecar, inbound_port)
    finally:
        for proc in (caller, app_sidecar):
            proc.stop(timeout=5)
        for proc in (caller, app_sidecar):
            output = proc.output()
            proc.cleanup()
            assert "Traceback" not in output, output[-4000:]
        loop.run(backend.stop())
        loop.close()


def exchange(port: int, request: bytes, half_close: bool = True) -> bytes:
    """Write ``request`` (then half-close: an unfinished body ends there), read until the
    server closes or ``ANSWER_WITHIN``."""
    with socket.create_connection((LOOPBACK, port), timeout=ANSWER_WITHIN) as sock:
        with contextlib.suppress(OSError):  # the server may refuse mid-write: fine
            sock.sendall(request)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
                if len(answer) > 1 << 20:
                    break
    return answer


def check_answer(answer: bytes, request: bytes) -> None:
    if not answer:
        return  # closed without an answer: allowed for what cannot be parsed
    status_line = answer.split(b"\r\n", 1)[0]
    # aiohttp echoes a request's version (an ``HTTP/2.0`` request line gets ``HTTP/2.0 200``)
    assert status_line.startswith(b"HTTP/"), (status_line, request[:300])
    parts = status_line.split(b" ", 2)
    assert len(parts) >= 2 and parts[1].isdigit() and len(parts[1]) == 3, status_line
    # every answer on the connection (100 Continue, then the final one) must not be a 500
    for line in answer.split(b"\r\n"):
        if line.startswith(b"HTTP/") and line[5:8].replace(b".", b"").isdigit():
            assert not line.split(b" ")[1].startswith(b"50") or line.split(b" ")[1] in (
                b"502", b"503", b"504", b"501", b"505", b"508"), (line, request[:300])


def still_serves(port: int, host: str) -> None:
    answer = exchange(port, f"GET /ok HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                      .encode(), half_close=False)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


@fuzz
@given(request=requests("svc"))
# found at 10,000 examples: an asterisk-form target was glued to the endpoint's URL (500)
@example(request=b"GET * HTTP/1.1\r\nHost: svc\r\n\r\n")
@example(request=b"OPTIONS svc:80 HTTP/1.1\r\nHost: svc\r\n\r\n")
def test_outbound_listener(mesh: Mesh, request: bytes) -> None:
    port = mesh.caller.outbound_port
    try:
        answer = exchange(port, request)
    except TimeoutError:
        pytest.fail(f"no answer and no close within {ANSWER_WITHIN} s: {request[:300]!r}")
    check_answer(answer, request)
    still_serves(port, "svc")


@fuzz
@given(request=requests("app"))
def test_inbound_listener(mesh: Mesh, request: bytes) -> None:
    try:
        answer = exchange(mesh.inbound_port, request)
    except TimeoutError:
        pytest.fail(f"no answer and no close within {ANSWER_WITHIN} s: {request[:300]!r}")
    check_answer(answer, request)
    still_serves(mesh.inbound_port, "app")
