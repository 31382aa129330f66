"""HTTP/2 calls to an upstream whose endpoints speak only HTTP/1.1: refused, no pod blamed.

A stranger's finding: six h2c calls to an upstream of HTTP/1.1 pods had every healthy pod
ejected ("its requests failed in a row"), their failures counted as connect errors, and the
HTTP/1.1 callers of the same sidecar were routed by the last resort with skewed weights. An
endpoint that answers the HTTP/2 preface in HTTP/1.1 does not speak h2c: the call gets the
sidecar's own error (gRPC UNAVAILABLE, `upstream-protocol-error`), no endpoint is charged,
and the HTTP/1.1 callers go on as before.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.integration.procs import backends, start_sidecar
from tests.integration.test_grpc_outbound import RawH2, _grpc_frame

pytestmark = pytest.mark.http2  # run again on the other engine by make test


async def test_h2c_calls_to_http1_pods_are_refused_and_eject_no_pod() -> None:
    async with backends(3, prefix="plain") as pods:
        sidecar = await asyncio.to_thread(start_sidecar, {"svc": [p.url for p in pods]})
        try:
            def call() -> int | None:
                client = RawH2(sidecar.outbound_port)
                try:
                    stream_id = client.start_call("Echo")
                    client.send_all(stream_id, _grpc_frame(b"ping"))
                    client.pump(lambda: client.ended(stream_id), timeout=10.0)
                    return client.status(stream_id)
                finally:
                    client.sock.close()

            for _ in range(6):
                assert await asyncio.to_thread(call) == 14  # UNAVAILABLE, the sidecar's own
            await asyncio.sleep(1.0)  # a tick or two: an ejection would show by now
            endpoints = sidecar.state()["upstreams"]["svc"]["endpoints"]
            assert all(e["usable"] and e["failures"] == 0 for e in endpoints), endpoints
            assert sidecar.metric("equilibrium_errors_total", upstream="svc",
                                  reason="upstream-protocol-error") == 6
            assert sidecar.metric("equilibrium_requests_total", upstream="svc",
                                  code="connect-error") == 0
            # (the preface is no request; the sidecar's own probes apart)
            assert all(p.app_hits == 0 for p in pods)
            async with aiohttp.ClientSession() as client:
                for _ in range(6):  # the HTTP/1.1 callers are served as before
                    async with client.get(sidecar.outbound_url + "/",
                                          headers={"Host": "svc"}) as resp:
                        assert resp.status == 200
            assert "Traceback" not in sidecar.output()
        finally:
            await asyncio.to_thread(sidecar.stop, 5.0)
            sidecar.cleanup()
