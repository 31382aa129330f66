"""The open-loop load generator of the demo and the benchmark, and exact percentiles.

Open loop means the arrival schedule does not wait for the system under test: request i has
an *intended start* ``t0 + i / rate`` fixed before the run, and its latency is measured from
that intended start to the end of its response. A closed-loop generator (send, wait, send)
silently sends less while the server stalls, so the slow period hides in a few samples:
Gil Tene's "coordinated omission" ("How NOT to measure latency", 2015). Here a stall shows
up in every request scheduled during it, as it would for real users.

Bounds: at most ``rate * duration`` requests (or ``max_requests``), each with a timeout, and a
cap on requests in flight. A request that finds the cap full waits for a slot (its latency
still counts from its intended start) and is counted in ``delayed_by_cap``; the generator's
own lag (CPU starvation) is reported as ``max_start_lag`` and ``late_starts``.

The generator runs in its own process in the demo and the benchmark
(``python -m equilibrium.lab.loadgen ...``), streaming one JSON record per request on stdout and a
final ``{"summary": ...}`` line, so the proxy under test and the load never share an event
loop. :class:`LoadGenerator` is the parent-side handle. Times are ``time.monotonic()``
seconds, which on Linux and macOS are comparable between processes of one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from equilibrium.lab.fleet import POD_HEADER

LATE_START = 0.010  # a request sent more than 10 ms after its intended start is "late"


@dataclass(frozen=True, slots=True)
class Record:
    """One request as the client saw it.

    ``intended`` is the scheduled start (monotonic seconds); ``latency`` runs from it to the
    end of the response body (or the failure). ``status`` 0 means no HTTP answer (``error``
    says why). ``pod`` names the fleet pod that answered, when one did.
    """

    client: str
    seq: int
    intended: float
    latency: float
    status: int
    pod: str | None = None
    error: str | None = None
    delayed: bool = False

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 500

    def to_json(self) -> str:
        return json.dumps(
            {"c": self.client, "i": self.seq, "t": round(self.intended, 6),
             "l": round(self.latency, 6), "s": self.status, "p": self.pod,
             "e": self.error, "w": self.delayed},
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Record:
        return cls(
            client=str(obj["c"]), seq=int(obj["i"]), intended=float(obj["t"]),
            latency=float(obj["l"]), status=int(obj["s"]), pod=obj.get("p"),
            error=obj.get("e"), delayed=bool(obj.get("w", False)),
        )


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """What to send: ``rate`` requests/s to ``target`` for ``duration`` s (open loop).

    ``host`` sets the ``Host`` header (the upstream name, when sending through a sidecar).
    ``start_at`` (monotonic) lets several generators share one schedule origin.
    """

    target: str
    rate: float
    duration: float
    host: str | None = None
    path: str = "/"
    method: str = "GET"
    max_requests: int | None = None
    max_in_flight: int = 256
    timeout: float = 5.0
    client: str = "client"
    start_at: float | None = None

    def planned(self) -> int:
        n = math.floor(self.rate * self.duration + 1e-9)
        return n if self.max_requests is None else min(n, self.max_requests)

    def validate(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if not (self.duration > 0 and math.isfinite(self.duration)):
            raise ValueError(f"duration must be > 0, got {self.duration}")
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {self.timeout}")


@dataclass(slots=True)
class LoadSummary:
    """Counts for one generator run (see the module docstring for what each one means)."""

    client: str
    planned: int = 0
    sent: int = 0
    answered: int = 0
    errors: int = 0
    delayed_by_cap: int = 0
    late_starts: int = 0
    max_start_lag: float = 0.0
    error_kinds: dict[str, int] = field(default_factory=dict)
    cpu_seconds: float = 0.0  # CPU time of this generator process during the schedule


def _pod_of(resp: aiohttp.ClientResponse, body: bytes) -> str | None:
    pod = resp.headers.get(POD_HEADER)
    if pod:
        return pod
    text = body[:64].decode("utf-8", "replace").strip()
    return text if text.startswith("pod-") and "\n" not in text else None


async def run_open_loop(
    spec: LoadSpec,
    sink: Callable[[Record], None],
    ready: Callable[[], Awaitable[float]] | None = None,
) -> LoadSummary:
    """Send ``spec``'s schedule; call ``sink`` with every finished request's record.

    With ``ready``, the generator first sets itself up, then awaits ``ready()`` for the
    schedule's origin (monotonic seconds), so process start-up never counts as latency.
    """
    spec.validate()
    loop = asyncio.get_running_loop()
    summary = LoadSummary(client=spec.client, planned=spec.planned())
    slots = asyncio.Semaphore(spec.max_in_flight)
    headers = {"Host": spec.host} if spec.host else {}
    url = spec.target.rstrip("/") + spec.path
    connector = aiohttp.TCPConnector(limit=spec.max_in_flight, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None)

    def record(seq: int, intended: float, status: int, pod: str | None,
               error: str | None, delayed: bool) -> None:
        rec = Record(spec.client, seq, intended, loop.time() - intended, status, pod, error,
                     delayed)
        if status:
            summary.answered += 1
        if not rec.ok:
            summary.errors += 1
            kind = error or f"http {status}"
            summary.error_kinds[kind] = summary.error_kinds.get(kind, 0) + 1
        sink(rec)

    async def one(session: aiohttp.ClientSession, seq: int, intended: float) -> None:
        delayed = slots.locked()
        try:
            async with asyncio.timeout(spec.timeout):
                async with slots:
                    lag = loop.time() - intended
                    summary.sent += 1
                    summary.max_start_lag = max(summary.max_start_lag, lag)
                    if lag > LATE_START:
                        summary.late_starts += 1
                    async with session.request(spec.method, url, headers=headers) as resp:
                        body = await resp.read()
                        record(seq, intended, resp.status, _pod_of(resp, body), None, delayed)
        except TimeoutError:
            record(seq, intended, 0, None, "timeout", delayed)
        except aiohttp.ClientError as exc:
            record(seq, intended, 0, None, type(exc).__name__, delayed)
        finally:
            if delayed:
                summary.delayed_by_cap += 1

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if ready is not None:
            t0 = await ready()
        elif spec.start_at is not None:
            t0 = spec.start_at
        else:
            t0 = loop.time()
        cpu0 = time.process_time()
        tasks: set[asyncio.Task[None]] = set()
        for seq in range(summary.planned):
            intended = t0 + seq / spec.rate
            delay = intended - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(session, seq, intended))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks)
        summary.cpu_seconds = time.process_time() - cpu0
    return summary


# --- percentiles -------------------------------------------------------------------------


def percentile(samples: Iterable[float], q: float) -> float:
    """The exact nearest-rank ``q``-th percentile (0 < q <= 100) of ``samples``.

    It is the smallest sample with at least q % of the samples at or below it (the
    ``ceil(q/100 · n)``-th smallest): always an observed value, never an interpolation, so
    p99.9 of 1,000 samples is the largest but one. NaN for no samples.
    """
    ordered = sorted(samples)
    return percentile_sorted(ordered, q)


def percentile_sorted(ordered: Sequence[float], q: float) -> float:
    """:func:`percentile` on samples already sorted ascending."""
    if not 0 < q <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {q}")
    if not ordered:
        return math.nan
    rank = math.ceil(q / 100.0 * len(ordered) - 1e-9)
    return float(ordered[max(rank, 1) - 1])


def latency_summary(latencies: Iterable[float]) -> dict[str, float]:
    """count, mean, p50, p99, p99.9 and max of ``latencies`` (seconds)."""
    ordered = sorted(latencies)
    n = len(ordered)
    return {
        "count": float(n),
        "mean": math.fsum(ordered) / n if n else math.nan,
        "p50": percentile_sorted(ordered, 50),
        "p99": percentile_sorted(ordered, 99),
        "p99.9": percentile_sorted(ordered, 99.9),
        "max": float(ordered[-1]) if n else math.nan,
    }


# --- the subprocess and its handle -------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m equilibrium.lab.loadgen",
        description="Open-loop HTTP load; one JSON record per request on stdout.",
    )
    p.add_argument("--target", required=True, help="base URL, e.g. http://127.0.0.1:15001")
    p.add_argument("--host", default=None, help="Host header (the upstream name)")
    p.add_argument("--rate", type=float, required=True, help="requests per second")
    p.add_argument("--duration", type=float, required=True, help="seconds of schedule")
    p.add_argument("--max-requests", type=int, default=None)
    p.add_argument("--max-in-flight", type=int, default=256)
    p.add_argument("--timeout", type=float, default=5.0, help="per request, seconds")
    p.add_argument("--path", default="/")
    p.add_argument("--method", default="GET")
    p.add_argument("--client", default="client", help="name stamped on the records")
    p.add_argument("--start-at", type=float, default=None, help="monotonic start time")
    p.add_argument(
        "--wait-start", action="store_true",
        help='print {"ready": true} once set up, then read the monotonic start time from stdin',
    )
    return p


def spec_from_args(args: argparse.Namespace) -> LoadSpec:
    return LoadSpec(
        target=args.target, rate=args.rate, duration=args.duration, host=args.host,
        path=args.path, method=args.method, max_requests=args.max_requests,
        max_in_flight=args.max_in_flight, timeout=args.timeout, client=args.client,
        start_at=args.start_at,
    )


def spec_to_argv(spec: LoadSpec) -> list[str]:
    argv = ["--target", spec.target, "--rate", repr(spec.rate), "--duration",
            repr(spec.duration), "--max-in-flight", str(spec.max_in_flight), "--timeout",
            repr(spec.timeout), "--path", spec.path, "--method", spec.method,
            "--client", spec.client]
    if spec.host:
        argv += ["--host", spec.host]
    if spec.max_requests is not None:
        argv += ["--max-requests", str(spec.max_requests)]
    if spec.start_at is not None:
        argv += ["--start-at", repr(spec.start_at)]
    return argv


async def _stream(spec: LoadSpec, wait_start: bool = False) -> LoadSummary:
    out = sys.stdout
    pending: list[str] = []

    async def ready() -> float:
        out.write(json.dumps({"ready": True}) + "\n")
        out.flush()
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        try:
            return float(line)
        except ValueError:
            raise SystemExit(f"loadgen: expected a start time on stdin, got {line!r}") from None

    def sink(rec: Record) -> None:
        pending.append(rec.to_json())

    async def flusher() -> None:
        while True:
            await asyncio.sleep(0.2)
            if pending:
                out.write("\n".join(pending) + "\n")
                pending.clear()
                out.flush()

    task = asyncio.create_task(flusher())
    try:
        summary = await run_open_loop(spec, sink, ready if wait_start else None)
    finally:
        task.cancel()
    if pending:
        out.write("\n".join(pending) + "\n")
    out.write(json.dumps({"summary": asdict(summary)}) + "\n")
    out.flush()
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = spec_from_args(args)
        spec.validate()
    except ValueError as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    asyncio.run(_stream(spec, args.wait_start))
    return 0


class LoadGenerator:
    """Parent-side handle of one ``python -m equilibrium.lab.loadgen`` process."""

    def __init__(self, child: Any, spec: LoadSpec) -> None:
        self.child = child
        self.spec = spec
        self.summary: LoadSummary | None = None

    @classmethod
    async def start(cls, spec: LoadSpec, stderr_path: str | None = None) -> LoadGenerator:
        from equilibrium.lab.processes import ChildProcess

        spec.validate()
        argv = [sys.executable, "-m", "equilibrium.lab.loadgen", *spec_to_argv(spec),
                "--wait-start"]
        child = await ChildProcess.start(f"loadgen {spec.client}", argv,
                                         stderr_path=stderr_path)
        try:
            line = await asyncio.wait_for(child.readline(), 30.0)
            if not line or not json.loads(line).get("ready"):
                raise RuntimeError(f"load generator {spec.client} did not start: {line!r}")
        except BaseException:
            await child.stop()
            raise
        return cls(child, spec)

    async def begin(self, start_at: float) -> None:
        """Start the schedule at ``start_at`` (monotonic seconds, normally a little ahead)."""
        await self.child.write_line(repr(start_at))

    async def records(self) -> AsyncIterator[Record]:
        """Every record as it arrives; ends at the summary line (stored in ``summary``)."""
        while True:
            line = await self.child.readline()
            if not line:
                return
            obj = json.loads(line)
            if "summary" in obj:
                self.summary = LoadSummary(**obj["summary"])
                continue
            yield Record.from_json(obj)

    async def collect(self) -> list[Record]:
        return [rec async for rec in self.records()]

    async def stop(self) -> None:
        await self.child.stop()


def now() -> float:
    """The clock every record uses (monotonic seconds)."""
    return time.monotonic()


if __name__ == "__main__":
    sys.exit(main())
