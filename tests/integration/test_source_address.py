"""``--source-address``: a real sidecar's connections to its endpoints leave from the address
it was given, over HTTP/1.1 and over h2c (a gRPC call), as the endpoint sees its peer; without
the flag the kernel picks (127.0.0.1 on loopback)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import aiohttp
import grpc
import pytest

from tests.integration.procs import LOOPBACK, async_start_sidecar, start_backend, start_sidecar

SERVICE = "test.Peer"
SOURCE = "127.0.0.29"


async def test_http1_requests_leave_from_the_source_address() -> None:
    backend = await start_backend("pod")
    try:
        for extra, expected in ((["--source-address", SOURCE], SOURCE), ([], LOOPBACK)):
            sidecar = await async_start_sidecar({"svc": [backend.url]}, extra_args=extra)
            try:
                async with aiohttp.ClientSession() as client, client.get(
                        f"{sidecar.outbound_url}/who", headers={"Host": "svc"}) as reply:
                    assert reply.status == 200, await reply.text()
                assert backend.seen[-1].remote == expected
            finally:
                sidecar.stop()
                sidecar.cleanup()
    finally:
        await backend.stop()


def _peer(request: bytes, context: grpc.ServicerContext) -> bytes:
    return context.peer().encode()  # "ipv4:127.0.0.29:PORT"


@pytest.fixture
def grpc_app() -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Peer": grpc.unary_unary_rpc_method_handler(_peer)}),))
    port = server.add_insecure_port(f"{LOOPBACK}:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(0).wait(5)


def test_h2c_calls_leave_from_the_source_address(grpc_app: int) -> None:
    sidecar = start_sidecar({"svc": [f"http://{LOOPBACK}:{grpc_app}"]},
                            extra_args=["--source-address", SOURCE])
    try:
        with grpc.insecure_channel(f"{LOOPBACK}:{sidecar.outbound_port}",
                                   options=[("grpc.default_authority", "svc")]) as channel:
            peer = channel.unary_unary(f"/{SERVICE}/Peer")(b"", timeout=10)
        assert peer.decode().startswith(f"ipv4:{SOURCE}:"), peer
    finally:
        assert sidecar.stop() == 0, sidecar.output()
        sidecar.cleanup()
