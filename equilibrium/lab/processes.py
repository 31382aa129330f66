"""Child processes of the demo and the benchmark: start them, wait for them, always reap them.

Owns the lifecycle rules every local run follows:

- each child gets its own process group (``start_new_session``), so a Ctrl-C in the terminal
  reaches only the parent, which then stops the children in a known order;
- on Linux each child also receives SIGTERM if the parent dies without cleaning up
  (``PR_SET_PDEATHSIG``), so a ``kill -9`` of the demo leaves no orphans behind;
- :meth:`ChildProcess.stop` sends SIGTERM to the whole group, waits, then SIGKILLs it.

It also picks free loopback ports and polls HTTP readiness. It must not know what the
children are (fleet, sidecar, load generator): that belongs to their own modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import aiohttp

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """preexec hook: ask Linux to SIGTERM this child when its parent exits."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind port 0, read it back, release it).

    Never the same port twice in one process: the kernel may hand a just-released port out
    again at once, and two calls in a row (a sidecar's outbound and admin ports) would then
    collide."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def child_environment() -> dict[str, str]:
    """This process's environment, with the code's root first on PYTHONPATH.

    Children run ``python -m equilibrium...``; they must import the same code as the parent
    even when it is not installed (run from a checkout or from another folder).
    """
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    env["PYTHONPATH"] = os.pathsep.join([root, *paths])
    return env


class ChildProcess:
    """One child process in its own process group, with its stdout available as lines."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc

    @classmethod
    async def start(
        cls,
        name: str,
        argv: Sequence[str],
        *,
        stdout_pipe: bool = True,
        stderr_path: str | None = None,
        env: dict[str, str] | None = None,
    ) -> ChildProcess:
        """Start ``argv``; stdout is a pipe (or discarded), stderr goes to a file or nowhere."""
        if env is None:
            env = child_environment()
        stderr = open(stderr_path, "ab") if stderr_path else None  # noqa: SIM115
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE if stdout_pipe else asyncio.subprocess.DEVNULL,
                stderr=stderr if stderr is not None else asyncio.subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                env=env,
                limit=1 << 20,
            )
        finally:
            if stderr is not None:
                stderr.close()
        return cls(name, proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    async def readline(self) -> bytes:
        """The next line of stdout (``b""`` at end of file)."""
        assert self.proc.stdout is not None
        return await self.proc.stdout.readline()

    async def write_line(self, text: str) -> None:
        """Send one line to the child's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        await self.proc.stdin.drain()

    async def stop(self, grace: float = 5.0) -> int:
        """SIGTERM the child's process group, wait up to ``grace`` s, then SIGKILL it. Reaps."""
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        if self.proc.returncode is None:
            self._signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                self._signal_group(signal.SIGKILL)
                await self.proc.wait()
        else:
            # The leader is gone; make sure nothing it spawned lingers in its group.
            self._signal_group(signal.SIGKILL)
        return int(self.proc.returncode or 0)

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return float("nan")
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def cpu_pressure_now() -> float | None:
    """The machine's CPU pressure now: the share of the last 10 s in which some runnable task
    waited for a CPU (``/proc/pressure/cpu``, ``some avg10``, in %), or None without PSI."""
    try:
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some"):
                return float(dict(f.split("=") for f in line.split()[1:])["avg10"])
    except (OSError, KeyError, ValueError):
        pass
    return None


def cpu_pressure_stall() -> float:
    """Seconds (since boot) during which some runnable task waited for a CPU (Linux PSI).

    The difference over a run divided by its length is the share of time the machine's CPUs
    were oversubscribed: the best single number for "was this run disturbed". NaN where
    /proc/pressure/cpu does not exist.
    """
    try:
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some"):
                total = dict(f.split("=") for f in line.split()[1:])["total"]
                return int(total) / 1e6
    except (OSError, KeyError, ValueError):
        pass
    return float("nan")


async def stop_all(children: Sequence[ChildProcess], grace: float = 5.0) -> None:
    """Stop every child (in parallel), swallowing nothing but errors of already-dead ones."""
    await asyncio.gather(*(c.stop(grace) for c in children), return_exceptions=True)


async def wait_http_ok(
    url: str, timeout: float, child: ChildProcess | None = None, interval: float = 0.05
) -> None:
    """Poll ``url`` until it answers 200; raise RuntimeError on timeout or if ``child`` died."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_error = "no answer"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
        while loop.time() < deadline:
            if child is not None and not child.running:
                status = child.proc.returncode
                raise RuntimeError(f"{child.name} exited ({status}) before {url} was ready")
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
                    last_error = f"status {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last_error = type(exc).__name__
            await asyncio.sleep(interval)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s ({last_error})")
