"""The IPv6 twin of a 0.0.0.0 listener (sidecar/dual_stack.py), on real loopback sockets."""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web

from sidecar.dual_stack import start_ipv6_twin, twin_host


@pytest.fixture
async def runner() -> AsyncIterator[web.AppRunner]:
    async def remote(request: web.Request) -> web.Response:
        return web.Response(text=request.remote or "")

    app = web.Application()
    app.router.add_get("/", remote)
    app_runner = web.AppRunner(app, access_log=None)
    await app_runner.setup()
    yield app_runner
    await app_runner.cleanup()


async def start_ipv4(app_runner: web.AppRunner, host: str, port: int = 0) -> int:
    site = web.TCPSite(app_runner, host, port, reuse_address=True)
    await site.start()
    return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]


def make(app_runner: web.AppRunner) -> Callable[[str, int], web.BaseSite]:
    return lambda host, port: web.TCPSite(app_runner, host, port, reuse_address=True)


async def get(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        return await response.text()


def test_only_the_ipv4_wildcard_has_a_twin() -> None:
    assert twin_host("0.0.0.0") == "::"
    assert [twin_host(h) for h in ("127.0.0.1", "::", "::1", "10.0.0.5")] == [None] * 4


async def test_a_wildcard_listener_answers_both_families_on_one_port(
    runner: web.AppRunner,
) -> None:
    port = await start_ipv4(runner, "0.0.0.0")
    twin = await start_ipv6_twin(make(runner), "outbound", "0.0.0.0", 0, port)
    assert twin is not None
    assert await get(f"http://[::1]:{port}/") == "::1"
    # Two sockets, not one dual-stack socket: IPv4 peers keep their plain address.
    assert await get(f"http://127.0.0.1:{port}/") == "127.0.0.1"


async def test_a_specific_address_stays_single_family(runner: web.AppRunner) -> None:
    port = await start_ipv4(runner, "127.0.0.1")
    assert await start_ipv6_twin(make(runner), "admin", "127.0.0.1", 0, port) is None
    probe = socket.socket(socket.AF_INET6)
    with probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("::1", port))


async def test_a_port_taken_on_ipv6_fails_a_fixed_port_and_is_skipped_for_port_0(
    runner: web.AppRunner, caplog: pytest.LogCaptureFixture,
) -> None:
    for _ in range(20):  # a port free on IPv4 whose IPv6 side this test takes
        squatter = socket.socket(socket.AF_INET6)
        squatter.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        squatter.bind(("::", 0))
        squatter.listen(1)
        port = squatter.getsockname()[1]
        try:  # (another test's listener may hold the same number on IPv4: one did in a run)
            assert await start_ipv4(runner, "0.0.0.0", port) == port
            break
        except OSError as exc:
            squatter.close()
            if exc.errno != errno.EADDRINUSE:
                raise
    else:
        pytest.fail("no port free on IPv4 among 20 taken on IPv6")
    with squatter:
        with pytest.raises(OSError) as raised:
            await start_ipv6_twin(make(runner), "inbound", "0.0.0.0", port, port)
        assert raised.value.errno == errno.EADDRINUSE
        with caplog.at_level(logging.WARNING, logger="sidecar.dual_stack"):
            assert await start_ipv6_twin(make(runner), "inbound", "0.0.0.0", 0, port) is None
        assert f"listener inbound: port {port} is taken on IPv6" in caplog.text


async def test_a_kernel_without_ipv6_serves_ipv4_only(
    runner: web.AppRunner, caplog: pytest.LogCaptureFixture,
) -> None:
    def no_ipv6(host: str, port: int) -> web.BaseSite:
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")

    with caplog.at_level(logging.INFO, logger="sidecar.dual_stack"):
        assert await start_ipv6_twin(no_ipv6, "admin", "0.0.0.0", 15020, 15020) is None
    assert "listener admin: no IPv6 here (Address family not supported by protocol)" \
        in caplog.text
