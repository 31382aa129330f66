"""Parent-side handle of a real ``equilibrium sidecar`` process, for the demo and the bench.

Owns starting a sidecar on free loopback ports with the documented command line
(``--outbound``, ``--admin``, ``--upstream NAME=URL,...``, ``--policy``, ``--strategy``,
``--id``), waiting for ``/readyz``, and reading ``/debug/state``. It knows nothing about how
the sidecar routes: it drives the process exactly as a user would.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from equilibrium.lab.processes import ChildProcess, child_environment, free_port, wait_http_ok

READY_TIMEOUT = 20.0


def sidecar_argv(
    sidecar_id: str,
    outbound: str,
    admin: str,
    upstreams: Mapping[str, Sequence[str]],
    policy: str | None = None,
    strategy: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line of one sidecar (the interface fixed by the sidecar v0.1 issue)."""
    argv = [sys.executable, "-m", "equilibrium", "sidecar", "--outbound", outbound,
            "--admin", admin, "--id", sidecar_id]
    for name, urls in upstreams.items():
        argv += ["--upstream", f"{name}={','.join(urls)}"]
    if policy:
        argv += ["--policy", policy]
    if strategy:
        argv += ["--strategy", strategy]
    return argv + list(extra)


class Sidecar:
    """A running sidecar: its outbound URL (send load here with ``Host: NAME``) and admin URL."""

    def __init__(self, sidecar_id: str, child: ChildProcess, outbound: str, admin: str) -> None:
        self.id = sidecar_id
        self.child = child
        self.outbound_url = f"http://{outbound}"
        self.admin_url = f"http://{admin}"
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    async def start(
        cls,
        sidecar_id: str,
        upstreams: Mapping[str, Sequence[str]],
        policy: str | None = None,
        strategy: str | None = None,
        extra: Sequence[str] = (),
        stderr_path: str | None = None,
        attempts: int = 3,
        *,
        env: Mapping[str, str] | None = None,
    ) -> Sidecar:
        """Start one sidecar and wait until ``/readyz`` answers 200.

        Ports are picked free just before the start; if another process grabs one in between
        the sidecar exits, and the start is retried on new ports (``attempts`` times). ``env``
        is added to the sidecar's environment (secrets go there, never in ``extra``).
        """
        child_env = {**child_environment(), **env} if env else None
        last: Exception | None = None
        for _ in range(attempts):
            outbound = f"127.0.0.1:{free_port()}"
            admin = f"127.0.0.1:{free_port()}"
            argv = sidecar_argv(sidecar_id, outbound, admin, upstreams, policy, strategy, extra)
            child = await ChildProcess.start(f"sidecar {sidecar_id}", argv, stdout_pipe=False,
                                             stderr_path=stderr_path, env=child_env)
            try:
                await wait_http_ok(f"http://{admin}/readyz", READY_TIMEOUT, child)
            except RuntimeError as exc:
                last = exc
                await child.stop()
                continue
            except BaseException:
                await child.stop()
                raise
            return cls(sidecar_id, child, outbound, admin)
        raise RuntimeError(f"sidecar {sidecar_id} did not start: {last}{_tail(stderr_path)}")

    async def state(self) -> dict[str, Any] | None:
        """``/debug/state`` as JSON, or None when the sidecar does not answer in time."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0))
        try:
            async with self._session.get(self.admin_url + "/debug/state") as resp:
                if resp.status != 200:
                    return None
                body = await resp.json()
                return body if isinstance(body, dict) else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def stop(self) -> None:
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
            self._session = None
        await self.child.stop()


def _tail(path: str | None, lines: int = 3) -> str:
    """The last lines of a log file, for error messages ("" when there is nothing)."""
    if not path:
        return ""
    try:
        raw = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    text = list(dict.fromkeys(reversed(raw)))[:lines][::-1]  # last distinct lines
    return ("\n  " + "\n  ".join(text)) if text else ""


async def start_sidecars(
    ids: Sequence[str],
    upstreams: Mapping[str, Sequence[str]],
    policy: str | None = None,
    strategy: str | None = None,
    extra: Sequence[str] = (),
    stderr_path: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> list[Sidecar]:
    """Start several sidecars in parallel; if one fails, stop the others and raise.

    ``env`` is added to every sidecar's environment (see :meth:`Sidecar.start`).
    """
    results = await asyncio.gather(
        *(Sidecar.start(i, upstreams, policy, strategy, extra, stderr_path, env=env)
          for i in ids),
        return_exceptions=True,
    )
    started = [r for r in results if isinstance(r, Sidecar)]
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        await asyncio.gather(*(s.stop() for s in started), return_exceptions=True)
        raise failures[0]
    return started
