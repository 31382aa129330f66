"""Network namespaces for the interception tests: commands, and sockets made inside them.

Sockets of apps, backends and API stand-ins are created inside a namespace by switching this
thread's network namespace (``setns``) just for the ``socket()`` call; they are then bound,
served and used from the test's event loop. Hosts with a ``:`` are IPv6. Needs root and
iproute2; ``require_tools`` fails the test with the reason when something is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def require_tools(*tools: str) -> None:
    wanted = ("ip", "iptables", "setpriv", *tools)
    missing = [tool for tool in wanted if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root (network namespaces and iptables)")
    if missing:
        import pytest

        pytest.fail("transparent interception test needs: " + ", ".join(missing)
                    + " (CI installs iptables, which brings ip6tables, and iproute2 in .ci/run)")


def run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def inside(namespace: str) -> Iterator[None]:
    """Sockets this thread creates meanwhile belong to ``namespace`` (no await inside!)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)
        os.close(target)


def listen_in(namespace: str, host: str, port: int = 0) -> socket.socket:
    with inside(namespace):
        sock = socket.socket(family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
    sock.setblocking(False)
    return sock


def free_port_in(namespace: str, host: str) -> int:
    with listen_in(namespace, host) as sock:
        return int(sock.getsockname()[1])


async def connect_in(
    namespace: str, host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain TCP connection made from ``namespace`` -- no proxy of any kind configured."""
    with inside(namespace):
        sock = socket.socket(family(host), socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(5):
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def http_in(namespace: str, host: str, port: int, path: str = "/",
                  host_header: str | None = None) -> Answer:
    """One HTTP/1.1 GET written by hand (``Connection: close``), as an app would send it."""
    reader, writer = await connect_in(namespace, host, port)
    try:
        default_host = f"[{host}]" if ":" in host else host
        head = (f"GET {path} HTTP/1.1\r\nHost: {host_header or default_host}\r\n"
                "Connection: close\r\n\r\n")
        writer.write(head.encode())
        async with asyncio.timeout(10):
            raw = await reader.read()
    finally:
        writer.close()
    header_block, _, body = raw.partition(b"\r\n\r\n")
    lines = header_block.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return Answer(int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body)
