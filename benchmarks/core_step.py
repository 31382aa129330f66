"""The routing core's own CPU: one request's step (pick, start, outcome) and one tick.

Drives the ``equilibrium`` policy of ``mesh/`` directly, in this process, with no proxy and
no I/O: the part of every proxied request that is the mesh's own (the sidecar calls the same
three methods per attempt, :mod:`mesh.policy`) and the tick every sidecar runs per upstream,
which the simulator (``equilibrium simulate``) runs for each simulated sidecar. Virtual
time: a request every 2 ms, each answered after three more were sent (2–4 ms, one endpoint
20 ms slower), a tick every 50 requests. The per-request figure includes making the
``Outcome``; the tick's, the snapshot the proxy builds after it.

With ``--baseline DIR`` (another checkout) the same runs alternate between the two cores, in
separate subprocesses, ``--rounds`` times; the table gives each one's best (the machine's
noise only adds).

    python benchmarks/core_step.py [--endpoints 4,100] [--requests 40000] [--rounds 3]
                                   [--baseline DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_RUN = """
import json, random, sys, time
sys.path.insert(0, {root!r})
from mesh.policies import make_policy
from mesh.policy import Outcome
from mesh.profiles import get_profile

def run(k, n_req, tick_every=50):
    policy = make_policy("equilibrium", get_profile("balanced"))
    endpoints = [f"10.0.0.{{i}}:80" for i in range(k)]
    now = 0.0
    policy.set_endpoints(endpoints, now)
    rng = random.Random(1)
    extra = {{e: 0.002 + 0.001 * (i % 3) + (0.02 if i == 0 else 0.0)
             for i, e in enumerate(endpoints)}}
    waiting = []
    step = tick = 0.0
    ticks = 0
    for n in range(n_req):
        now += 0.002
        a = time.perf_counter()
        e = policy.pick(rng, now)
        policy.on_start(e, now)
        waiting.append((e, now))
        if len(waiting) > 3:
            e0, sent = waiting.pop(0)
            policy.on_outcome(Outcome(e0, now - sent + extra[e0], True, now))
        b = time.perf_counter()
        step += b - a
        if n % tick_every == 0:
            policy.tick(now)
            policy.snapshot()
            tick += time.perf_counter() - b
            ticks += 1
    return step / n_req * 1e6, tick / ticks * 1e6

print(json.dumps({{k: run(k, {requests}) for k in {endpoints}}}))
"""


def measure(root: Path, endpoints: list[int], requests: int) -> dict[str, list[float]]:
    """One run of every size in a fresh interpreter importing ``root``'s core."""
    code = _RUN.format(root=str(root), endpoints=endpoints, requests=requests)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=600, cwd=root)
    result: dict[str, list[float]] = json.loads(out.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints", default="4,100",
                        help="comma-separated endpoint counts (4,100)")
    parser.add_argument("--requests", type=int, default=40000, help="requests a run (40000)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each core (3)")
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with")
    args = parser.parse_args(argv)
    sizes = [int(k) for k in args.endpoints.split(",") if k.strip()]
    if not sizes or min(sizes) < 1 or args.requests < 100 or args.rounds < 1:
        parser.error("need endpoint counts >= 1, --requests >= 100 and --rounds >= 1")
    cores = {"this checkout": ROOT}
    if args.baseline is not None:
        if not (args.baseline / "mesh" / "policies.py").is_file():
            parser.error(f"{args.baseline} holds no mesh/policies.py")
        cores["baseline"] = args.baseline.resolve()
    best: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.rounds):
        for name, root in cores.items():
            run = measure(root, sizes, args.requests)
            mine = best.setdefault(name, {})
            for k, (step, tick) in run.items():
                old = mine.get(k, [float("inf"), float("inf")])
                mine[k] = [min(old[0], step), min(old[1], tick)]
    print(f"`python {' '.join(['benchmarks/core_step.py', *(argv or sys.argv[1:])])}`, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, "
          f"Python {platform.python_version()}, best of {args.rounds}")
    print()
    print("| core | endpoints | request step | tick |")
    print("| --- | ---: | ---: | ---: |")
    for name, rows in best.items():
        for k, (step, tick) in rows.items():
            print(f"| {name} | {k} | {step:.1f} µs | {tick:.0f} µs |")
    if "baseline" in best:
        print()
        for k in best["baseline"]:
            ours, theirs = best["this checkout"][k], best["baseline"][k]
            print(f"- {k} endpoints: request step {ours[0] / theirs[0]:.2f}x the baseline's, "
                  f"tick {ours[1] / theirs[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
