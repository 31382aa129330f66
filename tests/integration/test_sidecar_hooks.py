"""``equilibrium sidecar-hook``, as the kubelet runs an injected sidecar's hooks: a real
process waiting for a real sidecar's /readyz (post-start), and the wait before the sidecar's
SIGTERM (pre-stop). docs/kubernetes.md, "Start and stop order"."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from tests.integration.procs import REPO_ROOT, child_env, free_port, start_sidecar


def hook(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "equilibrium", "sidecar-hook", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(None), cwd=str(REPO_ROOT))


def test_post_start_returns_once_the_sidecar_is_ready_not_before() -> None:
    admin = free_port()
    waiting = hook("post-start", "--admin", f"127.0.0.1:{admin}", "--timeout", "60")
    try:
        time.sleep(1.5)
        assert waiting.poll() is None  # no sidecar yet: the app's start is still held
        sidecar = start_sidecar({"svc": ["http://127.0.0.1:9"]}, admin_port=admin)
        try:
            out, err = waiting.communicate(timeout=10)
            assert waiting.returncode == 0, err
            assert "sidecar ready after" in out
        finally:
            assert sidecar.stop() == 0
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()


def test_post_start_gives_up_at_its_timeout_and_lets_the_app_start() -> None:
    started = time.monotonic()
    waiting = hook("post-start", "--admin", f"127.0.0.1:{free_port()}", "--timeout", "0.5")
    _, err = waiting.communicate(timeout=20)
    assert waiting.returncode == 0  # a failed postStart hook only gets the sidecar restarted
    assert "not ready after 0.5 s: the app starts anyway" in err
    assert time.monotonic() - started >= 0.5


def test_pre_stop_waits_its_seconds() -> None:
    started = time.monotonic()
    waiting = hook("pre-stop", "--seconds", "0.7")
    waiting.communicate(timeout=20)
    assert waiting.returncode == 0
    assert time.monotonic() - started >= 0.7


def _listener(answer: Callable[[socket.socket], None]) -> tuple[int, socket.socket]:
    """A loopback listener that hands each connection to ``answer`` in a thread."""
    server = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server.getsockname()[1], server


def _garbage(conn: socket.socket) -> None:
    with conn:
        conn.recv(4096)
        conn.sendall(b"SSH-2.0-x\r\n")


def _drip(conn: socket.socket) -> None:
    with conn:
        conn.recv(4096)
        try:
            for _ in range(200):  # a byte every 0.1 s, never a whole status line
                conn.sendall(b"H")
                time.sleep(0.1)
        except OSError:
            pass


def test_post_start_holds_its_timeout_whatever_answers_on_the_port() -> None:
    for answer in (_garbage, _drip):
        port, server = _listener(answer)
        try:
            started = time.monotonic()
            waiting = hook("post-start", "--admin", f"127.0.0.1:{port}", "--timeout", "1")
            _, err = waiting.communicate(timeout=15)
            assert waiting.returncode == 0, (answer.__name__, err)
            assert "not ready after 1 s" in err, answer.__name__
            assert time.monotonic() - started < 8, answer.__name__  # python's start included
        finally:
            server.close()


def test_post_start_takes_no_proxy_from_the_environment() -> None:
    admin = free_port()
    sidecar = start_sidecar({"svc": ["http://127.0.0.1:9"]}, admin_port=admin)
    try:
        waiting = subprocess.Popen(
            [sys.executable, "-m", "equilibrium", "sidecar-hook", "post-start", "--admin",
             f"127.0.0.1:{admin}", "--timeout", "5"], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, cwd=str(REPO_ROOT),
            env=child_env({"http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}))
        out, err = waiting.communicate(timeout=20)
        assert waiting.returncode == 0 and "sidecar ready after" in out, err
    finally:
        assert sidecar.stop() == 0
