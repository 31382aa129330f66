"""equilibrium.lab.signaling_plane: which signaling the demo runs (embedded, external, by the
sidecars, or none with a warning) and the flags it refuses, with no secret in a message."""

from __future__ import annotations


def test_signaling_mode_falls_back_without_any_redis_server_and_checks_its_flags() -> None:
    from equilibrium.lab.embedded_redis import RedisUnavailable
    from equilibrium.lab.signaling_plane import SignalingUnavailable, resolve_signaling

    def no_binary() -> None:
        raise RedisUnavailable("no redis-server binary")

    fallback = resolve_signaling(no_signaler=False, redis_url=None, environ={},
                                 find_server=no_binary)
    assert fallback.mode == "off" and fallback.mesh_key is None
    assert fallback.warning and "WITHOUT the signaler" in fallback.warning

    first = resolve_signaling(no_signaler=False, redis_url=None, environ={})
    second = resolve_signaling(no_signaler=False, redis_url=None, environ={})
    assert first.mode == "embedded" and first.warning is None
    assert first.mesh_key and len(first.mesh_key) == 64 and first.mesh_key != second.mesh_key
    assert first.mesh_key not in repr(first)

    key = "0123456789abcdef" * 2
    external = resolve_signaling(no_signaler=False, redis_url="redis://:pw-42@127.0.0.1:6379/0",
                                 environ={"EQUILIBRIUM_MESH_SECRET": key})
    assert (external.mode, external.mesh_key) == ("external", key)
    assert "pw-42" not in repr(external) and key not in repr(external)
    short_key = {"EQUILIBRIUM_MESH_SECRET": "short"}
    for no_signaler, url, environ, message in [
        (True, "redis://127.0.0.1:6379/0", {}, "contradict"),
        (False, "http://127.0.0.1:6379", {}, "redis://"),
        (False, "http://:pw-42@127.0.0.1:6379", {}, "got http"),
        (False, "redis://127.0.0.1:6379/0", {}, "EQUILIBRIUM_MESH_SECRET"),
        (False, "redis://127.0.0.1:6379/0", short_key, "at least"),
    ]:
        try:
            resolve_signaling(no_signaler=no_signaler, redis_url=url, environ=environ)
        except SignalingUnavailable as exc:
            assert message in str(exc) and "pw-42" not in str(exc)
        else:
            raise AssertionError(f"{no_signaler=} {url=} {environ=} was accepted")
    assert resolve_signaling(no_signaler=True, redis_url=None, environ={}).mode == "off"
    # sidecars wired to a plane that runs elsewhere (compose.yaml): the demo starts none
    wired = ["--redis", "redis://redis:6379/0", "--mesh-secret-file", "/run/mesh.key"]
    assert resolve_signaling(no_signaler=False, redis_url=None, environ={},
                             sidecar_args=wired, find_server=no_binary).mode == "sidecars"
    try:
        resolve_signaling(no_signaler=False, redis_url="redis://127.0.0.1:6379/0",
                          environ={"EQUILIBRIUM_MESH_SECRET": key}, sidecar_args=wired)
    except SignalingUnavailable as exc:
        assert "not both" in str(exc)
    else:
        raise AssertionError("--redis together with --sidecar-arg=--redis was accepted")
