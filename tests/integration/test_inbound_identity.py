"""The inbound listener's trust boundary and HTTP correctness, with real sidecar processes.

One app (in the test's loop, so it can record what it saw), one inbound sidecar with the mesh
key in front of it, an honest caller ``coop-a`` and ``mallory``, whose sidecar claims the id
``coop-a`` but does not know the mesh key. Module-scoped, tests compare counters.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from equilibrium.cli import main as equilibrium_main
from equilibrium.lab.bench.policing import open_loop
from tests.integration.inbound_support import MESH_KEY, UPSTREAM, signed_identity, write_config
from tests.integration.procs import (
    LOOPBACK,
    Backend,
    SidecarProcess,
    async_start_sidecar,
    fetch,
    free_port,
    start_backend,
)
from tests.support import child_env, metric_value

pytestmark = pytest.mark.asyncio(loop_scope="module")

PAYLOAD = b"0123456789abcdef" * 8192  # 128 KiB


@dataclass
class Setup:
    app: Backend
    seen: list[dict[str, str]]
    inbound_url: str
    server: SidecarProcess
    coop: SidecarProcess
    mallory: SidecarProcess


async def app_handler(request: web.Request, seen: list[dict[str, str]],
                      slots: asyncio.Semaphore) -> web.StreamResponse:
    seen.append({k.lower(): v for k, v in request.headers.items()})
    if request.path == "/echo":
        body = await request.read()
        headers = {k: v for k, v in request.headers.items()}
        return web.json_response({"len": len(body), "ok": body == PAYLOAD, "headers": headers},
                                 headers={"X-GT-Price": "123", "Connection": "X-Hop",
                                          "X-Hop": "1"})
    if request.path == "/ws-auth":  # an upgrade refused: its answer must reach the caller
        return web.json_response({"error": "no token"}, status=401,
                                 headers={"WWW-Authenticate": 'Bearer realm="ws"'})
    if request.path == "/ws-moved":  # a redirect the sidecars must relay, never follow
        raise web.HTTPFound("/ws")
    if request.path == "/ws":
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"echo {msg.data}")
        return ws
    if request.path == "/stream":
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        for _ in range(8):
            await response.write(PAYLOAD[:16384])
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response
    async with slots:  # an app with capacity: 2 at once, 50 ms each
        await asyncio.sleep(0.05)
    return web.Response(text="ok")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def setup(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Setup]:
    seen: list[dict[str, str]] = []
    slots = asyncio.Semaphore(2)

    async def handler(request: web.Request) -> web.StreamResponse:
        return await app_handler(request, seen, slots)

    app = await start_backend("app", handler=handler)
    config = write_config(tmp_path_factory.mktemp("inbound") / "policing.json",
                          {"max_wait": 2, "ladder": {"base_punishment": 3, "max_punishment": 3}})
    inbound_port = free_port()
    inbound_url = f"http://{LOOPBACK}:{inbound_port}"
    procs = await asyncio.gather(
        async_start_sidecar({}, sidecar_id="app-sidecar", config_file=config,
                            env={"EQUILIBRIUM_MESH_SECRET": MESH_KEY},
                            extra_args=["--inbound", f"{LOOPBACK}:{inbound_port}",
                                        "--app", app.url]),
        async_start_sidecar({"svc": [inbound_url]}, sidecar_id="coop-a", config_file=config,
                            env={"EQUILIBRIUM_MESH_SECRET": MESH_KEY}),
        async_start_sidecar({"svc": [inbound_url]}, sidecar_id="coop-a", config_file=config,
                            env={"EQUILIBRIUM_MESH_SECRET": "not-the-mesh-key-0123456789"}),
    )
    try:
        yield Setup(app, seen, inbound_url, *procs)
    finally:
        await asyncio.gather(*(asyncio.to_thread(p.stop, 5.0) for p in procs))
        for p in procs:
            p.cleanup()
        await app.stop()


def signed(caller: str, url: str, method: str = "GET") -> str:
    return signed_identity(caller, url, method)


async def test_http_correctness_through_the_inbound_listener(setup: Setup) -> None:
    async with aiohttp.ClientSession() as client:
        reply = await fetch(
            client, "POST", setup.coop.outbound_url + "/echo", data=PAYLOAD,
            headers={"Host": "svc", "Connection": "X-Custom-Hop", "X-Custom-Hop": "drop me",
                     "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
        streamed = await fetch(client, "GET", setup.coop.outbound_url + "/stream",
                               headers={"Host": "svc"})
    assert reply.status == 200
    body = reply.json()
    assert body["ok"] and body["len"] == len(PAYLOAD)
    seen = {k.lower(): v for k, v in body["headers"].items()}
    assert "x-custom-hop" not in seen  # hop-by-hop, named in Connection
    assert seen["traceparent"].startswith("00-0af7651916cd43dd")
    assert seen["via"] == "1.1 coop-a, 1.1 app-sidecar"
    assert seen["x-forwarded-for"].count("127.0.0.1") == 2
    assert not any(k.startswith("x-gt-") for k in seen)  # identity and bid stripped
    assert "x-equilibrium-bid" not in seen
    # the app's forged X-GT-Price never passes; the caller's app gets the real price (0)
    assert "X-GT-Price" not in reply.headers and "X-Hop" not in reply.headers
    assert reply.headers["X-Equilibrium-Price"] == "0"
    assert streamed.status == 200 and streamed.body == PAYLOAD[:16384] * 8


async def test_websocket_through_both_sidecars(setup: Setup) -> None:
    async with aiohttp.ClientSession() as client, client.ws_connect(
            setup.coop.outbound_url + "/ws", headers={"Host": "svc"}) as ws:
        await ws.send_str("hello")
        reply = await ws.receive(timeout=5)
        await ws.close()
    assert reply.type == aiohttp.WSMsgType.TEXT and reply.data == "echo hello"
    handshake = next(h for h in reversed(setup.seen) if h.get("upgrade") == "websocket")
    assert not any(k.startswith("x-gt-") for k in handshake)
    assert setup.server.metric("equilibrium_inbound_requests_total", caller="coop-a",
                               outcome="admitted") >= 1


UPGRADE = {"Host": "svc", "Connection": "Upgrade", "Upgrade": "websocket",
           "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


async def test_a_refused_upgrade_reaches_the_caller_as_the_app_answered_it(setup: Setup) -> None:
    """A helper's finding: a 401 to an upgrade became a bare 502 at both sidecars, and a
    302 was followed by the sidecar itself, to wherever it pointed (a request from the pod's
    own address to any host). Both go back as the app answered, as nginx and Envoy do."""
    handshakes = sum(1 for h in setup.seen if h.get("upgrade") == "websocket")
    async with aiohttp.ClientSession() as client:
        refused = await fetch(client, "GET", setup.coop.outbound_url + "/ws-auth",
                              headers=UPGRADE)
        moved = await fetch(client, "GET", setup.coop.outbound_url + "/ws-moved",
                            headers=UPGRADE, allow_redirects=False)
    assert refused.status == 401 and refused.json() == {"error": "no token"}
    assert refused.headers["WWW-Authenticate"] == 'Bearer realm="ws"'
    assert refused.headers["Via"] == "1.1 app-sidecar, 1.1 coop-a"
    assert moved.status == 302 and moved.headers["Location"] == "/ws"
    # the app saw the two handshakes it answered, and no third one at /ws
    assert [h.get("upgrade") for h in setup.seen].count("websocket") == handshakes + 2
    assert setup.seen[-1]["host"] == "svc"


async def test_signals_on_every_response_and_unsigned_headers_ignored(setup: Setup) -> None:
    before = setup.server.metric("equilibrium_inbound_stripped_headers_total", source="untrusted")
    async with aiohttp.ClientSession() as client:
        outsider = await fetch(client, "GET", setup.inbound_url + "/x", headers={
            "X-GT-Bid": "999", "X-GT-Retry": "1", "X-GT-Whatever": "1",
            "X-GT-Identity": "v=2;id=coop-a;ts=1;n=AAAAAAAAAAAAAAAA;sig=" + "A" * 43})
        member = await fetch(client, "GET", setup.inbound_url + "/x", headers={
            "X-GT-Identity": signed("coop-b", setup.inbound_url + "/x"), "X-GT-Bid": "2"})
    for reply in (outsider, member):
        assert reply.status == 200
        assert reply.headers["X-GT-Congestion"].startswith("v=1;level=")
        assert reply.headers["X-GT-Reputation"].startswith("v=1;score=")
        assert reply.headers["X-GT-Price"] == "0"  # uncongested
    # outsiders share the suspicious anonymous bucket (it starts below full reputation)
    assert "score=0.6" in outsider.headers["X-GT-Reputation"]
    assert "score=1.000" in member.headers["X-GT-Reputation"]
    after = setup.server.metric("equilibrium_inbound_stripped_headers_total", source="untrusted")
    assert after - before == 3  # bid, retry, whatever: ignored and stripped
    assert not any(k.startswith("x-gt-") for h in setup.seen for k in h)
    assert setup.server.metric("equilibrium_inbound_identity_total", result="bad-signature") >= 1


async def test_malformed_bids_are_rejected_with_a_clear_400(setup: Setup) -> None:
    before_in = setup.server.metric("equilibrium_inbound_bad_bids_total", reason="malformed")
    async with aiohttp.ClientSession() as client:
        direct = await fetch(client, "GET", setup.inbound_url + "/x", headers={
            "X-GT-Identity": signed("coop-b", setup.inbound_url + "/x"), "X-GT-Bid": "lots"})
        from_app = await fetch(client, "GET", setup.coop.outbound_url + "/x", headers={
            "Host": "svc", "X-Equilibrium-Bid": "-3"})
    assert direct.status == 400
    assert direct.json()["reason"] == "bad-bid" and "X-GT-Bid" in direct.json()["error"]
    assert direct.json()["header"] == "X-GT-Bid"
    assert setup.server.metric("equilibrium_inbound_bad_bids_total",
                               reason="malformed") == before_in + 1
    assert from_app.status == 400 and from_app.json()["header"] == "X-Equilibrium-Bid"
    assert "negative" in from_app.json()["error"]
    assert setup.coop.metric("equilibrium_caller_bad_app_bids_total", reason="negative") == 1


async def test_a_forger_gains_nothing(setup: Setup) -> None:
    """mallory claims to be coop-a (wrong key) and floods with a huge bid: it lands in the
    anonymous bucket, is punished there, its bid is ignored, and coop-a is untouched."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        flood, honest = await asyncio.gather(
            open_loop(session, setup.mallory.outbound_url, caller="mallory", rate=100,
                      duration=3.0, host=UPSTREAM, headers={"X-Equilibrium-Bid": "900"}),
            open_loop(session, setup.coop.outbound_url, caller="coop-a", rate=5, duration=3.5,
                      host=UPSTREAM),
        )
    await asyncio.sleep(0.6)  # the gauges refresh every 0.5 s
    metrics = setup.server.metrics_text()
    assert metric_value(metrics, "equilibrium_inbound_caller_punishment_level",
                        caller="anonymous") >= 1
    assert metric_value(metrics, "equilibrium_inbound_caller_punishment_level",
                        caller="coop-a") == 0
    assert metric_value(metrics, "equilibrium_inbound_requests_total", caller="anonymous",
                        outcome="throttled") > 0
    assert metric_value(metrics, "equilibrium_inbound_price_paid_total",
                        caller="anonymous") == 0  # its bid was never honoured
    assert all(s.status == 200 for s in honest)
    assert any(s.status == 429 for s in flood)
    assert not any(k.startswith("x-gt-") for h in setup.seen for k in h)


async def test_configuration_errors_exit_2_with_a_message(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The real command line, in-process: a bad setting stops it before anything starts."""
    for name in [n for n in os.environ if n.startswith("EQUILIBRIUM_")]:
        monkeypatch.delenv(name)
    short = tmp_path / "short.key"
    short.write_text("tooshort\n")
    short.chmod(0o400)
    bad_policing = write_config(tmp_path / "bad.json", {"ladder": {"base_punishmnt": 3}})
    cases = [
        (["--inbound", "127.0.0.1:0"], "inbound and app go together"),
        (["--inbound", "127.0.0.1:0", "--app", "ftp://x"], "app: expected http://"),
        (["--mesh-secret-file", str(short)], "at least 16 are required"),
        (["--mesh-secret-file", str(tmp_path / "missing.key")], "cannot read"),
        (["--config", str(bad_policing)], "unknown key 'base_punishmnt'"),
    ]
    for args, message in cases:
        code = equilibrium_main(["sidecar", "--admin", "127.0.0.1:0", "--outbound",
                                 "127.0.0.1:0", *args])
        stderr = capsys.readouterr().err
        assert code == 2, (args, stderr)
        assert message in stderr, (args, stderr)


@pytest.mark.parametrize(("key_env", "file_text", "mode", "message"), [
    ("", None, None, "EQUILIBRIUM_MESH_SECRET is set but blank"),
    ("  ", "file-key-0123456789abcdef", 0o400, "set but blank"),
    (None, "file-key-0123456789abcdef", 0o444, "mode 0444: others have access"),
    (None, "file-key-0123456789abcdef", 0o644, "mode 0644: others have access"),
    ("a" * 16, None, None, "only 1 distinct bytes"),
    (None, "0101010101010101010101", 0o400, "only 2 distinct bytes"),
], ids=["blank", "blank-with-file", "world-readable-0444", "world-readable-0644", "16xa",
        "01-file"])
async def test_a_blank_exposed_or_placeholder_key_stops_the_sidecar_with_exit_2(
        tmp_path: Path, key_env: str | None, file_text: str | None, mode: int | None,
        message: str) -> None:
    """Issue 14, #16: each of these used to start a sidecar (unsigned, or signing with a key
    anyone could read or guess) with at most a warning."""
    args = [sys.executable, "-m", "equilibrium", "sidecar", "--admin", "127.0.0.1:0",
            "--outbound", "127.0.0.1:0", "--inbound", "127.0.0.1:0", "--app",
            "http://127.0.0.1:9"]
    if file_text is not None:
        key_file = tmp_path / "mesh.key"
        key_file.write_text(file_text)
        key_file.chmod(mode or 0o400)
        args += ["--mesh-secret-file", str(key_file)]
    env = child_env({} if key_env is None else {"EQUILIBRIUM_MESH_SECRET": key_env})
    proc = await asyncio.to_thread(subprocess.run, args, env=env, capture_output=True,
                                   text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert file_text is None or file_text not in proc.stderr + proc.stdout  # never the key


async def test_without_a_mesh_key_every_caller_is_anonymous(tmp_path: Path) -> None:
    app = await start_backend("plain")
    port = free_port()
    server = await async_start_sidecar({}, sidecar_id="keyless",
                                       extra_args=["--inbound", f"{LOOPBACK}:{port}",
                                                   "--app", app.url])
    try:
        async with aiohttp.ClientSession() as client:
            reply = await fetch(client, "GET", f"http://{LOOPBACK}:{port}/", headers={
                "X-GT-Identity": signed("coop-a", f"http://{LOOPBACK}:{port}/"),
                "X-GT-Bid": "3"})
        assert reply.status == 200
        assert "score=0.6" in reply.headers["X-GT-Reputation"]  # the anonymous bucket
        assert server.metric("equilibrium_inbound_mesh_key_configured") == 0
        assert server.metric("equilibrium_inbound_requests_total", caller="anonymous") == 1
        assert "every caller is policed as 'anonymous'" in server.output()
        assert not any(k.lower().startswith("x-gt-") for r in app.seen for k in r.headers)
    finally:
        await asyncio.to_thread(server.stop, 5.0)
        server.cleanup()
        await app.stop()

