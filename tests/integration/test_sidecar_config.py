"""The real ``equilibrium sidecar`` command and its configuration: it honours the environment
and the file, and exits 2 (bad settings) or 1 (a port in use) with a message.

The precedence and rejection rules themselves are checked on ``ConfigSource`` in
tests/unit/sidecar/test_config.py.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from tests.integration.procs import (
    async_start_sidecar,
    async_stop,
    free_port,
    run_equilibrium,
    start_backend,
)


async def test_bad_configuration_exits_2_with_a_message(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    # every rule is checked on ConfigSource in the unit tests; here: the process maps them to exit 2
    cases = [
        (["sidecar", "--upstream", "users=not a url", "--strategy", "balanced"], {}),
        (["sidecar", "--config", str(missing)], {"EQUILIBRIUM_UPSTREAMS": "a=http://x;;b"}),
        (["sidecar", "--kube-api", "http://127.0.0.1:1"], {}),  # a Kubernetes flag, checked too
        (["sidecar", "--redis", "redis://127.0.0.1:1/0"], {}),  # checked as the runner is built
    ]
    results = await asyncio.gather(
        *(asyncio.to_thread(run_equilibrium, *args, env=env) for args, env in cases)
    )
    for result in results:
        assert result.returncode == 2, result.stderr
        assert "bad configuration" in result.stderr
    assert "users" in results[0].stderr
    assert "cannot read" in results[1].stderr
    assert "need --discovery" in results[2].stderr
    assert "no mesh key" in results[3].stderr


async def test_the_real_command_honours_env_and_file(tmp_path: Path) -> None:
    file_backend = await start_backend("from-file")
    env_backend = await start_backend("from-env")
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        f"id: file-id\nstrategy: conservative\nupstreams:\n  svc: [{file_backend.url}]\n"
    )
    sidecar = await async_start_sidecar(
        config_file=path,
        strategy="aggressive-learning",
        env={"EQUILIBRIUM_ID": "env-id", "EQUILIBRIUM_UPSTREAMS": f"svc={env_backend.url}"},
    )
    try:
        state = sidecar.state()
        assert (state["id"], state["strategy"]) == ("env-id", "aggressive-learning")
        assert [e["endpoint"] for e in state["upstreams"]["svc"]["endpoints"]] == [env_backend.url]
    finally:
        assert await async_stop(sidecar) == 0
        await file_backend.stop()
        await env_backend.stop()


async def test_a_port_in_use_exits_1_with_a_message() -> None:
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        result = await asyncio.to_thread(
            run_equilibrium, "sidecar", "--outbound", f"127.0.0.1:{port}",
            "--admin", f"127.0.0.1:{free_port()}",
        )
    assert result.returncode == 1
    assert "cannot listen on 127.0.0.1:" in result.stderr
