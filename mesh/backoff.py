"""Exponential backoff with equal jitter: how long to wait before the next reconnect.

Owns the one backoff formula of the project (Kubernetes watches, the sidecar's and the
signaler's Redis loops): after the n-th failure in a row (n = 0 for the first) the ceiling is
``c = min(cap, base * 2**n)`` and the wait is uniform in ``[c/2, c]`` -- "equal jitter" in
Brooker, "Exponential Backoff And Jitter" (AWS Architecture Blog, 2015). Half the ceiling is
always waited, so a fleet of clients never hammers a server with zero waits; the other half is
random, so clients that failed together do not retry together. Pure: the random generator is
passed in; nothing here sleeps or reads a clock.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

_MAX_DOUBLINGS = 60  # 2**60 * any sane base is far past any cap; keeps floats finite


def backoff_ceiling(failures: int, base: float, cap: float) -> float:
    """The longest wait after ``failures`` earlier failures in a row: ``min(cap, base*2**n)``
    (a base above the cap waits the cap from the start)."""
    return min(cap, base * 2.0 ** min(max(failures, 0), _MAX_DOUBLINGS))


def backoff_delay(failures: int, base: float, cap: float, rng: random.Random) -> float:
    """A wait drawn uniformly from ``[c/2, c]``, ``c`` = :func:`backoff_ceiling`."""
    ceiling = backoff_ceiling(failures, base, cap)
    return rng.uniform(ceiling / 2, ceiling)


@dataclass(slots=True)
class Backoff:
    """The failure count of one reconnect loop: :meth:`next` after a failure gives the wait
    and counts it; :meth:`reset` after a success starts over at ``base``."""

    rng: random.Random
    base: float = 0.2
    cap: float = 30.0
    attempts: int = 0

    def __post_init__(self) -> None:
        if not (0 < self.base < math.inf and 0 < self.cap < math.inf):
            raise ValueError(f"backoff: base and cap must be positive and finite, got "
                             f"base={self.base}, cap={self.cap}")

    def next(self) -> float:
        delay = backoff_delay(self.attempts, self.base, self.cap, self.rng)
        self.attempts += 1
        return delay

    def reset(self) -> None:
        self.attempts = 0
