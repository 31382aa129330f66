"""The real sidecar process runs the event loop it was asked for, and says which one.

``--event-loop`` (or ``EQUILIBRIUM_EVENT_LOOP``): ``auto`` (the default) runs uvloop, a
dependency; ``asyncio`` forces asyncio's own loop. The running loop is named in the startup
log and in ``/debug/state``, and proxying works on either.
"""

from __future__ import annotations

import aiohttp
import pytest

from tests.integration.procs import (
    async_start_sidecar,
    async_stop,
    fetch,
    run_equilibrium,
    start_backend,
)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_forced_loop_runs_reports_and_proxies(loop: str) -> None:
    backend = await start_backend("pod-a")
    sidecar = await async_start_sidecar({"svc": [backend.url]},
                                        extra_args=["--event-loop", loop])
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
            reply = await fetch(client, "GET", f"{sidecar.outbound_url}/x",
                                headers={"Host": "svc"})
        assert (reply.status, reply.body) == (200, b"pod-a")
        section = sidecar.state()["event_loop"]
        assert section["name"] == loop
        assert section["requested"] == loop
        assert f"event loop: {loop} " in sidecar.output()
    finally:
        await async_stop(sidecar)
        await backend.stop()


async def test_default_is_uvloop_and_the_environment_or_flag_overrides_it() -> None:
    default = await async_start_sidecar()
    try:
        assert default.state()["event_loop"] | {"version": ""} == {
            "name": "uvloop", "requested": "auto", "version": ""}
        assert "event loop: uvloop" in default.output()
        assert "auto: uvloop installed" in default.output()
    finally:
        await async_stop(default)
    by_env = await async_start_sidecar(env={"EQUILIBRIUM_EVENT_LOOP": "asyncio"})
    try:
        assert by_env.state()["event_loop"]["name"] == "asyncio"
    finally:
        await async_stop(by_env)
    flag_wins = await async_start_sidecar(env={"EQUILIBRIUM_EVENT_LOOP": "asyncio"},
                                          extra_args=["--event-loop=uvloop"])
    try:
        assert flag_wins.state()["event_loop"]["name"] == "uvloop"
    finally:
        await async_stop(flag_wins)


def test_unknown_loop_is_a_bad_configuration() -> None:
    by_env = run_equilibrium("sidecar", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                             env={"EQUILIBRIUM_EVENT_LOOP": "trio"})
    assert by_env.returncode == 2
    assert "event loop must be one of auto, asyncio, uvloop, got 'trio'" in by_env.stderr
    by_flag = run_equilibrium("sidecar", "--event-loop", "trio")
    assert by_flag.returncode == 2
    assert "--event-loop" in by_flag.stderr and "invalid choice" in by_flag.stderr
