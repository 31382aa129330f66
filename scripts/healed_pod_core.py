"""A healed pod's return without probes, in the routing core alone (no proxy, no pods).

One ``equilibrium`` policy picks for a caller at ``--rate`` requests a second among three
pods, ticked as the sidecar ticks it: two answer in 5-7 ms, the third is 500 ms slow on half
its requests until it heals at 30 s. Printed: for each seed the seconds from the heal to the
first tick at which the healed pod's weight is 80 % of its fair share (the median and the
worst), then what pods bad in other ways are sent (requests, and answers over 100 ms): one
slow on half its requests for 60 s, and ones slow on a tenth and a quarter of them for 120 s.
The requests are not hedged here: what the proxy's hedging would race is counted as sent.

    python scripts/healed_pod_core.py                 # 50 requests/s, 20 seeds, hedged profile
    python scripts/healed_pod_core.py --rate 100 --seeds 10
    python scripts/healed_pod_core.py --unhedged      # the profile without hedged exploration

(docs/benchmarks.md, session 36.) Deterministic: the same arguments print the same numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh.policies import make_policy
from mesh.policy import Outcome
from mesh.profiles import get_profile

PODS = [f"http://127.0.0.1:{8000 + i}" for i in range(3)]  # names only: nothing is sent
Third = Callable[[float, random.Random], float]


def run(third: Third, seconds: float, seed: int, hedged: bool,
        rate: float) -> tuple[list[tuple[float, float]], int, int]:
    """The third pod's weight after each tick, the requests it was sent and how many of
    them took over 100 ms."""
    profile = dataclasses.replace(get_profile("balanced"), hedged=hedged)
    policy = make_policy("equilibrium", profile)
    policy.set_endpoints(PODS, 0.0)
    rng = random.Random(seed)
    now, next_tick = 0.0, profile.tick_interval
    weights: list[tuple[float, float]] = []
    pending: list[tuple[float, int, Outcome]] = []
    sent = slow = n = 0
    while now < seconds:
        while pending and pending[0][0] <= now:
            policy.on_outcome(heapq.heappop(pending)[2])
        if now >= next_tick:
            policy.tick(now)
            weights.append((now, policy.snapshot().weights[PODS[2]]))
            next_tick += profile.tick_interval
        pod = policy.pick(rng, now)
        assert pod is not None
        policy.on_start(pod, now)
        if pod == PODS[2]:
            took = third(now, rng)
            sent += 1
            slow += took > 0.1
        else:
            took = 0.005 + 0.002 * rng.random()
        n += 1
        outcome = Outcome(pod, took, True, now + took, sent_at=now)
        heapq.heappush(pending, (outcome.now, n, outcome))
        now += 1.0 / rate
    return weights, sent, slow


def slow_on(share: float, until: float = float("inf"), slow: float = 0.5) -> Third:
    def took(at: float, rng: random.Random) -> float:
        if at < until and rng.random() < share:
            return slow
        return 0.005 + 0.002 * rng.random()
    return took


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=50.0, help="requests a second (50)")
    p.add_argument("--seeds", type=int, default=20, help="seeds 1..N (20)")
    p.add_argument("--unhedged", action="store_true", help="the profile without hedging")
    args = p.parse_args()
    hedged = not args.unhedged
    back = []
    for seed in range(1, args.seeds + 1):
        weights, _, _ = run(slow_on(0.5, until=30.0), 60.0, seed, hedged, args.rate)
        at = next((t for t, w in weights if t >= 30.0 and w >= 0.8 / 3), None)
        back.append(round(at - 30.0, 2) if at is not None else float("inf"))
    print(f"healed at 30 s, back to 80 % of its fair share (s after): {back}")
    print(f"  median {statistics.median(back):.2f} s, worst {max(back):.2f} s")
    for share, seconds, slow in ((0.5, 60.0, 0.5), (0.1, 120.0, 0.5), (0.25, 120.0, 0.5),
                                 (0.1, 120.0, 3.0)):
        counts = [run(slow_on(share, slow=slow), seconds, seed, hedged, args.rate)[1:]
                  for seed in range(1, 6)]
        print(f"{slow:g} s slow on {share:.0%} for {seconds:.0f} s, seeds 1-5 (sent, slow): "
              f"{counts}; "
              f"mean {statistics.mean(c[0] for c in counts):.1f} sent, "
              f"{statistics.mean(c[1] for c in counts):.1f} slow")
    return 0


if __name__ == "__main__":
    sys.exit(main())
