"""A local signaling plane for the demo and the benchmarks: Redis, a signaler, a mesh key.

Owns starting (and always stopping) what sidecars need to coordinate through the signaler on
one machine: an :class:`~equilibrium.embedded_redis.EmbeddedRedis` (or a Redis the user gives),
one ``equilibrium signaler`` process, and a fresh random mesh key written to a 0600 file that
the signaler and every sidecar read (``--mesh-secret-file``), so no key is ever fixed in code
or passed on a command line. Usage::

    plane = SignalingPlane(workdir, epoch=1.0, tokens=16)
    await plane.start()                  # Redis up, signaler ready
    sidecar_flags = plane.sidecar_args() # --redis URL --mesh-secret-file F --signaling-epoch E
    ...
    await plane.stop()
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import aiohttp

from equilibrium.embedded_redis import EmbeddedRedis
from equilibrium.processes import ChildProcess, free_port, wait_http_ok

SIGNALER_READY_TIMEOUT = 90.0
"""Seconds to wait for the signaler's ``/readyz``: importing cvxpy alone takes seconds on a
loaded machine."""


class SignalingPlane:
    """Redis (embedded unless ``redis_url`` is given) and one signaler, with a random key."""

    def __init__(
        self,
        workdir: Path,
        *,
        epoch: float = 1.0,
        tokens: int = 16,
        redis_url: str | None = None,
        signer: str = "local",
    ) -> None:
        self.workdir = workdir
        self.epoch = epoch
        self.tokens = tokens
        self.signer = signer
        self._embedded = None if redis_url else EmbeddedRedis(password=secrets.token_urlsafe(18))
        self._url = redis_url
        self.key_file = workdir / "mesh.key"
        self.signaler: ChildProcess | None = None
        self.admin = f"127.0.0.1:{free_port()}"

    @property
    def redis_url(self) -> str:
        if self._embedded is not None:
            return self._embedded.url
        assert self._url is not None
        return self._url

    async def start(self) -> None:
        """Write the key, start Redis and the signaler, wait until the signaler is ready."""
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.start)
        argv = [sys.executable, "-m", "equilibrium", "signaler", "--redis", self.redis_url,
                "--epoch", repr(self.epoch), "--tokens", str(self.tokens), "--id", self.signer,
                "--admin", self.admin, "--mesh-secret-file", str(self.key_file)]
        self.signaler = await ChildProcess.start(
            "signaler", argv, stdout_pipe=False,
            stderr_path=str(self.workdir / "signaler.log"))
        try:
            await wait_http_ok(f"http://{self.admin}/readyz", SIGNALER_READY_TIMEOUT,
                               self.signaler)
        except BaseException:
            await self.stop()
            raise

    def sidecar_args(self) -> list[str]:
        """The flags that make a sidecar join this plane."""
        return ["--redis", self.redis_url, "--mesh-secret-file", str(self.key_file),
                "--signaling-epoch", repr(self.epoch)]

    async def state(self, upstream: str) -> dict[str, Any]:
        """The signaler's ``/debug/state`` section for ``upstream`` (models, plan), or {}."""
        try:
            timeout = aiohttp.ClientTimeout(total=5)
            async with (aiohttp.ClientSession(timeout=timeout) as session,
                        session.get(f"http://{self.admin}/debug/state") as resp):
                body = await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return {}
        return dict((body.get("upstreams") or {}).get(upstream) or {})

    async def stop(self) -> None:
        """Stop the signaler, then Redis; remove the key file. Safe to call twice."""
        if self.signaler is not None:
            await self.signaler.stop()
            self.signaler = None
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.close)
        self.key_file.unlink(missing_ok=True)
