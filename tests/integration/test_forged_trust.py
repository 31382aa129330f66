"""Identities bound to their request, sent only into the mesh; answers believed only when
signed (issue 14, findings 4 and 5), replayed against real sidecar processes.

The attacks as they were found: a plain app outside the mesh received the caller's signed
identity (with its bid and regret) and replayed it 60 times as ``DELETE /admin/delete`` to a
meshed service, all trusted as that caller; and a plain upstream answering
``X-GT-Reputation: phase=punished;retry=300`` made the caller refuse the whole service.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from tests.integration.inbound_support import MESH_KEY
from tests.integration.procs import (
    LOOPBACK,
    Backend,
    SidecarProcess,
    async_start_sidecar,
    free_port,
    start_backend,
)
from tests.support import metric_value

pytestmark = pytest.mark.asyncio(loop_scope="module")

FORGED = {"X-GT-Reputation": "v=1;score=0;level=3;phase=punished;retry=300",
          "X-GT-Price": "5", "X-GT-Congestion": "v=1;level=1"}


@dataclass
class Rig:
    plain: Backend  # a server outside the mesh (no key)
    app: Backend
    inbound: SidecarProcess
    caller: SidecarProcess
    inbound_url: str


async def plain_answer(request: web.Request) -> web.Response:
    return web.Response(text="plain", headers=FORGED)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def rig(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    plain = await start_backend("plain", handler=plain_answer)
    app = await start_backend("app")
    port = free_port()
    inbound_url = f"http://{LOOPBACK}:{port}"
    config = Path(tmp_path_factory.mktemp("trust")) / "caller.yaml"
    config.write_text(json.dumps({"upstreams": {
        "plain": {"endpoints": [plain.url], "mesh": False},  # declared outside the mesh
        "leaky": [plain.url],  # wrongly declared in it: the leak, to capture an identity
        "svc": [inbound_url],
    }}))
    env = {"EQUILIBRIUM_MESH_SECRET": MESH_KEY}
    procs = await asyncio.gather(
        async_start_sidecar({}, sidecar_id="app-sidecar", env=env,
                            extra_args=["--inbound", f"{LOOPBACK}:{port}", "--app", app.url]),
        async_start_sidecar(None, sidecar_id="victim", config_file=config, env=env,
                            extra_args=["--max-attempts", "1"]),
    )
    try:
        yield Rig(plain, app, procs[0], procs[1], inbound_url)
    finally:
        await asyncio.gather(*(asyncio.to_thread(p.stop, 5.0) for p in procs))
        for p in procs:
            p.cleanup()
        await app.stop()
        await plain.stop()


def last_request(backend: Backend, path: str) -> web.Request:
    """The last request for ``path`` the backend saw: the caller's probes of the ``leaky``
    upstream reach the same backend at any moment, and the last request may be one."""
    return next(r for r in reversed(backend.seen) if r.path == path)


async def test_a_non_mesh_upstream_gets_no_identity_and_its_punishment_changes_nothing(
        rig: Rig) -> None:
    async with aiohttp.ClientSession() as client:
        for _ in range(3):
            async with client.get(rig.caller.outbound_url + "/x", headers={
                    "Host": "plain", "X-Equilibrium-Bid": "4"}) as resp:
                assert resp.status == 200, await resp.text()
                assert "X-Equilibrium-Price" not in resp.headers  # its price not believed
    seen = last_request(rig.plain, "/x").headers
    game = sorted(n.lower() for n in seen if n.lower().startswith("x-gt-"))
    assert game == ["x-gt-challenge"]  # no identity, no bid, no regret
    text = rig.caller.metrics_text()
    assert metric_value(text, "equilibrium_caller_punished", upstream="plain") == 0
    assert metric_value(text, "equilibrium_caller_backoff_total", upstream="plain") == 0
    assert metric_value(text, "equilibrium_caller_bad_signals_total", header="x-gt-signals",
                        reason="unsigned") >= 3


async def test_a_captured_identity_replayed_as_delete_admin_is_not_trusted(rig: Rig) -> None:
    async with aiohttp.ClientSession() as client:
        async with client.get(rig.caller.outbound_url + "/users/7",
                              headers={"Host": "leaky"}) as resp:
            assert resp.status == 200
        captured = last_request(rig.plain, "/users/7").headers["X-GT-Identity"]
        assert captured.startswith("v=2;id=victim;")
        bad_before = rig.inbound.metric("equilibrium_inbound_identity_total",
                                        result="bad-signature")
        statuses = []
        for _ in range(60):
            async with client.delete(rig.inbound_url + "/admin/delete", headers={
                    "Host": "leaky", "X-GT-Identity": captured}) as resp:
                await resp.read()
                statuses.append(resp.status)
        # the same request again: once it is (the documented limit), then it is a replay
        for _ in range(2):
            async with client.get(rig.inbound_url + "/users/7", headers={
                    "Host": "leaky", "X-GT-Identity": captured}) as resp:
                await resp.read()
    assert len(statuses) == 60
    text = rig.inbound.metrics_text()
    assert metric_value(text, "equilibrium_inbound_identity_total",
                        result="bad-signature") == bad_before + 60
    assert metric_value(text, "equilibrium_inbound_identity_total", result="replayed") == 1
    # the DELETEs were policed as anonymous, never as the victim
    assert metric_value(text, "equilibrium_inbound_requests_total", caller="victim") <= 1
    assert metric_value(text, "equilibrium_inbound_caller_punishment_level",
                        caller="victim") == 0
    assert "Traceback" not in rig.inbound.output()


async def test_a_real_inbound_sidecars_signed_signals_are_believed(rig: Rig) -> None:
    before = rig.caller.metric("equilibrium_caller_bad_signals_total", header="x-gt-signals")
    async with aiohttp.ClientSession() as client, client.post(
            rig.caller.outbound_url + "/orders", data=b"{}",
            headers={"Host": "svc", "X-Equilibrium-Bid": "2"}) as resp:
        assert resp.status == 200
        assert resp.headers["X-Equilibrium-Price"] == "0"  # a signed price: believed
    request = rig.app.seen[-1]
    assert request.method == "POST" and request.path == "/orders"
    assert rig.caller.metric("equilibrium_caller_bad_signals_total",
                             header="x-gt-signals") == before
    assert rig.inbound.metric("equilibrium_inbound_requests_total", caller="victim",
                              outcome="admitted") >= 1
