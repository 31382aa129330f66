"""A redis-server subprocess with what only the tests need: an ACL user, TLS, crashes, restarts.

Owns :class:`RedisProcess`, the lab's :class:`~equilibrium.lab.embedded_redis.EmbeddedRedis`
(loopback, free port kept across starts, secrets on standard input, dies with its parent) plus:

* ``username``: an ACL user with the same password and full rights, named in :attr:`url`;
* ``tls=True``: TLS only (``rediss://``), with a throwaway CA and server certificate made by
  :func:`injector.certs.bootstrap` (the webhook's own certificate bootstrap); :attr:`ca_file`
  is named in :attr:`url` as ``ssl_ca_certs`` (redis-py reads it);
* :meth:`stop` (graceful SIGTERM, or SIGKILL as a crash), :meth:`kill`, :meth:`restart` on the
  same port, and :meth:`client`.

It runs processes and writes certificates only into the server's temporary directory.
"""

from __future__ import annotations

import datetime as dt
import signal
from pathlib import Path
from urllib.parse import quote

import redis

from equilibrium.lab.embedded_redis import (
    EmbeddedRedis,
    RedisBinary,
    config_quote,
    find_redis_server,
)
from injector.certs import bootstrap


class RedisProcess(EmbeddedRedis):
    """One redis-server child process on 127.0.0.1 that tests may crash, restart or serve TLS."""

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
        super().__init__(password=password, port=port, binary=binary,
                         startup_timeout=startup_timeout)
        self.username = username
        self.tls = tls
        self._tls_files: tuple[Path, Path, Path] | None = None

    @property
    def ca_file(self) -> str | None:
        """PEM file of the throwaway CA that signed the server certificate (TLS only)."""
        return str(self._tls_files[0]) if self._tls_files else None

    @property
    def url(self) -> str:
        query = f"?ssl_ca_certs={quote(self.ca_file)}" if self.tls and self.ca_file else ""
        return self._url("rediss" if self.tls else "redis", self.username or "", query)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.is_running() and self._proc else None

    def client(self, **kwargs: object) -> redis.Redis:
        """A synchronous redis-py client for this server."""
        return redis.Redis.from_url(self.url, **kwargs)  # type: ignore[arg-type]

    def stop(self, *, graceful: bool = True) -> None:
        """Stop the server: SIGTERM and wait (graceful) or SIGKILL (a crash). Keeps the port."""
        self._terminate(signal.SIGTERM if graceful else signal.SIGKILL)

    def kill(self) -> None:
        """Simulate a crash: SIGKILL, no shutdown work."""
        self.stop(graceful=False)

    def restart(self, *, graceful: bool = True) -> RedisProcess:
        """Stop (if running) and start again on the same port; data is not kept."""
        self.stop(graceful=graceful)
        self.start()
        return self

    def close(self) -> None:
        super().close()
        self._tls_files = None

    # ---------------------------------------------------------------- EmbeddedRedis hooks

    def _find_binary(self) -> RedisBinary:
        return find_redis_server(tls=self.tls, explicit=self._binary_hint)

    def _listen_args(self, port: int, workdir: Path) -> list[str]:
        if not self.tls:
            return super()._listen_args(port, workdir)
        if self._tls_files is None:
            self._tls_files = _write_tls_material(workdir)
        ca, cert, key = self._tls_files
        return ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
                "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                "--tls-auth-clients", "no"]

    def _secret_lines(self) -> list[str]:
        lines = super()._secret_lines()
        if self.username and self.password is not None:
            lines.append(f"user {config_quote(self.username)} on "
                         f"{config_quote('>' + self.password)} ~* &* +@all")
        return lines


def _write_tls_material(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost; returns (ca, cert, key)."""
    bundle = bootstrap("redis", "equilibrium-tests", dt.datetime.now(dt.UTC), days=2,
                       extra_names=("localhost", "127.0.0.1"))
    ca_path, cert_path, key_path = (directory / n for n in ("ca.crt", "redis.crt", "redis.key"))
    ca_path.write_bytes(bundle.ca_pem)
    cert_path.write_bytes(bundle.cert_pem)
    key_path.touch(mode=0o600)
    key_path.write_bytes(bundle.key_pem)
    return ca_path, cert_path, key_path
