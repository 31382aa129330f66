"""The outbound listener serves its own pod only (issue 14, finding 17), with real network
namespaces: a sidecar listening on ``0.0.0.0`` in a pod namespace, reached from the pod (loopback
and its own address: served) and from another namespace over a veth pair (closed, counted).

Before, injected pods listened on ``0.0.0.0:15001``/``[::]:15001`` and never checked where a
request came from: with IPv6 interception off or failed, an open proxy that signs with the pod's
identity. Needs root and iproute2 (``tests.environment``: fails in CI when missing).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.integration.netns import (
    PodSidecar,
    connect_in,
    free_port_in,
    http_in,
    namespaces,
    require_tools,
    run,
)
from tests.support import metric_value

pytestmark = pytest.mark.asyncio

POD_IP = "10.201.0.2"
OUTSIDE_IP = "10.201.0.1"


async def test_only_the_pod_itself_may_use_the_outbound_listener(tmp_path: Path) -> None:
    require_tools()
    with namespaces("eq-lpod", "eq-lout") as (pod_ns, outside_ns):
        run("ip", "-n", pod_ns, "link", "add", "eth0", "type", "veth",
            "peer", "name", "eth0", "netns", outside_ns)
        run("ip", "-n", pod_ns, "addr", "add", f"{POD_IP}/24", "dev", "eth0")
        run("ip", "-n", outside_ns, "addr", "add", f"{OUTSIDE_IP}/24", "dev", "eth0")
        for ns in (pod_ns, outside_ns):
            run("ip", "-n", ns, "link", "set", "eth0", "up")
        outbound, admin = (free_port_in(pod_ns, "127.0.0.1") for _ in range(2))
        sidecar = PodSidecar(pod_ns, ["--outbound", f"0.0.0.0:{outbound}",
                                      "--admin", f"127.0.0.1:{admin}", "--id", "pod-a",
                                      "--drain-timeout", "1"],
                             tmp_path / "sidecar.log", gid=None)
        try:
            async def ready() -> bool:
                return (await http_in(pod_ns, "127.0.0.1", admin, "/readyz")).status == 200

            await sidecar.wait_ready(ready)
            # the pod itself, on loopback and on its own address: served (no such upstream)
            for host in ("127.0.0.1", POD_IP):
                answer = await http_in(pod_ns, host, outbound, "/", host_header="nowhere")
                assert answer.status == 404 and b"unknown-upstream" in answer.body
            # from outside the pod: closed before a byte is answered
            for _ in range(3):
                reader, writer = await connect_in(outside_ns, POD_IP, outbound)
                try:
                    writer.write(b"GET / HTTP/1.1\r\nHost: nowhere\r\n\r\n")
                    async with asyncio.timeout(5):
                        assert await reader.read() == b""
                except ConnectionError:
                    pass
                finally:
                    writer.close()
            metrics = (await http_in(pod_ns, "127.0.0.1", admin, "/metrics")).body.decode()
            assert metric_value(metrics, "equilibrium_outbound_foreign_callers_total") == 3
            output = sidecar.output()
            assert output.count("refused a connection from 10.201.0.1") == 1  # once per 10 s
            assert "Traceback" not in output
        finally:
            sidecar.stop()
