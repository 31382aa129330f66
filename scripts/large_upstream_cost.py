"""What one large upstream costs the sidecar off the request path: a change of its endpoint set
and a tick while nobody calls it (a stranger's finding: a Service of 5 x 1,000 endpoints that
got no traffic stalled every other upstream's requests).

    python scripts/large_upstream_cost.py                 # 100, 1,000 and 2,000 endpoints
    python scripts/large_upstream_cost.py --sizes 5000

Prints, for each size, the best of three of: ``UpstreamTable.apply`` with one endpoint fewer
(a slice change, as discovery applies it: the set, the resize, a tick) and one tick of the idle
group, once a request woke it (before its first request a discovered group is dormant and costs
neither). In-process, no I/O; the sidecar runs both on its event loop.
"""

from __future__ import annotations

import argparse
import platform
import time

from mesh.profiles import get_profile
from sidecar.upstreams import UpstreamTable


def measure(size: int, rounds: int = 3) -> tuple[float, float]:
    table = UpstreamTable("equilibrium", get_profile("balanced"))
    endpoints = [f"http://10.{j // 62500}.{j // 250 % 250}.{j % 250 + 1}:8080"
                 for j in range(size + rounds)]
    now = 1000.0
    table.apply({"big": endpoints[:size]}, now, source="discovery")
    table.get("big")  # a request wakes it (a discovered group is dormant until then)
    applies, ticks = [], []
    for r in range(rounds):
        now += 0.5
        started = time.perf_counter()
        table.apply({"big": endpoints[r + 1:size + r]}, now, source="discovery")
        applies.append(time.perf_counter() - started)
        group = table.get("big")
        assert group is not None
        for _ in range(2):  # the second one: nothing changed since the first
            now += 0.5
            started = time.perf_counter()
            group.tick(now)
        ticks.append(time.perf_counter() - started)
    return min(applies), min(ticks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,2000",
                        help="endpoint counts, comma-separated (100,1000,2000)")
    args = parser.parse_args()
    print(f"python scripts/large_upstream_cost.py --sizes {args.sizes}")
    print(f"{platform.node()}, Python {platform.python_version()}\n")
    print("| endpoints | a slice change (apply) | an idle tick |")
    print("| ---: | ---: | ---: |")
    for size in (int(s) for s in args.sizes.split(",")):
        apply_s, tick_s = measure(size)
        print(f"| {size:,} | {apply_s * 1000:,.1f} ms | {tick_s * 1000:,.1f} ms |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
