"""Long polls behind an inbound sidecar: do they take the app's slots from its quick requests?

One app (aiohttp, in this process) behind a real ``equilibrium sidecar --inbound`` process,
an open-loop caller at ``--rate`` requests/s for ``--duration`` s, ``--share`` of them long
polls that the app answers after 2–10 s (uniform), the rest answered in 2 ms. Contenders run
one after another on the same schedule (the same seed):

- ``parked``: the default, long requests parked outside the concurrency limit
  (docs/policing.md, "Congestion");
- ``counted``: every admitted request counted until it ends, as before that rule
  (``policing.concurrency.long_after`` and ``long_factor`` set to 1e9).

Prints one Markdown table (failed requests by status, the quick requests' latency from their
intended start, the requests parked) with the command and the machine. Traffic stays on
127.0.0.1; every loop is bounded by ``--duration`` and a 15 s client timeout.

    python benchmarks/long_polls.py [--rate 40] [--duration 30] [--share 0.3] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from equilibrium.lab.bench.report import machine_info
from equilibrium.lab.processes import free_port
from equilibrium.lab.sidecars import Sidecar

KEY = "long-polls-benchmark-mesh-key-0123456789ab"
CONTENDERS: dict[str, dict[str, Any]] = {
    "parked": {},
    "counted": {"concurrency": {"long_after": 1e9, "long_factor": 1e9}},
}


async def serve_app() -> tuple[web.AppRunner, str]:
    async def handle(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("t", "0.002")))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def one_run(name: str, policing: dict[str, Any], args: argparse.Namespace,
                  app_url: str, logs: Path) -> dict[str, Any]:
    config = logs / f"{name}.json"
    config.write_text(json.dumps({"policing": policing}))
    port = free_port()
    sidecar = await Sidecar.start(
        f"pod-{name}", {}, extra=["--config", str(config), "--inbound", f"127.0.0.1:{port}",
                                  "--app", app_url],
        stderr_path=str(logs / f"{name}.log"), env={"EQUILIBRIUM_MESH_SECRET": KEY})
    rng = random.Random(args.seed)
    records: list[tuple[bool, str, float]] = []
    try:
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=15)) as session:
            async def one(intended: float, poll: bool, wait: float) -> None:
                path = f"/poll?t={wait:.3f}" if poll else "/quick"
                try:
                    async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                        await response.read()
                        status = str(response.status)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    status = type(exc).__name__
                records.append((poll, status, time.monotonic() - intended))

            start = time.monotonic() + 0.5
            tasks = []
            for i in range(int(args.duration * args.rate)):
                intended = start + i / args.rate
                poll, wait = rng.random() < args.share, rng.uniform(2.0, 10.0)
                await asyncio.sleep(max(0.0, intended - time.monotonic()))
                tasks.append(asyncio.create_task(one(intended, poll, wait)))
            await asyncio.gather(*tasks)
            async with session.get(sidecar.admin_url + "/metrics") as response:
                metrics = await response.text()
    finally:
        await sidecar.stop()
    parked = next((float(line.split()[1]) for line in metrics.splitlines()
                   if line.startswith("equilibrium_inbound_long_requests_total ")), 0.0)
    failed = Counter(status for _, status, _ in records if status != "200")
    quick = sorted(latency for poll, status, latency in records
                   if not poll and status == "200")

    def pick(q: float) -> float:
        return quick[min(len(quick) - 1, int(q * len(quick)))] * 1000 if quick else float("nan")

    return {"requests": len(records), "failed": dict(failed), "quick": len(quick),
            "quick_p50_ms": pick(0.5), "quick_p99_ms": pick(0.99),
            "quick_max_ms": quick[-1] * 1000 if quick else float("nan"), "parked": parked}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=40.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--share", type=float, default=0.3, help="long polls' share")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    args = parser.parse_args()
    if not 0 < args.duration <= 600 or not 0 < args.rate <= 1000:
        parser.error("need 0 < duration <= 600 and 0 < rate <= 1000")
    machine = machine_info()
    runner, app_url = await serve_app()
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="equilibrium-long-polls-") as tmp:
            for name in args.contenders.split(","):
                result = await one_run(name, CONTENDERS[name], args, app_url, Path(tmp))
                failed = sum(result["failed"].values())
                detail = ", ".join(f"{k}: {v}" for k, v in sorted(result["failed"].items()))
                rows.append(f"| {name} | {result['requests']} | {failed}"
                            f"{f' ({detail})' if detail else ''} | {result['quick_p50_ms']:.1f}"
                            f" | {result['quick_p99_ms']:.1f} | {result['quick_max_ms']:.1f}"
                            f" | {result['parked']:.0f} |")
    finally:
        await runner.cleanup()
    print(f"`python {' '.join(sys.argv)}`  ")
    print(f"machine: {machine.get('platform')}, {machine.get('cpus')} CPUs, Python "
          f"{machine.get('python')}, load at start {machine.get('load_average')}\n")
    print("| contender | requests | failed | quick p50 (ms) | quick p99 (ms) | quick max (ms) "
          "| parked as long |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))


if __name__ == "__main__":
    asyncio.run(main())
