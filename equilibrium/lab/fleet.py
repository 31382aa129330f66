"""The demo fleet: "pods" of a demo service as real aiohttp servers on loopback.

Owns the pods' behaviour (service time, the seed's "bad" pod that adds 500 ms to a random
share of its requests, an M/M/c-like capacity-limited mode), their runtime control endpoint
and the handle the demo and the benchmark use to start and steer a fleet.

All pods run in ONE separate process (``python -m equilibrium.lab.fleet``), each on its own port.
A separate process, rather than threads in the caller, keeps the fleet's work off the load
generator's and the proxies' event loops: on a 2-core machine a pod sleeping 500 ms must not
delay the clock of whoever measures it. Pods sleep instead of burning CPU, so one process
serves thousands of requests per second.

Every pod answers every path with a small text body naming it (``pod-3``) and the header
``X-Equilibrium-Pod``, except two reserved paths:

- ``POST /_control`` with a JSON object updates the pod's behaviour (any subset of the
  :class:`PodBehaviour` fields, plus ``"reset": true`` to clear counters and re-seed the RNG);
  the answer is the pod's stats. Unknown fields or bad values get a 400 with the reason.
- ``GET /_stats``: requests served, slow (bad) answers, in flight, queued, the behaviour.

Each pod draws from its own ``random.Random(seed, index)``, so a run is reproducible.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

POD_HEADER = "X-Equilibrium-Pod"
CONTROL_PATH = "/_control"
STATS_PATH = "/_stats"
SERVICE_DISTS = ("exponential", "fixed")  # PodBehaviour.service_dist, in capacity mode


@dataclass(slots=True)
class PodBehaviour:
    """How one pod answers. Times in seconds.

    Without ``capacity`` a request takes ``service_time`` ± uniform ``jitter`` (no queueing).
    With ``capacity`` = c, at most c requests are served at once, the rest wait in a FIFO
    queue, and service times are exponential with rate ``service_rate`` per server: an M/M/c
    queue whose latency climbs steeply as load nears c·μ (``service_dist`` ``"fixed"``: every
    service takes exactly 1/``service_rate``, an M/D/c queue, whose only variance is
    queueing). A ``bad`` pod adds ``bad_delay`` to a random ``bad_fraction`` of its requests
    (the seed's scenario: 500 ms to half of them);
    ``error_rate`` answers that fraction with a 503.
    """

    service_time: float = 0.003
    jitter: float = 0.001
    bad: bool = False
    bad_delay: float = 0.5
    bad_fraction: float = 0.5
    capacity: int | None = None
    service_rate: float = 200.0
    error_rate: float = 0.0
    service_dist: str = "exponential"

    def updated(self, changes: Mapping[str, Any]) -> PodBehaviour:
        """A copy with ``changes`` applied; ValueError names the first bad field or value."""
        names = {f.name for f in dataclasses.fields(self)}
        for key in changes:
            if key not in names:
                raise ValueError(f"unknown field {key!r} (known: {', '.join(sorted(names))})")
        new = dataclasses.replace(self, **dict(changes))
        new.validate()
        return new

    def validate(self) -> None:
        for name in ("service_time", "jitter", "bad_delay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        for name in ("bad_fraction", "error_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if not isinstance(self.bad, bool):
            raise ValueError(f"bad must be true or false, got {self.bad!r}")
        if self.capacity is not None and (
            isinstance(self.capacity, bool) or not isinstance(self.capacity, int)
            or self.capacity < 1
        ):
            raise ValueError(f"capacity must be null or an integer >= 1, got {self.capacity!r}")
        rate = self.service_rate
        if isinstance(rate, bool) or not isinstance(rate, int | float) or rate <= 0:
            raise ValueError(f"service_rate must be a number > 0, got {rate!r}")
        if self.service_dist not in SERVICE_DISTS:
            raise ValueError(f"service_dist must be one of {', '.join(SERVICE_DISTS)}, "
                             f"got {self.service_dist!r}")


@dataclass
class Pod:
    """One pod's state inside the fleet process."""

    name: str
    index: int
    seed: int
    behaviour: PodBehaviour
    rng: random.Random = field(init=False)
    requests: int = 0
    slow: int = 0
    errors: int = 0
    in_flight: int = 0
    queued: int = 0
    _servers: asyncio.Semaphore | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.reseed(self.seed)
        self._apply_capacity()

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(f"{seed}/{self.index}")

    def configure(self, changes: Mapping[str, Any]) -> None:
        changes = dict(changes)
        reset = changes.pop("reset", False)
        seed = changes.pop("seed", None)
        if not isinstance(reset, bool):
            raise ValueError(f"reset must be true or false, got {reset!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        new = self.behaviour.updated(changes)
        capacity_changed = new.capacity != self.behaviour.capacity
        self.behaviour = new
        if capacity_changed:
            self._apply_capacity()
        if reset:
            self.requests = self.slow = self.errors = 0
        if reset or seed is not None:
            self.reseed(self.seed if seed is None else seed)

    def _apply_capacity(self) -> None:
        # Requests already queued on the old semaphore finish there; new ones use the new one.
        cap = self.behaviour.capacity
        self._servers = asyncio.Semaphore(cap) if cap is not None else None

    def stats(self) -> dict[str, Any]:
        return {
            "pod": self.name,
            "requests": self.requests,
            "slow": self.slow,
            "errors": self.errors,
            "in_flight": self.in_flight,
            "queued": self.queued,
            "behaviour": dataclasses.asdict(self.behaviour),
        }

    async def serve(self) -> tuple[int, bool]:
        """Spend this request's time; returns (status, was_slow)."""
        b = self.behaviour
        slow = b.bad and self.rng.random() < b.bad_fraction
        failed = b.error_rate > 0 and self.rng.random() < b.error_rate
        servers = self._servers
        if servers is None:
            service = max(0.0, b.service_time + self.rng.uniform(-b.jitter, b.jitter))
            await asyncio.sleep(service + (b.bad_delay if slow else 0.0))
        else:
            self.queued += 1
            try:
                await servers.acquire()
            finally:
                self.queued -= 1
            try:
                await asyncio.sleep(1.0 / b.service_rate if b.service_dist == "fixed"
                                    else self.rng.expovariate(b.service_rate))
            finally:
                servers.release()
            if slow:
                await asyncio.sleep(b.bad_delay)
        return (503 if failed else 200), slow


def make_pod_app(pod: Pod) -> web.Application:
    """The aiohttp application of one pod."""

    async def control(request: web.Request) -> web.Response:
        try:
            changes = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        if not isinstance(changes, dict):
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        try:
            pod.configure(changes)
        except (TypeError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(pod.stats())

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(pod.stats())

    async def answer(request: web.Request) -> web.StreamResponse:
        if request.can_read_body:
            await request.read()
        pod.in_flight += 1
        try:
            status, slow = await pod.serve()
        finally:
            pod.in_flight -= 1
        pod.requests += 1
        pod.slow += int(slow)
        pod.errors += int(status >= 500)
        return web.Response(
            status=status, text=f"{pod.name}\n", headers={POD_HEADER: pod.name}
        )

    app = web.Application()
    app.router.add_post(CONTROL_PATH, control)
    app.router.add_get(STATS_PATH, stats)
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def serve_fleet(
    behaviours: Sequence[PodBehaviour], seed: int, host: str = "127.0.0.1"
) -> tuple[list[web.AppRunner], list[dict[str, str]]]:
    """Start one server per behaviour on free ports; returns the runners and the pod table."""
    runners: list[web.AppRunner] = []
    table: list[dict[str, str]] = []
    for index, behaviour in enumerate(behaviours):
        pod = Pod(name=f"pod-{index}", index=index, seed=seed, behaviour=behaviour)
        runner = web.AppRunner(make_pod_app(pod), access_log=None)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))  # the kernel picks a free port; we read it back
        port = sock.getsockname()[1]
        await web.SockSite(runner, sock, backlog=1024).start()
        runners.append(runner)
        table.append({"name": pod.name, "url": f"http://{host}:{port}"})
    return runners, table


def behaviours_from_args(args: argparse.Namespace) -> list[PodBehaviour]:
    """The pod list described by the command line (``--spec`` overrides the simple flags)."""
    if args.spec:
        raw = json.loads(args.spec)
        if not isinstance(raw, list) or not all(isinstance(x, dict) for x in raw):
            raise ValueError("--spec must be a JSON list of objects")
        return [PodBehaviour().updated(x) for x in raw]
    base = PodBehaviour(
        service_time=args.service_time,
        jitter=args.jitter,
        bad_delay=args.bad_delay,
        bad_fraction=args.bad_fraction,
        capacity=args.capacity,
        service_rate=args.service_rate,
    )
    base.validate()
    bad = set(args.bad or [])
    for index in bad:
        if not 0 <= index < args.pods:
            raise ValueError(f"--bad {index} is not a pod index (0..{args.pods - 1})")
    return [dataclasses.replace(base, bad=i in bad) for i in range(args.pods)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m equilibrium.lab.fleet",
        description="Run a fleet of demo pods on loopback; prints the pod table as JSON.",
    )
    p.add_argument("--pods", type=int, default=5, help="number of pods (default 5)")
    p.add_argument("--bad", type=int, action="append", help="index of a bad pod (repeatable)")
    p.add_argument("--bad-delay", type=float, default=0.5, help="added seconds (default 0.5)")
    p.add_argument("--bad-fraction", type=float, default=0.5, help="share of slow answers")
    p.add_argument("--service-time", type=float, default=0.003, help="base seconds (0.003)")
    p.add_argument("--jitter", type=float, default=0.001, help="± uniform seconds (0.001)")
    p.add_argument("--capacity", type=int, default=None, help="concurrent servers per pod")
    p.add_argument("--service-rate", type=float, default=200.0, help="mu per server, 1/s")
    p.add_argument("--spec", default=None, help="JSON list of per-pod PodBehaviour objects")
    p.add_argument("--seed", type=int, default=1, help="RNG seed (default 1)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--watch-stdin", action="store_true", help="exit when stdin reaches end of file"
    )
    return p


async def _run(args: argparse.Namespace) -> int:
    behaviours = behaviours_from_args(args)
    runners, table = await serve_fleet(behaviours, args.seed, args.host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sys.stdout.write(json.dumps({"pods": table}) + "\n")
    sys.stdout.flush()
    watcher = None
    if args.watch_stdin:
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

        async def watch() -> None:
            while await reader.read(1024):
                pass
            stop.set()

        watcher = asyncio.create_task(watch())
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    for runner in runners:
        await runner.cleanup()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except ValueError as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return 2


# --- the handle the demo and the benchmark use -------------------------------------------


@dataclass(frozen=True, slots=True)
class PodInfo:
    name: str
    url: str


class Fleet:
    """A running fleet subprocess: its pods, and control of their behaviour at runtime."""

    def __init__(self, child: Any, pods: list[PodInfo]) -> None:
        self.child = child
        self.pods = pods
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    async def start(cls, fleet_args: Sequence[str], stderr_path: str | None = None) -> Fleet:
        """Start ``python -m equilibrium.lab.fleet *fleet_args`` and read its pod table."""
        from equilibrium.lab.processes import ChildProcess

        argv = [sys.executable, "-m", "equilibrium.lab.fleet", "--watch-stdin", *fleet_args]
        child = await ChildProcess.start("fleet", argv, stderr_path=stderr_path)
        try:
            line = await asyncio.wait_for(child.readline(), 20.0)
            if not line:
                status = await asyncio.wait_for(child.proc.wait(), 5.0)
                where = f"; see {stderr_path}" if stderr_path else ""
                raise RuntimeError(f"fleet exited ({status}) without a pod table{where}")
            table = json.loads(line)["pods"]
        except BaseException:
            await child.stop()
            raise
        return cls(child, [PodInfo(p["name"], p["url"]) for p in table])

    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.pods]

    def pod_by_url(self) -> dict[str, str]:
        return {p.url: p.name for p in self.pods}

    async def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0))
        return self._session

    async def control(self, index: int, **changes: Any) -> dict[str, Any]:
        """Change pod ``index``'s behaviour (see :class:`PodBehaviour`); returns its stats."""
        session = await self._client()
        async with session.post(self.pods[index].url + CONTROL_PATH, json=changes) as resp:
            body = await resp.json()
            if resp.status != 200:
                raise ValueError(f"{self.pods[index].name}: {body.get('error')}")
            return dict(body)

    async def stats(self) -> list[dict[str, Any]]:
        session = await self._client()
        out = []
        for pod in self.pods:
            async with session.get(pod.url + STATS_PATH) as resp:
                out.append(dict(await resp.json()))
        return out

    async def reset(self, seed: int, **changes: Any) -> None:
        """Clear every pod's counters and re-seed its RNG (``seed``), applying ``changes``."""
        for index in range(len(self.pods)):
            await self.control(index, reset=True, seed=seed, **changes)

    async def stop(self) -> None:
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
            self._session = None
        await self.child.stop()


if __name__ == "__main__":
    sys.exit(main())
