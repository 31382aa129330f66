"""sidecar.h2_server on loopback with the ``h2`` library's own client: streams that end in
the read that opened them give everything back (their task, the connection's credit)."""

from __future__ import annotations

import asyncio

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes

from sidecar.h2_server import H2ServerConnection, ServerStream

pytestmark = pytest.mark.http2  # run again on the other engine by make test

BODY = 60000


async def test_a_request_reset_in_the_read_that_opened_it_leaks_nothing() -> None:
    # HEADERS, DATA(END_STREAM) and RST_STREAM(NO_ERROR) in one write: the stream's task is
    # cancelled before it starts. Its body's credit must still come back (it did not, and
    # 280 such requests stalled every upload on the connection), and its task must leave
    # the table (it did not, so the connection never went idle).
    served: list[int] = []

    async def handler(stream: ServerStream) -> None:
        size = 0
        while True:
            kind, payload, flow = await stream.read()
            if kind != "data":
                break
            size += len(payload)
            stream.ack(flow)
        served.append(size)
        stream.send_headers([(b":status", b"200")], end_stream=True)

    connections: list[H2ServerConnection] = []

    def factory() -> H2ServerConnection:
        connections.append(H2ServerConnection(handler))
        return connections[-1]

    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", server.sockets[0].getsockname()[1])
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                  header_encoding=None))
    client.initiate_connection()
    writer.write(client.data_to_send())

    async def pump() -> None:
        while data := await reader.read(65536):
            for event in client.receive_data(data):
                if isinstance(event, h2.events.ConnectionTerminated):
                    return
            writer.write(client.data_to_send())

    pumping = asyncio.create_task(pump())
    head = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/"),
            (b":authority", b"svc")]
    try:
        for _ in range(20):
            stream_id = client.get_next_available_stream_id()
            client.send_headers(stream_id, head)
            for sent in range(0, BODY, 15000):
                client.send_data(stream_id, b"x" * 15000, end_stream=sent + 15000 >= BODY)
            client.reset_stream(stream_id, ErrorCodes.NO_ERROR)
            writer.write(client.data_to_send())
            await asyncio.sleep(0.03)  # within the rapid-reset budget
        stream_id = client.get_next_available_stream_id()  # and one that is served
        client.send_headers(stream_id, head)
        client.send_data(stream_id, b"y" * 1000, end_stream=True)
        writer.write(client.data_to_send())
        async with asyncio.timeout(5):
            while not served or connections[0].tasks:
                await asyncio.sleep(0.02)
        [conn] = connections
        # every byte received was acknowledged (the engine sends WINDOW_UPDATE in bulk)
        assert conn.unacknowledged() == 0
        assert served == [1000]
        assert conn.idle.is_set()
    finally:
        pumping.cancel()
        writer.close()
        server.close()


async def test_a_lost_connection_arms_no_idle_timer() -> None:
    # its last stream's task ends after the connection is gone: the idle timer it would arm
    # kept the dead connection (and what it holds) for the whole idle timeout
    started = asyncio.Event()

    async def handler(stream: ServerStream) -> None:
        started.set()
        await asyncio.sleep(3600)

    connections: list[H2ServerConnection] = []

    def factory() -> H2ServerConnection:
        connections.append(H2ServerConnection(handler))
        return connections[-1]

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    _, writer = await asyncio.open_connection(
        "127.0.0.1", server.sockets[0].getsockname()[1])
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                  header_encoding=None))
    client.initiate_connection()
    client.send_headers(client.get_next_available_stream_id(),
                        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                         (b":authority", b"svc")], end_stream=True)
    writer.write(client.data_to_send())
    try:
        await asyncio.wait_for(started.wait(), 5)
        writer.close()
        [conn] = connections
        async with asyncio.timeout(5):
            while conn.tasks or conn.transport is not None:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0)  # the last task's done callback
        assert conn.idle_timer is None
    finally:
        server.close()
