"""A local signaling plane — Redis, one ``equilibrium signaler``, a mesh key — for the demo and
the benchmarks.

Owns starting (and always stopping) what sidecars need to coordinate through the signaler on
one machine, the one way both ``equilibrium demo`` (its ``SignalingPhase``) and
``equilibrium bench --scenario herding`` do it:

- a mesh key: the caller's (the one in ``EQUILIBRIUM_MESH_SECRET`` when the user gave a Redis
  of their own) or a fresh random one;
- an :class:`~equilibrium.lab.embedded_redis.EmbeddedRedis` on loopback with a random password,
  unless the caller gives a Redis URL;
- ``python -m equilibrium signaler --epoch E --admin 127.0.0.1:PORT --tokens N --id ID
  [--upstream NAME ...]``, waited for on its ``/readyz``.

Secrets travel only in the environment of the signaler and of the sidecars (:meth:`sidecar_env`),
never on a command line (where ``ps`` shows them to every user) nor in a file: the mesh key as
``EQUILIBRIUM_MESH_SECRET`` and the Redis URL, which carries the password, as
``EQUILIBRIUM_REDIS_URL``, which both programs read exactly as ``--redis URL`` and a key file
(the signaler in ``signaler/cli.py``; the sidecar's URL in ``sidecar/config.py``, its key in
``sidecar/policing.py``). :meth:`sidecar_args` holds only what is not secret. Usage::

    plane = SignalingPlane(logs, epoch=1.0, tokens=16)
    await plane.start()                  # Redis up, signaler ready
    sidecars = await start_sidecars(..., extra=plane.sidecar_args(), env=plane.sidecar_env())
    state = await plane.state("demo")    # the signaler's models and plan for one upstream
    await plane.stop()                   # signaler, then Redis; safe to call twice

It only wires processes: the correlated-equilibrium LP is :mod:`signaler`'s, regret matching
is :mod:`mesh`'s.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from equilibrium.lab.embedded_redis import EmbeddedRedis
from equilibrium.lab.processes import ChildProcess, child_environment, free_port, wait_http_ok

MESH_KEY_ENV = "EQUILIBRIUM_MESH_SECRET"
REDIS_URL_ENV = "EQUILIBRIUM_REDIS_URL"
SIGNALER_READY_TIMEOUT = 90.0
"""Seconds to wait for the signaler's ``/readyz``: importing cvxpy alone takes several seconds
on a loaded machine, and it is ready only after its first epoch."""


class SignalingPlane:
    """Redis (embedded unless ``redis_url`` is given), one signaler, and the mesh key.

    ``logs`` is the folder of the signaler's ``signaler.log``; ``signer`` its ``--id``;
    ``upstreams`` the upstreams it serves (empty: every one it discovers); ``nice`` lowers the
    signaler's CPU priority (a benchmark on a small machine: in a cluster the control plane does
    not share the data path's cores).
    """

    def __init__(
        self,
        logs: Path,
        *,
        epoch: float = 1.0,
        tokens: int = 16,
        redis_url: str | None = None,
        mesh_key: str | None = None,
        signer: str = "local",
        upstreams: Sequence[str] = (),
        nice: int = 0,
    ) -> None:
        self.log = logs / "signaler.log"
        self.nice = nice
        self.epoch = epoch
        self.tokens = tokens
        self.signer = signer
        self.upstreams = tuple(upstreams)
        self._mesh_key = mesh_key or secrets.token_hex(32)
        self._embedded = None if redis_url else EmbeddedRedis(password=secrets.token_urlsafe(18))
        self._url = redis_url
        self.admin = f"127.0.0.1:{free_port()}"
        self.signaler: ChildProcess | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def embedded(self) -> bool:
        """True when the plane runs a Redis of its own."""
        return self._embedded is not None

    @property
    def redis_url(self) -> str:
        """The Redis URL, password included: hand it to children only via :meth:`sidecar_env`."""
        if self._embedded is not None:
            return self._embedded.url
        assert self._url is not None
        return self._url

    def signaler_argv(self) -> list[str]:
        """The signaler's command line (no secret on it)."""
        argv = [sys.executable, "-m", "equilibrium", "signaler", "--epoch", repr(float(self.epoch)),
                "--admin", self.admin, "--tokens", str(self.tokens), "--id", self.signer]
        for upstream in self.upstreams:
            argv += ["--upstream", upstream]
        return argv

    async def start(self) -> None:
        """Start Redis (if embedded) and the signaler; return once the signaler is ready.

        On failure everything started is stopped again; a signaler that does not come up raises
        RuntimeError with the last lines of its log, a Redis that does not
        :class:`~equilibrium.lab.embedded_redis.RedisUnavailable`.
        """
        if self.signaler is not None:
            raise RuntimeError("the signaling plane is already started")
        try:
            if self._embedded is not None:
                # From the caller's thread, not a worker's: under asyncio.run that is the main
                # thread, so the server dies even with a kill -9'd parent (pdeathsig).
                self._embedded.start()
            self.signaler = await ChildProcess.start(
                "signaler", self.signaler_argv(), stdout_pipe=False, stderr_path=str(self.log),
                env={**child_environment(), **self.sidecar_env()})
            if self.nice:
                os.setpriority(os.PRIO_PROCESS, self.signaler.pid, self.nice)
            try:
                await wait_http_ok(f"http://{self.admin}/readyz", SIGNALER_READY_TIMEOUT,
                                   self.signaler)
            except RuntimeError as exc:
                raise RuntimeError(f"the signaler did not start: {exc}{self._log_tail()}") from None
        except BaseException:
            await self.stop()
            raise

    def sidecar_args(self) -> list[str]:
        """The flags that make a sidecar join this plane (nothing secret)."""
        return ["--signaling-epoch", repr(float(self.epoch))]

    def sidecar_env(self) -> dict[str, str]:
        """The environment variables that make a child join this plane: the secrets."""
        return {MESH_KEY_ENV: self._mesh_key, REDIS_URL_ENV: self.redis_url}

    async def debug_state(self, timeout: float = 5.0) -> dict[str, Any]:
        """The signaler's whole ``/debug/state``, or {} when it does not answer in time."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.get(f"http://{self.admin}/debug/state",
                                         timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                body = await resp.json() if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return {}
        return body if isinstance(body, dict) else {}

    async def state(self, upstream: str, timeout: float = 5.0) -> dict[str, Any]:
        """The ``/debug/state`` section of ``upstream`` (models, plan, regret gap), or {}."""
        body = await self.debug_state(timeout)
        return dict((body.get("upstreams") or {}).get(upstream) or {})

    async def stop(self) -> None:
        """Stop the signaler, then Redis (after every client of it). Safe to call twice.

        Redis is closed even when stopping the signaler fails or is cancelled (a Ctrl-C while
        the demo shuts down), so no server outlives the plane.
        """
        try:
            if self._session is not None:
                session, self._session = self._session, None
                await session.close()
            if self.signaler is not None:
                await self.signaler.stop()
                self.signaler = None
        finally:
            if self._embedded is not None:
                self._embedded.close()

    def _log_tail(self, lines: int = 3) -> str:
        try:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return ""
        return "".join(f"\n  {line}" for line in tail)
