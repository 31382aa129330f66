"""Real Redis for the tests: a testcontainers container when Docker can run one, else a binary.

A pytest plugin (``tests/conftest.py`` loads it with ``pytest_plugins``). It owns the fixtures

* ``redis_server`` — a fresh server per test (function scope), safe to stop/kill/restart;
* ``redis_server_session`` — one server shared by the whole session (use distinct keys, never
  stop it);
* ``redis_server_factory`` — ``make(kind=None, password=..., username=None)`` for tests that
  need several servers, a given kind, or an ACL user; everything made is closed at teardown.

Each yields a :class:`RedisHandle`: ``.url`` (``redis://[user]:password@127.0.0.1:PORT/0``),
``.password``, ``.username``, ``.host``, ``.port``, ``.kind`` (``"testcontainers"`` or
``"local-binary"``), ``.client()``, ``.stop(graceful=True)``, ``.kill()``, ``.start()`` and
``.restart()``. The host port is chosen free before the first start and kept: after a stop and a
start (container or process) the same URL works again, with an empty dataset.

Choosing the kind: ``testcontainers`` when a Docker engine answers on ``$DOCKER_HOST`` (default
``unix:///run/docker.sock``) and the local image ``equilibrium-redis:local`` exists (built by
``scripts/ci/build-redis-image.sh``); otherwise ``local-binary`` (:class:`RedisProcess`).
``EQUILIBRIUM_REDIS_KIND`` forces one kind. ``EQUILIBRIUM_REQUIRE_DOCKER=1`` (set by CI) makes
the fixtures fail, not skip and not fall back, when the engine or the image is missing. A
missing image is never pulled: it is looked up with the Docker SDK first and reported.
"""

from __future__ import annotations

import abc
import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import pytest
import redis

from equilibrium.lab.embedded_redis import RedisNotReady, wait_for_ping
from equilibrium.lab.processes import free_port
from tests.environment import DOCKER, required
from tests.redis_process import RedisProcess

IMAGE = os.environ.get("EQUILIBRIUM_REDIS_IMAGE", "equilibrium-redis:local")
TESTCONTAINERS = "testcontainers"
LOCAL_BINARY = "local-binary"
KINDS = (TESTCONTAINERS, LOCAL_BINARY)
_LOOPBACK = "127.0.0.1"
_CONTAINER_PORT = 6379


def docker_required() -> bool:
    """True when CI demands the testcontainers path (``EQUILIBRIUM_REQUIRE_DOCKER=1``)."""
    return required(DOCKER)


def _configure_testcontainers() -> None:
    """The settings testcontainers needs on these machines (see shared INFRA notes).

    Ryuk would be pulled, so it is disabled; ``/.dockerenv`` exists on the VMs, so the connection
    mode is pinned to ``docker_host``; the host is pinned to 127.0.0.1. Environment values a
    user set win. testcontainers reads some of these at import, so its config object is also
    updated in case it was imported before.
    """
    os.environ.setdefault("DOCKER_HOST", "unix:///run/docker.sock")
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
    os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")
    os.environ.setdefault("TC_HOST", _LOOPBACK)
    from testcontainers.core.config import ConnectionMode, testcontainers_config

    mode = os.environ["TESTCONTAINERS_CONNECTION_MODE"]
    if testcontainers_config.connection_mode_override is None:
        testcontainers_config.connection_mode_override = ConnectionMode(mode)
    if testcontainers_config.tc_host_override is None:
        testcontainers_config.tc_host_override = os.environ["TC_HOST"]
    if os.environ["TESTCONTAINERS_RYUK_DISABLED"].lower() == "true":
        testcontainers_config._ryuk_disabled = True


def docker_status(image: str = IMAGE) -> tuple[bool, str]:
    """(usable, reason): does a Docker engine answer and hold the local Redis ``image``?"""
    os.environ.setdefault("DOCKER_HOST", "unix:///run/docker.sock")
    try:
        import docker
        from docker.errors import DockerException, ImageNotFound
    except ImportError as exc:
        return False, f"the docker SDK is not installed ({exc})"
    try:
        client = docker.DockerClient(base_url=os.environ["DOCKER_HOST"], timeout=5)
    except DockerException as exc:
        return False, f"no Docker engine at {os.environ['DOCKER_HOST']}: {exc}"
    try:
        client.ping()
        client.images.get(image)
    except ImageNotFound:
        return False, (
            f"the local image {image} is missing (it is never pulled): "
            "run scripts/ci/build-redis-image.sh"
        )
    except (DockerException, OSError) as exc:
        return False, f"no Docker engine at {os.environ['DOCKER_HOST']}: {exc}"
    finally:
        client.close()
    return True, f"Docker engine answers and {image} exists"


def available_kinds() -> list[str]:
    """Kinds to parametrize over: local-binary always; testcontainers when usable or required."""
    kinds = [LOCAL_BINARY]
    if docker_required() or docker_status()[0]:
        kinds.insert(0, TESTCONTAINERS)
    return kinds


def choose_kind() -> str:
    """The kind the default fixtures use (see the module docstring)."""
    forced = os.environ.get("EQUILIBRIUM_REDIS_KIND")
    if forced:
        if forced not in KINDS:
            raise ValueError(f"EQUILIBRIUM_REDIS_KIND={forced!r}: expected one of {KINDS}")
        return forced
    if docker_required():
        return TESTCONTAINERS
    return TESTCONTAINERS if docker_status()[0] else LOCAL_BINARY


class RedisHandle(abc.ABC):
    """What the fixtures yield: one real Redis server, whichever kind runs it."""

    kind: str
    host: str = _LOOPBACK
    port: int
    password: str | None
    username: str | None

    @property
    def url(self) -> str:
        auth = ""
        if self.password is not None:
            user = quote(self.username or "", safe="")
            auth = f"{user}:{quote(self.password, safe='')}@"
        return f"redis://{auth}{self.host}:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        """A synchronous redis-py client (``decode_responses`` etc. via kwargs)."""
        return redis.Redis.from_url(self.url, **kwargs)

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Block until the server answers PING (bounded)."""
        try:
            wait_for_ping(self.url, timeout, interval=0.05)
        except RedisNotReady as exc:
            raise RuntimeError(f"{self.kind} Redis not ready: {exc}") from None

    @abc.abstractmethod
    def start(self) -> RedisHandle:
        """Start (or restart) the server on the same port."""

    @abc.abstractmethod
    def stop(self, *, graceful: bool = True) -> None:
        """Stop the server: SIGTERM-like when graceful, a crash otherwise."""

    def kill(self) -> None:
        """Crash the server (SIGKILL); :meth:`start` brings it back on the same port."""
        self.stop(graceful=False)

    def restart(self, *, graceful: bool = True) -> RedisHandle:
        self.stop(graceful=graceful)
        return self.start()

    @abc.abstractmethod
    def close(self) -> None:
        """Stop for good and release every resource."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind} {self.host}:{self.port}>"


class LocalRedis(RedisHandle):
    """A redis-server subprocess (:class:`~tests.redis_process.RedisProcess`)."""

    kind = LOCAL_BINARY

    def __init__(self, password: str | None, username: str | None = None) -> None:
        self.password = password
        self.username = username
        self._server = RedisProcess(password=password, username=username)
        self._server.start()
        self.port = self._server.port

    def start(self) -> LocalRedis:
        self._server.start()
        return self

    def stop(self, *, graceful: bool = True) -> None:
        self._server.stop(graceful=graceful)

    def close(self) -> None:
        self._server.close()


class ContainerRedis(RedisHandle):
    """A testcontainers ``RedisContainer`` of the local image, published on 127.0.0.1:PORT."""

    kind = TESTCONTAINERS

    def __init__(self, password: str | None, username: str | None = None) -> None:
        ok, reason = docker_status()
        if not ok:  # checked here too, so that a missing image can never reach a pull
            raise RuntimeError(f"cannot run Redis under testcontainers: {reason}")
        _configure_testcontainers()
        from testcontainers.community.redis import RedisContainer

        self.password = password
        self.username = username
        command = ["redis-server", "--protected-mode", "no", "--save", "", "--appendonly", "no"]
        if password is not None:
            command += ["--requirepass", password]
            if username:
                command += ["--user", username, "on", f">{password}", "~*", "&*", "+@all"]
        from docker.errors import APIError

        for attempt in range(3):
            self.port = free_port()
            container = RedisContainer(image=IMAGE, port=_CONTAINER_PORT, password=password)
            container.with_command(command)
            # Publish on loopback only, on a host port fixed now so that restarts keep the URL.
            container.ports[str(_CONTAINER_PORT)] = (_LOOPBACK, self.port)
            self._container = container
            try:
                container.start()  # waits for PING itself
                return
            except APIError as exc:  # the free port was taken meanwhile by someone else
                with contextlib.suppress(Exception):
                    container.stop()
                if attempt == 2 or "already" not in str(exc):
                    raise

    def _docker_container(self) -> Any:
        return self._container.get_wrapped_container()

    def start(self) -> ContainerRedis:
        wrapped = self._docker_container()
        wrapped.reload()
        if wrapped.status != "running":
            wrapped.start()
        self.wait_ready()
        return self

    def stop(self, *, graceful: bool = True) -> None:
        wrapped = self._docker_container()
        wrapped.reload()
        if wrapped.status != "running":
            return
        if graceful:
            wrapped.stop(timeout=5)
        else:
            wrapped.kill()
        wrapped.wait(timeout=10)

    def close(self) -> None:
        self._container.stop()


def make_redis(
    kind: str | None = None, *, password: str | None = None, username: str | None = None
) -> RedisHandle:
    """Start one Redis of ``kind`` (default: :func:`choose_kind`); the caller closes it."""
    kind = kind or choose_kind()
    if kind == TESTCONTAINERS:
        if docker_required():
            ok, reason = docker_status()
            if not ok:
                pytest.fail(
                    "EQUILIBRIUM_REQUIRE_DOCKER=1 but Redis cannot run under testcontainers: "
                    + reason,
                    pytrace=False,
                )
        return ContainerRedis(password, username)
    if kind == LOCAL_BINARY:
        return LocalRedis(password, username)
    raise ValueError(f"unknown Redis kind {kind!r}; expected one of {KINDS}")


def _new_password() -> str:
    return secrets.token_urlsafe(18)


@pytest.fixture
def redis_server() -> Iterator[RedisHandle]:
    """A fresh, password-protected Redis for this test only."""
    server = make_redis(password=_new_password())
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_server_session() -> Iterator[RedisHandle]:
    """One password-protected Redis for the session: use unique keys, do not stop it."""
    server = make_redis(password=_new_password())
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_server_factory() -> Iterator[Callable[..., RedisHandle]]:
    """``make(kind=None, password=<random>, username=None)``; all are closed at teardown."""
    made: list[RedisHandle] = []

    def make(
        kind: str | None = None, *, password: str | None = "", username: str | None = None
    ) -> RedisHandle:
        server = make_redis(kind, password=_new_password() if password == "" else password,
                            username=username)
        made.append(server)
        return server

    try:
        yield make
    finally:
        for server in made:
            server.close()
