"""The ``soak`` scenario's load process: one caller, open loop, counted in one-second bins.

``python -m equilibrium.lab.bench.soak_load --url URL --caller NAME --own-sidecar ID --rate R
--duration D --start-at T`` sends ``R`` GET requests/s to ``URL`` (the caller's outbound
sidecar, ``Host: app``) on a fixed schedule from the monotonic time ``T`` (shared by every
load process of a run, so their bins line up with the parent's clock), for ``D`` seconds.

A half-hour soak at hundreds of requests/s is too many records to keep one by one, so this
process aggregates: each second it writes one JSON line per finished second of the run
(``bin``) with the number of requests that completed in it (``n``), how many succeeded
(``ok``), latency (from the intended start) percentiles of the successful ones (``p50``,
``p99``, ``max``), and the unsuccessful ones by outcome:

- ``fail``: an HTTP status >= 400 not shed by design (the key is ``"<status> <reason>@<who>"``
  from the sidecar's JSON error body: ``who`` is ``own`` for the caller's own sidecar, the
  ``--id`` of another sidecar (an inbound one), ``app`` when the body names none), a transport
  error or
  timeout (``"transport <kind>"``), or a request never sent because ``--max-in-flight``
  requests were already outstanding (``"client-overrun"``: the loop stays bounded);
- ``shed``: a 429 that the caller's *own* sidecar answered with reason ``punished-backoff``
  (it backs off by design while an upstream punishes its caller; nothing was sent) or
  ``punished-probation`` (it paces its caller's return after such a punishment,
  :mod:`mesh.probation`).

The last line is ``{"done": ...}`` with the totals. The load is bounded in count
(``rate × duration``), in concurrency (``--max-in-flight``) and in time (``--timeout`` per
request).

The requests go out over the sidecar's own HTTP/1.1 client (:class:`sidecar.http1.client.
H1Transport`, a keep-alive pool) on uvloop: aiohttp's client spent about 0.8 ms of CPU per
request here, so the four load processes of a soak took half a core of a two-core machine
from the processes under test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDict
from yarl import URL

from sidecar.cli import run_event_loop
from sidecar.http1.client import H1Transport
from sidecar.transport import TransportError, UpstreamRequest

SHED_BY_DESIGN = frozenset({"punished-backoff", "punished-probation"})
"""Reasons the caller's own sidecar answers without sending, as designed (not a failure)."""
BODY_LIMIT = 4096  # bytes of an error body read to find its reason


@dataclass(slots=True)
class Bin:
    """What completed within one second of the run."""

    done: int = 0
    ok: int = 0
    latencies: list[float] = field(default_factory=list)
    fail: Counter[str] = field(default_factory=Counter)
    shed: Counter[str] = field(default_factory=Counter)

    def to_json(self, index: int) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {"bin": index, "n": self.done, "ok": self.ok,
                "p50": _nearest(lat, 0.50), "p99": _nearest(lat, 0.99),
                "max": lat[-1] if lat else None,
                "fail": dict(self.fail), "shed": dict(self.shed)}


def _nearest(ordered: Sequence[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def classify(status: int, body: bytes, own_sidecar: str) -> tuple[str, str]:
    """``("ok" | "fail" | "shed", key)`` for one HTTP answer (see the module docstring)."""
    if 0 < status < 400:
        return "ok", ""
    reason, who = "-", "app"
    try:
        doc = json.loads(body[:BODY_LIMIT])
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        reason = str(doc.get("reason") or "-")
        sidecar = doc.get("sidecar")
        if isinstance(sidecar, str):
            who = "own" if sidecar == own_sidecar else sidecar[:64]
    if status == 429 and reason in SHED_BY_DESIGN and who in ("own", "app"):
        # only a caller's outbound sidecar answers this reason (an inbound one says
        # "punished"), and that answer names no sidecar in its body
        return "shed", f"{status} {reason}@own"
    return "fail", f"{status} {reason}@{who}"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    bins: dict[int, Bin] = {}
    totals: Counter[str] = Counter()
    planned = math.floor(args.rate * args.duration + 1e-9)
    in_flight = 0
    t0 = args.start_at

    def finish(intended: float, outcome: str, key: str) -> None:
        now = loop.time()
        b = bins.setdefault(max(0, int(now - t0)), Bin())
        b.done += 1
        totals[outcome] += 1
        if outcome == "ok":
            b.ok += 1
            b.latencies.append(now - intended)
        elif outcome == "shed":
            b.shed[key] += 1
        else:
            b.fail[key] += 1

    url = URL(args.url + "/")
    headers: CIMultiDict[str] = CIMultiDict(Host=args.host)

    async def one(transport: H1Transport, intended: float) -> None:
        nonlocal in_flight
        in_flight += 1
        try:
            async with asyncio.timeout(args.timeout):
                resp = await transport.handle_request(UpstreamRequest("GET", url, headers))
                body = bytearray()
                try:
                    while chunk := await resp.content.readany():
                        if resp.status >= 400 and len(body) < BODY_LIMIT:
                            body += chunk
                except BaseException:
                    resp.close()
                    raise
                resp.release()
                outcome, key = classify(resp.status, bytes(body), args.own_sidecar)
        except TimeoutError:
            outcome, key = "fail", "transport timeout"
        except (TransportError, OSError) as exc:
            outcome, key = "fail", f"transport {type(exc).__name__}"
        finally:
            in_flight -= 1
        finish(intended, outcome, key)

    def flush(upto: int) -> None:
        for index in sorted(i for i in bins if i < upto):
            sys.stdout.write(json.dumps(bins.pop(index).to_json(index)) + "\n")
        sys.stdout.flush()

    transport = H1Transport(connect_timeout=args.timeout)
    tasks: set[asyncio.Task[None]] = set()
    await transport.start()
    try:
        await asyncio.sleep(max(0.0, t0 - loop.time()))
        next_flush = 1
        for seq in range(planned):
            intended = t0 + seq / args.rate
            delay = intended - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if loop.time() - t0 >= next_flush:
                next_flush = int(loop.time() - t0) + 1
                flush(next_flush - 1)
            if in_flight >= args.max_in_flight:
                finish(intended, "fail", "client-overrun")
                continue
            task = asyncio.create_task(one(transport, intended))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks)
    finally:
        await transport.close()
    flush(1 << 40)
    return {"done": True, "caller": args.caller, "planned": planned, **totals}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m equilibrium.lab.bench.soak_load")
    p.add_argument("--url", required=True, help="the caller's outbound sidecar")
    p.add_argument("--host", default="app", help="Host header: the upstream's name (app)")
    p.add_argument("--caller", required=True)
    p.add_argument("--own-sidecar", required=True, help="the --id of the caller's sidecar")
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--start-at", type=float, required=True, help="monotonic start time")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--max-in-flight", type=int, default=512)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if not (0 < args.rate <= 5000 and 0 < args.duration <= 3600 and 0 < args.timeout <= 60
            and 1 <= args.max_in_flight <= 10_000):
        p.error("need 0 < rate <= 5000, 0 < duration <= 3600, 0 < timeout <= 60, "
                "1 <= max-in-flight <= 10000")
    summary: dict[str, Any] = {}

    async def main_loop() -> int:
        summary.update(await run(args))
        return 0

    run_event_loop(main_loop())
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
