"""Profile the sidecar's outbound path under load with py-spy; print where its CPU goes.

One sidecar pinned to CPU 0 in front of a static nginx backend (``return 200``), ``wrk`` on
CPU 1 keeping it saturated, ``py-spy record`` sampling the sidecar for ``--seconds``. The
samples (py-spy's raw collapsed stacks, kept in ``--out``) are then summed two ways:
self time by the leaf frame's component (aiohttp parsing, asyncio, policy, metrics, ...) and
inclusive time of the request path's steps (pick, observe, header handling, logging, ...).

Needs nginx, wrk and py-spy (``pip install py-spy``; sampling another process needs root or
ptrace rights). Loopback only; every run is bounded by ``--seconds``.

    python scripts/profile_sidecar.py --seconds 15 --out profile-out
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

from equilibrium.lab.bench import peers
from equilibrium.lab.sidecars import Sidecar

# leaf frame -> component, first match wins (file path fragments)
SELF_GROUPS: list[tuple[str, str]] = [
    ("sidecar/http1/", "sidecar's HTTP/1.1 server (sidecar/http1, llhttp callbacks)"),
    ("httptools", "llhttp parsing (httptools)"),
    ("uvloop", "uvloop (event loop, transports)"),
    ("selector_events.py", "socket I/O (send/recv calls in asyncio's transports)"),
    ("aiohttp/http_parser", "aiohttp HTTP parsing (request and response heads)"),
    ("aiohttp/_http_parser", "aiohttp HTTP parsing (request and response heads)"),
    ("aiohttp/web_", "aiohttp server (protocol, Request/Response objects)"),
    ("aiohttp/base_protocol", "aiohttp server (protocol, Request/Response objects)"),
    ("aiohttp/http_writer", "aiohttp writer and streams"),
    ("aiohttp/streams", "aiohttp writer and streams"),
    ("aiohttp/client", "aiohttp client (upstream request and response)"),
    ("aiohttp/connector", "aiohttp client (upstream request and response)"),
    ("aiohttp/", "aiohttp, other"),
    ("_http_parser", "aiohttp HTTP parsing (request and response heads)"),
    ("multidict", "header and URL objects (multidict, yarl)"),
    ("yarl", "header and URL objects (multidict, yarl)"),
    ("prometheus_client", "metrics (prometheus_client)"),
    ("sidecar/metrics", "metrics (prometheus_client)"),
    ("logging/", "logging"),
    ("/mesh/", "policy and estimators (mesh/)"),
    ("sidecar/forward", "header handling (sidecar/forward.py)"),
    ("sidecar/http1/client", "HTTP/1.1 upstream client (sidecar/http1/client*.py, httptools)"),
    ("httptools", "HTTP/1.1 upstream client (sidecar/http1/client*.py, httptools)"),
    ("/wire/", "signal headers (wire/)"),
    ("sidecar/", "sidecar's own request path (outbound, phases, transport)"),
    ("asyncio/", "asyncio (event loop, tasks, timeouts, transports)"),
    ("selectors", "asyncio (event loop, tasks, timeouts, transports)"),
    ("socket", "asyncio (event loop, tasks, timeouts, transports)"),
]

# inclusive: a sample counts for a step when any frame of its stack matches
STEPS: list[tuple[str, re.Pattern[str]]] = [
    ("aiohttp server: read and parse requests (web_protocol data_received)",
     re.compile(r"^(\w+\.)*data_received \(.*aiohttp/web_protocol")),
    ("aiohttp client: read and parse responses (client_proto data_received)",
     re.compile(r"^(\w+\.)*data_received \(.*aiohttp/client_proto")),
    ("sidecar HTTP/1.1 server: read and parse requests (http1 data_received)",
     re.compile(r"^(\w+\.)*data_received \(.*sidecar/http1/server")),
    ("HTTP/1.1 client: read and parse responses (sidecar/http1 data_received)",
     re.compile(r"^(\w+\.)*data_received \(.*sidecar/http1/client_connection")),
    ("outbound handler (sidecar/outbound.py handle/serve, all of it)",
     re.compile(r"^(\w+\.)*(handle|serve) \(.*sidecar/outbound\.py")),
    ("  upstream request through the transport (send, await the head)",
     re.compile(r"^(\w+\.)*handle_request \(.*sidecar/(transport|http1/client)\.py")),
    ("  response relay (prepare, body, write_eof)",
     re.compile(r"^(\w+\.)*_relay_response \(.*sidecar/outbound\.py")),
    ("  request headers to upstream (hop-by-hop, Via, XFF, strip X-GT-*)",
     re.compile(r"^(\w+\.)*request_headers_to_upstream \(")),
    ("  response headers to app", re.compile(r"^(\w+\.)*response_headers_to_app \(")),
    ("  policy pick (upstream_pick)", re.compile(r"^(\w+\.)*upstream_pick \(")),
    ("  policy observe (on_start, on_outcome)", re.compile(r"^(\w+\.)*on_(start|outcome) \(")),
    ("  metrics (sidecar/metrics.py, prometheus_client)",
     re.compile(r"\((.*sidecar/metrics\.py|.*prometheus_client/)")),
    ("  phases.logging (access log decision, timings)",
     re.compile(r"^(\w+\.)*logging \(.*sidecar/phases\.py")),
    ("  logging module", re.compile(r"\(.*/logging/__init__\.py")),
    ("  asyncio.timeout (set-up, reschedule)", re.compile(r"\(.*asyncio/timeouts\.py")),
    ("  request watchdog (sidecar/watchdog.py)", re.compile(r"\(.*sidecar/watchdog\.py")),
]


def parse_raw(text: str) -> list[tuple[list[str], int]]:
    """py-spy ``--format raw`` lines (``frame;frame;... count``, root first)."""
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def self_groups(stacks: list[tuple[list[str], int]]) -> Counter[str]:
    out: Counter[str] = Counter()
    for frames, n in stacks:
        leaf = frames[-1]
        out[next((g for frag, g in SELF_GROUPS if frag in leaf), "other: " + leaf)] += n
    return out


def steps(stacks: list[tuple[list[str], int]]) -> Counter[str]:
    out: Counter[str] = Counter()
    for frames, n in stacks:
        for name, pattern in STEPS:
            if any(pattern.search(f) for f in frames):
                out[name] += n
    return out


def top_leaves(stacks: list[tuple[list[str], int]], k: int = 15) -> list[tuple[str, int]]:
    out: Counter[str] = Counter()
    for frames, n in stacks:
        out[re.sub(r":\d+\)$", ")", frames[-1])] += n
    return out.most_common(k)


def report(stacks: list[tuple[list[str], int]]) -> str:
    total = sum(n for _, n in stacks) or 1
    lines = [f"samples: {total}", "", "| self time by component | share |", "|---|---:|"]
    lines += [f"| {g} | {n / total * 100:.1f} % |" for g, n in self_groups(stacks).most_common()
              if n / total >= 0.005]
    lines += ["", "| step of the request path (inclusive) | share |", "|---|---:|"]
    found = steps(stacks)
    lines += [f"| {name} | {found[name] / total * 100:.1f} % |" for name, _ in STEPS]
    lines += ["", "| top functions (self) | share |", "|---|---:|"]
    lines += [f"| `{f}` | {n / total * 100:.1f} % |" for f, n in top_leaves(stacks)]
    return "\n".join(lines)


async def profile(seconds: float, connections: int, out: Path, native: bool) -> str:
    logs = Path(tempfile.mkdtemp(prefix="equilibrium-profile-"))
    backend = await peers.PeerProxy.start(None, [], logs, name="static-backend")
    try:
        backend.pin([1])
        sidecar = await Sidecar.start("profiled", {"backend": [backend.url]},
                                      stderr_path=str(logs / "sidecar.log"))
        try:
            peers.pin(sidecar.child.pid, [0])
            await peers.run_wrk(sidecar.outbound_url, duration=2, connections=connections,
                                host="backend", cpus=[1])  # warm-up
            raw = out / "sidecar.raw.txt"
            load = asyncio.create_task(peers.run_wrk(
                sidecar.outbound_url, duration=seconds + 2, connections=connections,
                host="backend", cpus=[1], log=out / "wrk.txt"))
            await asyncio.sleep(1)
            spy = await asyncio.create_subprocess_exec(
                "py-spy", "record", "--pid", str(sidecar.child.pid), "--duration",
                str(round(seconds)), "--rate", "200", "--format", "raw", "--output", str(raw),
                *(["--native"] if native else []),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            _, err = await asyncio.wait_for(spy.communicate(), seconds + 30)
            result = await load
            if spy.returncode != 0:
                raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
        finally:
            await sidecar.stop()
    finally:
        await backend.stop()
    head = (f"sidecar saturated by wrk -t1 -c{connections}: {result.requests_per_s:,.0f} req/s, "
            f"p99 {result.p99 * 1e3:.1f} ms (while sampled)")
    return head + "\n\n" + report(parse_raw(raw.read_text()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=15.0, help="seconds sampled (15)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    p.add_argument("--out", type=Path, default=Path("profile-out"), help="folder for raw data")
    p.add_argument("--native", action="store_true",
                   help="also sample C frames (aiohttp's parser, multidict, yarl, libc)")
    p.add_argument("--raw", type=Path, default=None,
                   help="only summarise an existing py-spy raw file")
    args = p.parse_args()
    if args.raw is not None:
        print(report(parse_raw(args.raw.read_text())))
        return 0
    lacking = [t for t in ("nginx", "wrk", "py-spy") if shutil.which(t) is None]
    if lacking:
        print(f"needs {', '.join(lacking)}", file=sys.stderr)
        return 2
    if not 0 < args.seconds <= 300:
        print("--seconds must be in (0, 300]", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    print(asyncio.run(profile(args.seconds, args.connections, args.out, args.native)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
