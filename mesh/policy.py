"""The one seam between measuring and choosing: the routing ``Policy`` protocol.

A policy owns the estimators of one upstream's endpoints and picks an endpoint for each
request. The proxy calls it in this order for every request::

    endpoint = policy.pick(rng, now, exclude)      # request path: reads the snapshot only
    policy.on_start(endpoint, now)                  # in-flight + 1
    ...forward...
    policy.on_outcome(Outcome(endpoint, latency, ok, now, congestion))   # in-flight - 1

off the request path, ``policy.on_probe(endpoint, report, now)`` with each verified probe answer
(:mod:`mesh.probes`: what the endpoint's inbound sidecar says of its app, an observation beside
the measured requests), and ``policy.tick(now)`` every ``tick_interval`` seconds to rebuild
the routing snapshot (weights) from what was learned; the request path only reads the last
snapshot, which is swapped in whole (as pingora's load-balancer selector is).

Policies differ only in how they choose; measuring is done by :mod:`mesh.estimators`, as
tower separates ``Load`` from ``Balance``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from mesh.estimators import EpochWindow
from mesh.probes import ProbeReport


@dataclass(slots=True)
class Outcome:
    """What the proxy observed for one forwarded request.

    ``latency`` is in seconds from sending the request to the response head (or failure).
    ``ok`` is False for connect errors, timeouts and 5xx answers; such outcomes are charged a
    penalty latency by the estimators. ``congestion`` is the upstream's piggybacked
    ``X-GT-Congestion`` level in [0, 1], when it sent one. ``answered`` says whether a response
    head arrived (a 5xx is answered, a refused connection is not); None means "as ``ok``".
    ``censored``: the request was cancelled after ``latency`` seconds because a hedge of it
    answered first (:mod:`mesh.hedging`): its latency is at least that; not a failure.
    ``void``: the attempt ended for a reason that says nothing about the endpoint (the app's
    own upload broke off or stalled, or the app reset the stream): only its in-flight count
    goes back; no latency, success or failure is learned, so an app cannot push traffic
    away from an endpoint, or towards one, by breaking its own requests.
    ``sent_at``: when the attempt was sent, where ``now - latency`` is not it (an HTTP/2
    call's latency runs to its first message, ``now`` is its end); None: ``now - latency``.
    ``shed``: the endpoint's sidecar refused it for load before its app saw it (signed
    ``X-GT-Refused`` ``queue-full`` or ``queue-timeout``): a failure in the endpoint's cost,
    never one towards an ejection (every pod shedding a reconnect storm was ejected, and the
    callers' weights stayed at 0 for 20 s after the storm had passed).
    ``long``: a declared long request (a long poll or watch its upstream's ``long_paths``
    name, started with ``on_start(..., long=True)``): how long its answer took is the
    request's, not the endpoint's, so an answer teaches nothing; a failure counts as any
    other, charged the failure penalty, not its length (docs/routing.md, "Long polls").

    One is made for every attempt, on the request path; nothing changes it after. Not a
    frozen dataclass for that reason alone: a frozen one's ``__init__`` sets each field
    through ``object.__setattr__`` (with ten fields, 82 bytecode instructions against 32:
    ``scripts/request_cost.py --opcodes``).
    """

    endpoint: str
    latency: float
    ok: bool
    now: float
    congestion: float | None = None
    answered: bool | None = None
    censored: bool = False
    void: bool = False
    sent_at: float | None = None
    shed: bool = False
    long: bool = False

    @property
    def got_answer(self) -> bool:
        """Whether a response head arrived (``answered``, or ``ok`` when not said)."""
        return self.ok if self.answered is None else self.answered


@dataclass(frozen=True, slots=True)
class EndpointView:
    """One endpoint as the policy sees it, for /debug/state, metrics and the demo."""

    endpoint: str
    weight: float
    latency_estimate: float
    regret: float
    in_flight: int
    requests: int
    failures: int
    overruled: bool = False  # a recommendation's share held back by own evidence
    bad: bool = False  # its own outcomes cost over 10x the best pod's: none of the cap's rest
    usable: bool = True  # not ejected nor draining (as of the last tick)
    stalled: float = 0.0  # seconds its unanswered requests waited, counted at the last tick
    long_in_flight: int = 0  # declared long requests waiting there (apart from in_flight)
    ejected: tuple[int, int] = (0, 0)  # ejections so far: for failures, for hanging


@dataclass(frozen=True, slots=True)
class PolicySnapshot:
    """Everything an observer needs about one upstream's routing state at one instant."""

    policy: str
    weights: Mapping[str, float]
    endpoints: Sequence[EndpointView]
    nash_gap: float = 0.0
    flapping: float = 0.0
    converged: bool = False
    following: bool = False
    regret_matrix: Sequence[Sequence[float]] = field(default_factory=tuple)
    usable: int | None = None
    """Endpoints the policy may send to now (not ejected, not draining); None: every one."""


@runtime_checkable
class Policy(Protocol):
    """A routing policy for one upstream service (see the module docstring for the call order)."""

    @property
    def name(self) -> str:
        """The policy's name (what ``--policy`` and the metrics call it)."""

    def set_endpoints(self, endpoints: Sequence[str], now: float) -> None:
        """Replace the endpoint set; state of endpoints that stay is kept."""

    def pick(
        self, rng: random.Random, now: float, exclude: frozenset[str] = frozenset()
    ) -> str | None:
        """Choose an endpoint for one request, never one in ``exclude``; None if none is left."""

    def on_start(self, endpoint: str, now: float, long: bool = False) -> None:
        """A request to ``endpoint`` was sent (``long``: a declared long request, whose
        outcome will say so: it holds no capacity and is no stall)."""

    def on_outcome(self, outcome: Outcome) -> None:
        """A request finished (successfully or not)."""

    def on_answer(self, endpoint: str, now: float) -> None:
        """The answer head of a request to ``endpoint`` came at ``now``, ahead of its
        outcome (an HTTP/2 call's outcome comes at its end): the endpoint is answering."""

    def on_probe(self, endpoint: str, report: ProbeReport, now: float) -> None:
        """A verified probe answer about ``endpoint`` arrived at ``now``."""

    def missed_deadline(self, endpoint: str, now: float) -> bool:
        """A call to ``endpoint`` ran out its caller's deadline at ``now`` (its outcome
        follows): whether another endpoint missed one lately too, so that this one is a
        shed failure, charged but none in a row towards an ejection."""

    def tick(self, now: float) -> None:
        """Off the request path: rebuild the routing snapshot from what was learned."""

    def snapshot(self) -> PolicySnapshot:
        """The current state, for observers."""


@runtime_checkable
class FollowingPolicy(Policy, Protocol):
    """A policy that takes part in the signaling plane: it reports what each epoch showed and
    can follow the signaler's recommendations (``equilibrium``; the baselines do neither).

    The signaling client calls, off the request path: :meth:`take_epoch` once an epoch to
    build the regret summary, :meth:`await_signal` when the policy is new, :meth:`follow` with
    each verified recommendation, and :meth:`stop_following` when the store fails.
    """

    def take_epoch(self) -> Mapping[str, EpochWindow]:
        """Per endpoint, what happened since the previous call (endpoints with no request may
        be absent); the windows restart."""

    def follow(self, weights: Mapping[str, float], expires_at: float) -> None:
        """Adopt a verified recommendation (endpoint -> weight) until ``expires_at`` (on the
        policy's clock)."""

    def await_signal(self, until: float) -> None:
        """Keep the current weights until ``until`` or the first recommendation."""

    def stop_following(self) -> None:
        """Drop the recommendation and any wait: route by local learning from the next tick."""
