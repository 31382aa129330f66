"""CPU per request of the upstream transports alone: ``AiohttpTransport`` against ``H1Transport``.

One upstream (a minimal keep-alive HTTP/1.1 server on asyncio, in its own process, answering
every request with the same 12-byte body) and, in this process, the two transports taking
turns: ``--rounds`` rounds of ``--requests`` sequential GETs each (the sidecar's usual request
headers), CPU time of this process (user + system) divided by the requests. What remains in
the figure besides the transport is one event-loop turn per request. Loopback only; every
loop is bounded by its count.

    python scripts/transport_cost.py --requests 3000 --rounds 4
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time

from multidict import CIMultiDict
from yarl import URL

from sidecar.http1.client import H1Transport
from sidecar.transport import AiohttpTransport, Transport, UpstreamRequest

SERVER = r"""
import asyncio, sys
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nContent-Type: text/plain\r\n\r\nhello world!"
class Upstream(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""
    def data_received(self, data):
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            self.transport.write(ANSWER)
async def main():
    server = await asyncio.get_running_loop().create_server(Upstream, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
asyncio.run(main())
"""

HEADERS = {"Host": "backend", "User-Agent": "bench", "Accept": "*/*", "Via": "1.1 sidecar",
           "X-Forwarded-For": "127.0.0.1", "X-Forwarded-Proto": "http"}


async def cost(transport: Transport, url: URL, requests: int) -> float:
    """Microseconds of this process's CPU per request over ``requests`` sequential GETs."""
    started = time.process_time()
    for _ in range(requests):
        response = await transport.handle_request(
            UpstreamRequest("GET", url, CIMultiDict(HEADERS)))
        while await response.content.readany():
            pass
        response.release()
    return (time.process_time() - started) / requests * 1e6


async def main(args: argparse.Namespace) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    try:
        await asyncio.sleep(0.5)
        url = URL(f"http://127.0.0.1:{port}/x", encoded=True)
        aio = AiohttpTransport(connect_timeout=1.0)
        await aio.start()
        h1 = H1Transport(connect_timeout=1.0)
        contenders: dict[str, Transport] = {"AiohttpTransport": aio, "H1Transport": h1}
        results: dict[str, list[float]] = {name: [] for name in contenders}
        for transport in contenders.values():  # warm up: connections, caches
            await cost(transport, url, 200)
        for _ in range(args.rounds):
            for name, transport in contenders.items():
                results[name].append(await cost(transport, url, args.requests))
        for name, values in results.items():
            print(f"{name:17} " + " ".join(f"{v:5.0f}" for v in values)
                  + f"   µs CPU per request (median {sorted(values)[len(values) // 2]:.0f})")
        await aio.close()
        await h1.close()
    finally:
        server.terminate()
        server.wait(5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=4)
    asyncio.run(main(parser.parse_args()))
