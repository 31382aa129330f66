"""The local signaling plane (embedded Redis + a real signaler) and the bounded PING wait.

Real processes only: a redis-server subprocess, a real ``equilibrium signaler`` and a real
sidecar that joins the plane the way the demo and the herding bench make them join. The point
under test is where the secrets go: the mesh key and the Redis password reach the children in
their environment only, never their command lines or a file.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from equilibrium.lab.embedded_redis import (
    EmbeddedRedis,
    RedisNotReady,
    RedisUnavailable,
    find_redis_server,
    free_port,
    wait_for_ping,
)
from equilibrium.lab.sidecars import Sidecar
from equilibrium.lab.signaling_plane import MESH_KEY_ENV, REDIS_URL_ENV, SignalingPlane
from tests.redis_process import RedisProcess

ONE_TRY = {"socket_timeout": 2, "socket_connect_timeout": 2, "retry": Retry(NoBackoff(), 0)}


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (part.decode(errors="replace").partition("=") for part in raw.split(b"\0") if part)
    return {name: value for name, _, value in pairs}


async def _connected(sidecar: Sidecar, tries: int = 100) -> bool:
    """True once the sidecar's ``equilibrium_signaling_connected`` gauge reads 1 (bounded)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        for _ in range(tries):
            async with session.get(sidecar.admin_url + "/metrics") as resp:
                text = await resp.text()
            if "\nequilibrium_signaling_connected 1.0" in text:
                return True
            await asyncio.sleep(0.1)
    return False


def _files_holding(folder: Path, secret: str) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and secret in p.read_text(errors="replace")]


async def test_plane_hands_secrets_to_children_only_in_their_environment(tmp_path: Path) -> None:
    plane = SignalingPlane(tmp_path, epoch=0.5, tokens=4, signer="plane-test",
                           upstreams=["demo"])
    await plane.start()
    sidecar: Sidecar | None = None
    try:
        assert plane.embedded and plane.signaler is not None
        secrets = plane.sidecar_env()
        key, url = secrets[MESH_KEY_ENV], secrets[REDIS_URL_ENV]
        password = urlsplit(url).password
        assert len(key) >= 32 and password and len(password) >= 16
        # The URL is a working one, and the password is needed.
        assert redis.Redis.from_url(url, **ONE_TRY).ping() is True
        port = urlsplit(url).port
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, **ONE_TRY).ping()

        sidecar = await Sidecar.start(
            "plane-test-1", {"demo": ["http://127.0.0.1:9"]}, extra=plane.sidecar_args(),
            stderr_path=str(tmp_path / "sidecar.log"), env=plane.sidecar_env())
        for pid in (plane.signaler.pid, sidecar.child.pid):
            argv, env = _cmdline(pid), _environ(pid)
            assert key not in argv and password not in argv and "--mesh-secret" not in argv
            assert env[MESH_KEY_ENV] == key and env[REDIS_URL_ENV] == url
        assert "--upstream demo" in _cmdline(plane.signaler.pid)
        assert not any(key in a or password in a for a in plane.sidecar_args())
        assert _files_holding(tmp_path, key) == [] and _files_holding(tmp_path, password) == []

        # The signaler answers on its admin listener under the id it was given; the sidecar
        # reached the (password-protected) Redis with what it found in its environment.
        body = await plane.debug_state()
        assert body["id"] == "plane-test" and body["epoch"] > 0
        assert await plane.state("no-such-upstream") == {}
        assert await _connected(sidecar), "the sidecar never reached the plane's Redis"

        # A stop that is cancelled (Ctrl-C while the demo shuts down) still takes Redis down.
        # The signaler is frozen, so its SIGTERM waits out the grace period: the cancel lands
        # while the plane is stopping it.
        os.kill(plane.signaler.pid, signal.SIGSTOP)
        stopping = asyncio.create_task(plane.stop())
        await asyncio.sleep(0.2)
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(url, **ONE_TRY).ping()
        os.killpg(plane.signaler.pid, signal.SIGKILL)  # its own group; reaped by stop() below
    finally:
        if sidecar is not None:
            await sidecar.stop()
        signaler = plane.signaler
        await plane.stop()
        await plane.stop()  # safe twice
    assert signaler is not None and not signaler.running
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, **ONE_TRY).ping()


async def test_a_signaler_that_cannot_start_says_why_and_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    plane = SignalingPlane(tmp_path, signer="not a valid id!")
    with pytest.raises(RuntimeError, match="the signaler did not start") as caught:
        await plane.start()
    assert "--id" in str(caught.value)  # the tail of its log, with the signaler's own reason
    assert plane.signaler is None
    url = plane.redis_url
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, **ONE_TRY).ping()


def test_wait_for_ping_is_bounded_and_never_shows_the_password() -> None:
    port = free_port()
    with pytest.raises(RedisNotReady) as caught:
        wait_for_ping(f"redis://:hunter2-secret@127.0.0.1:{port}/0", 0.3)
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and "hunter2-secret" not in message
    assert isinstance(caught.value, RedisUnavailable)

    calls: list[int] = []

    def gone() -> None:
        calls.append(1)
        raise RuntimeError("the server exited")

    with pytest.raises(RuntimeError, match="the server exited"):
        wait_for_ping(f"redis://127.0.0.1:{port}/0", 30.0, check=gone)
    assert calls == [1]  # gave up at the first check, not after the timeout

    with EmbeddedRedis(password="pw-for-ping") as server:
        wait_for_ping(server.url, 5.0)  # returns: the server answers
        with pytest.raises(RedisNotReady):
            wait_for_ping(server.url.replace("pw-for-ping", "wrong"), 0.3)


def test_the_embedded_redis_password_never_reaches_a_command_line(tmp_path: Path) -> None:
    """redis-server gets its password on stdin: a wrapper that records the argv it was given
    (before redis-server could rewrite its process title) never sees it; AUTH still holds."""
    real = find_redis_server().path
    seen = tmp_path / "argv"
    wrapper = tmp_path / "redis-server"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> {seen}\nexec {real} "$@"\n')
    wrapper.chmod(0o700)
    password = 'p"w d\\ \n#x'  # quotes, spaces, a backslash, a newline, a comment sign
    with RedisProcess(password=password, username="eq", binary=str(wrapper)) as server:
        assert redis.Redis.from_url(server.url, **ONE_TRY).ping() is True
        acl_user = redis.Redis(host="127.0.0.1", port=server.port, username="eq",
                               password=password, **ONE_TRY)
        assert acl_user.ping() is True
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port, **ONE_TRY).ping()
    recorded = seen.read_text()
    assert "--dir" in recorded  # the wrapper did start the server (not only probe it)
    assert "p\"w" not in recorded and "requirepass" not in recorded
