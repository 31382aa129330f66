"""Helpers of the inbound-side integration tests: open-loop callers (the benchmark's own
:func:`equilibrium.lab.bench.policing.open_loop`), a mesh of real sidecar processes (one inbound in
front of the app, one outbound per caller), and the helper processes of
:mod:`tests.integration.inbound_loads` (a capacity-limited app, a flood with retries).

Everything runs on loopback and is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yarl import URL

from equilibrium.lab.bench.policing import Shot
from equilibrium.lab.loadgen import percentile
from tests.integration.procs import (
    LOOPBACK,
    REPO_ROOT,
    SidecarProcess,
    async_start_sidecar,
    free_port,
)
from tests.support import child_env
from wire.identity import BoundRequest, new_nonce, sign_identity

MESH_KEY = "integration-test-mesh-key-0123456789abcdef"
UPSTREAM = "svc"  # the callers' name for the app's inbound sidecar


def signed_identity(caller: str, url: str, method: str = "GET", host: str | None = None,
                    key: str = MESH_KEY) -> str:
    """A fresh ``X-GT-Identity`` of ``caller`` for one request to ``url`` (``host``: the
    ``Host`` it is sent with; default: the URL's own, as aiohttp sends it)."""
    parsed = URL(url)
    authority = host or (f"{parsed.host}:{parsed.port}" if parsed.port != 80 else
                         str(parsed.host))
    return sign_identity(caller, key.encode(), time.time(),
                         BoundRequest(method, authority, parsed.raw_path_qs),
                         new_nonce(os.urandom(12)))


async def shots_of(*loads: Awaitable[list[Shot]]) -> list[Shot]:
    """Run open loops (:func:`equilibrium.lab.bench.policing.open_loop`) side by side; every
    shot."""
    return [shot for shots in await asyncio.gather(*loads) for shot in shots]


def p99(shots: list[Shot]) -> float:
    return percentile([s.latency for s in shots], 99)


def success_ratio(shots: list[Shot]) -> float:
    return sum(s.ok for s in shots) / max(1, len(shots))


def write_config(path: Path, policing: Mapping[str, Any]) -> Path:
    path.write_text(json.dumps({"policing": policing}))
    return path


@dataclass
class Mesh:
    """An inbound sidecar in front of ``app`` and one outbound sidecar per caller."""

    inbound_port: int
    server: SidecarProcess
    callers: dict[str, SidecarProcess]

    @property
    def inbound_url(self) -> str:
        return f"http://{LOOPBACK}:{self.inbound_port}"

    def level(self, caller: str) -> float:
        return self.server.metric("equilibrium_inbound_caller_punishment_level", caller=caller)


@contextlib.asynccontextmanager
async def mesh(
    app_url: str,
    callers: list[str],
    config: Path,
    *,
    server_key: str | None = MESH_KEY,
    caller_key: str | None = MESH_KEY,
    more_endpoints: Mapping[str, list[str]] | None = None,
) -> AsyncIterator[Mesh]:
    """Start the sidecars (in parallel) and stop them all on exit. ``more_endpoints[name]``:
    endpoints that caller's upstream lists after the app's inbound sidecar."""
    inbound_port = free_port()
    server_env = {"EQUILIBRIUM_MESH_SECRET": server_key} if server_key else {}
    caller_env = {"EQUILIBRIUM_MESH_SECRET": caller_key} if caller_key else {}
    inbound_url = f"http://{LOOPBACK}:{inbound_port}"
    starts = [
        async_start_sidecar({}, sidecar_id="app-sidecar", config_file=config, env=server_env,
                            extra_args=["--inbound", f"{LOOPBACK}:{inbound_port}",
                                        "--app", app_url]),
        *(async_start_sidecar({UPSTREAM: [inbound_url, *(more_endpoints or {}).get(name, [])]},
                              sidecar_id=name, config_file=config,
                              env=caller_env, extra_args=["--max-attempts", "1"])
          for name in callers),
    ]
    results = await asyncio.gather(*starts, return_exceptions=True)
    procs = [r for r in results if isinstance(r, SidecarProcess)]
    try:
        for r in results:
            if isinstance(r, BaseException):
                raise r
        server, *caller_procs = procs
        yield Mesh(inbound_port, server, dict(zip(callers, caller_procs, strict=True)))
    finally:
        await asyncio.gather(*(asyncio.to_thread(p.stop, 5.0) for p in procs))
        for p in procs:
            p.cleanup()


# ---------------------------------------------------------------- helper processes


@dataclass
class AppProcess:
    """The capacity-limited app in its own process (``inbound_loads app``)."""

    proc: asyncio.subprocess.Process
    url: str

    @classmethod
    async def start(cls, servers: int, service: float) -> AppProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.integration.inbound_loads", "app", str(servers),
            str(service), stdout=asyncio.subprocess.PIPE, cwd=str(REPO_ROOT), env=child_env())
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(20):
                line = (await proc.stdout.readline()).decode()
        except TimeoutError:
            proc.kill()
            raise
        if not line.startswith("PORT "):
            proc.kill()
            raise RuntimeError(f"app process did not start: {line!r}")
        return cls(proc, f"http://{LOOPBACK}:{int(line.split()[1])}")

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(5):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
