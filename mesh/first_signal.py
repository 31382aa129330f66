"""When a new policy's wait for its first recommendation starts: a three-state machine.

Owns :class:`FirstSignalWait`. A policy that joins a coordinated mesh keeps its starting, even
weights until its first recommendation or for a few epochs
(:meth:`mesh.policy.FollowingPolicy.await_signal`). The signaler plans only for sidecars that
report demand, so the wait is started when the policy is first seen and started again, once,
when its first traffic shows; after that the wait runs its course. Pure: the caller feeds one
observation an epoch ("has this policy seen traffic?") and carries out the answer ("(re)start
the wait now"); a new policy object gets a new machine.

The transitions are data (:data:`TRANSITIONS`), as in h11's state tables::

    NEW  --quiet-->   IDLE  (start the wait)
    NEW  --traffic--> BUSY  (start the wait)
    IDLE --quiet-->   IDLE
    IDLE --traffic--> BUSY  (start the wait again, counted from the traffic)
    BUSY --any-->     BUSY
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum


class FirstSignalStage(Enum):
    """Where a policy is in its wait for a first recommendation."""

    NEW = "new"
    """Not told to wait yet."""
    IDLE = "idle"
    """Waiting since it was first seen, before any traffic."""
    BUSY = "busy"
    """Waiting since its first traffic (or done waiting): nothing more to start."""


TRANSITIONS: Mapping[tuple[FirstSignalStage, bool], tuple[FirstSignalStage, bool]] = {
    # (stage, traffic seen) -> (next stage, start the wait now)
    (FirstSignalStage.NEW, False): (FirstSignalStage.IDLE, True),
    (FirstSignalStage.NEW, True): (FirstSignalStage.BUSY, True),
    (FirstSignalStage.IDLE, False): (FirstSignalStage.IDLE, False),
    (FirstSignalStage.IDLE, True): (FirstSignalStage.BUSY, True),
    (FirstSignalStage.BUSY, False): (FirstSignalStage.BUSY, False),
    (FirstSignalStage.BUSY, True): (FirstSignalStage.BUSY, False),
}


class FirstSignalWait:
    """One policy's machine (see the module docstring)."""

    __slots__ = ("stage",)

    def __init__(self) -> None:
        self.stage = FirstSignalStage.NEW

    def step(self, traffic: bool) -> bool:
        """Feed this epoch's observation; True when the wait must be (re)started now."""
        self.stage, start = TRANSITIONS[(self.stage, traffic)]
        return start
