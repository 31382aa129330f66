"""The event loop of one simulated run: one policy, one scenario, virtual time.

Owns :func:`simulate`: a binary heap of ``(time, sequence, kind, data)`` events (the sequence
number breaks ties in the order events were scheduled, so a run is a function of its seed)
and the life of every request:

1. the client's open-loop schedule (``rate`` per sidecar, evenly spaced from a random phase,
   as :mod:`equilibrium.lab.loadgen` schedules; or Poisson) makes an arrival;
2. the sidecar routes it (:meth:`SimSidecar.route`) and sends it; it reaches the pod one
   ``network`` delay later;
3. the pod serves it at once (no server limit), starts it on a free server, or queues it
   FIFO; a pod that is gone refuses it, and the refusal reaches the sidecar one delay later,
   which retries on an endpoint not tried yet as the proxy does. Where the pod's own events
   would change nothing -- a pod with servers that is never bad, never heals, leaves or
   joins, and whose service times are not constant -- the request's departure is computed
   when it is sent (:meth:`Pod.departure`, the same times from the same draws) and only its
   response is an event: two events per request instead of four. (A response scheduled
   earlier would come first among events at the very same instant; with continuous service
   times such ties do not happen, with constant ones they do, so those pods keep events;
   ``--jitter`` draws go to the requests in another order: the same distribution);
4. the response reaches the sidecar one delay after the pod finished (plus the bad pod's
   extra delay, after its server is released, as in the real fleet), the policy observes it,
   and the client's latency (from the intended start, plus the fixed ``overhead`` of the
   client-to-sidecar hop and the proxy's own work) is recorded.

Beside the requests: each sidecar's policy tick every ``tick_interval`` (at its own phase),
for ``equilibrium-ce`` each sidecar's signaling round every epoch (at its own phase) and the
signaler's epoch (at ``signaler_phase``), and the scenario's timeline (a pod heals, leaves or
joins -- sidecars learn of the new endpoint set ``discovery_delay`` later -- sidecars leave or
join). Records go into compact arrays (:class:`Records`), never one object per request.

With ``Knobs.cohort`` above 1, clients ``i`` with the same ``i // cohort`` share one sidecar
(what they route by is learned once); each client still has its own arrivals and records.
A cohort's sidecar ticks and signals while any of its clients is there.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import random
import time
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from equilibrium.lab.simulate.plane import SimPlane
from equilibrium.lab.simulate.pods import Pod
from equilibrium.lab.simulate.scenarios import Setup
from equilibrium.lab.simulate.sidecar import SimSidecar
from mesh.profiles import StrategyProfile, get_profile

CE_POLICY = "equilibrium-ce"
ARRIVE, POD_IN, POD_DONE, RESPONSE, REFUSED, TICK, ROUND, EPOCH, CHANGE, DISCOVER = range(10)
_REQUEST_EVENTS = frozenset({POD_IN, POD_DONE, RESPONSE, REFUSED})
#: the cyclic collector's thresholds while a run's events are handled: a fleet holds millions
#: of long-lived objects (each sidecar's stats and windows), and with the default thresholds
#: every full collection walks all of them (7 % of a run's CPU at 1,000 sidecars x 100 pods,
#: docs/benchmarks.md); young generations are still collected, full collections (nearly)
#: never. Restored when the run ends.
LONG_RUN_COLLECTOR = (100_000, 50, 1_000)


@dataclass(frozen=True, slots=True)
class Knobs:
    """What the run models beside the scenario (seconds)."""

    network: float = 0.001
    """one way between a sidecar and a pod (the policy sees two of them in every latency)"""
    overhead: float = 0.003
    """client to sidecar and back, plus the proxy's own work: in the client's latency only"""
    jitter: float = 0.0
    """mean of an exponential extra delay on every response (proxy and scheduling noise on a
    busy machine); seen by the policy and the client alike; 0: none"""
    arrivals: str = "uniform"
    discovery_delay: float = 1.0
    epoch: float = 1.0
    tokens: int = 16
    signaler_phase: float = 0.5
    strategy: str = "balanced"
    cohort: int = 1
    """clients that share one sidecar's routing state (policy, retry budget, signaling): each
    keeps its own arrivals and records, but clients ``i`` with the same ``i // cohort`` learn
    as one, which is what makes 10,000 clients x 1,000 pods fit in memory; 1 (the default):
    every client has its own sidecar (full fidelity)"""

    def __post_init__(self) -> None:
        if self.cohort < 1:
            raise ValueError(f"cohort must be >= 1, got {self.cohort}")


@dataclass(slots=True)
class Records:
    """One run's requests, column-wise: intended start, client latency, pod (-1: none), ok,
    and the sidecar that sent it."""

    intended: array[float] = field(default_factory=lambda: array("d"))
    latency: array[float] = field(default_factory=lambda: array("d"))
    pod: array[int] = field(default_factory=lambda: array("i"))
    ok: array[int] = field(default_factory=lambda: array("b"))
    sidecar: array[int] = field(default_factory=lambda: array("i"))

    def __len__(self) -> int:
        return len(self.intended)


@dataclass(slots=True)
class RunResult:
    policy: str
    records: Records
    pod_names: list[str]
    events: int
    wall_seconds: float
    cpu_seconds: float
    sidecars: dict[str, Any]
    plane: dict[str, Any] | None
    retries: int


def endpoint_id(index: int) -> str:
    return f"http://pod-{index}.sim:8080"


def endpoints_of(setup: Setup) -> tuple[list[str], list[str]]:
    """Every pod's endpoint (by index), and those listed at the start (not absent)."""
    endpoints = [endpoint_id(i) for i in range(len(setup.pods))]
    return endpoints, [e for i, e in enumerate(endpoints) if i not in setup.absent]


def make_pods(setup: Setup, seed: int, direct: bool = True) -> tuple[list[Pod], frozenset[int]]:
    """The run's pods, each with its own random stream, and which are answered without events
    of their own: a pod with servers that is never bad, never heals, leaves or joins, and whose
    service times are not constant computes each departure on arrival (``direct``;
    :meth:`Pod.start_direct`), and a pod without a server limit that never changes is
    answered when the attempt is sent (the indices returned). Not with constant service
    times: there responses tie with other events to the instant, and the order of a tie
    follows when the response was scheduled."""
    pods = [Pod(f"pod-{i}", spec, random.Random(f"{seed}:pod:{i}"))
            for i, spec in enumerate(setup.pods)]
    for i in setup.absent:
        pods[i].up = False
    changing = {change[2] for change in setup.changes
                if change[1] in ("heal", "pod-leave", "pod-join")} | set(setup.absent)
    for i, pod in enumerate(pods):
        if direct and pod.spec.servers is not None and not pod.spec.bad \
                and pod.spec.distribution != "constant" and i not in changing:
            pod.start_direct()  # its requests leave when computed, not by events
    instant = frozenset(i for i, pod in enumerate(pods)
                        if pod.spec.servers is None and i not in changing)
    return pods, instant


def response_delay(seed: int, pods: int, knobs: Knobs) -> Callable[[float, int], float]:
    """When a response leaving pod ``j`` at ``t`` reaches the sidecar: one network delay,
    and with ``--jitter`` an exponential extra drawn from the pod's own stream (so that each
    pod's draws go in the order of its own responses, however the engine interleaves the
    pods)."""
    net = knobs.network
    if knobs.jitter <= 0:
        return lambda t, j: t + net
    rate = 1.0 / knobs.jitter
    draws = [random.Random(f"{seed}:jitter:{j}").expovariate for j in range(pods)]
    return lambda t, j: t + net + draws[j](rate)


def simulate(setup: Setup, policy: str, seed: int, knobs: Knobs = Knobs(),
             max_events: int = 2_000_000_000, observed: bool = False,
             direct: bool = True) -> RunResult:
    """Run ``setup`` with every sidecar on ``policy`` (``equilibrium-ce``: ``equilibrium``
    following the simulated signaler); the same seed gives the same records. ``observed``
    builds every sidecar's snapshot at every tick, as the proxy does, even where nothing reads
    it (always so for ``equilibrium-ce``, whose signaling task reads it). ``direct`` False
    serves every pod by events, even those whose departures could be computed on arrival
    (:meth:`Pod.departure`; a test holds both to the same records)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    master = random.Random(f"{seed}:{setup.scenario}")
    base_policy = "equilibrium" if policy == CE_POLICY else policy
    profile: StrategyProfile = get_profile(knobs.strategy)
    tick_interval = profile.tick_interval
    endpoints, listed = endpoints_of(setup)
    index_of = {e: i for i, e in enumerate(endpoints)}
    pods, instant = make_pods(setup, seed, direct)

    now = 0.0

    def clock() -> float:
        return now

    plane = (SimPlane(clock, epoch=knobs.epoch, tokens=knobs.tokens, seed=seed)
             if policy == CE_POLICY else None)
    heap: list[tuple[float, int, int, Any]] = []
    seq = itertools.count()
    push, pop = heapq.heappush, heapq.heappop
    cohort = knobs.cohort
    learners: dict[int, SimSidecar] = {}  # by cohort (index // cohort)
    members: dict[int, int] = {}  # clients of each cohort still there
    sidecars: dict[int, SimSidecar] = {}  # each client's (its cohort's) sidecar
    gap = 1.0 / setup.rate
    poisson = knobs.arrivals == "poisson"
    arrival_rngs: dict[int, random.Random] = {}

    def join(index: int, at: float) -> None:
        phase = random.Random(f"{seed}:phase:{index}")
        arrival_rngs[index] = phase
        push(heap, (at + phase.random() * gap, next(seq), ARRIVE, index))
        c = index // cohort
        sc = learners.get(c)
        if sc is None:  # the cohort's first client brings its sidecar
            rng = random.Random(f"{seed}:sidecar:{c}")
            sc = learners[c] = SimSidecar(c, f"sim-{c:05d}", base_policy, profile, listed, rng,
                                          at, observed=observed or policy == CE_POLICY)
            members[c] = 0
            push(heap, (at + phase.random() * tick_interval, next(seq), TICK, sc))
            if plane is not None:
                plane.join(sc, master.randrange(2**32))
                push(heap, (at + phase.random() * knobs.epoch, next(seq), ROUND, sc))
        members[c] += 1
        sidecars[index] = sc

    def leave(index: int) -> None:
        c = index // cohort
        del sidecars[index]
        members[c] -= 1
        if not members[c]:  # the cohort's last client takes its sidecar along
            del learners[c], members[c]
            if plane is not None:
                plane.leave(c)

    def alive(sc: SimSidecar) -> bool:
        return learners.get(sc.index) is sc

    for i in range(setup.sidecars):
        join(i, 0.0)
    next_index = setup.sidecars
    if plane is not None:
        push(heap, (knobs.signaler_phase * knobs.epoch, next(seq), EPOCH, None))
    for change in setup.changes:
        push(heap, (setup.warmup + change[0], next(seq), CHANGE, change))

    rec = Records()
    r_intended, r_latency, r_pod = rec.intended.append, rec.latency.append, rec.pod.append
    r_ok, r_sidecar = rec.ok.append, rec.sidecar.append
    net, overhead, end = knobs.network, knobs.overhead, setup.total
    back = response_delay(seed, len(pods), knobs)
    retries = 0
    events = 0

    def attempt(index: int, sc: SimSidecar, t: float, intended: float,
                tried: tuple[str, ...]) -> None:
        endpoint = sc.route(t, tried)
        if endpoint is None:  # nothing left to try: the proxy answers with an error
            r_intended(intended), r_latency(t - intended + overhead), r_pod(-1), r_ok(0)
            r_sidecar(index)
            return
        j = index_of[endpoint]
        pod = pods[j]
        req = [index, j, intended, t, tried, endpoint, sc]
        if pod.direct:
            push(heap, (back(pod.departure(t + net), j), next(seq), RESPONSE, req))
        elif j in instant and pod.up:
            service = pod.draw_service() + pod.draw_extra()
            push(heap, (back(t + net + service, j), next(seq), RESPONSE, req))
        else:
            push(heap, (t + net, next(seq), POD_IN, req))

    collector = gc.get_threshold()
    gc.set_threshold(*LONG_RUN_COLLECTOR)
    try:
        while heap and events < max_events:
            t, _, kind, data = pop(heap)
            if t > end and kind not in _REQUEST_EVENTS:
                continue  # past the end only requests in flight finish (drained, as the bench)
            now = t
            events += 1
            if kind == ARRIVE:
                sc = sidecars.get(data)
                if sc is None:
                    continue  # the sidecar left
                rng = arrival_rngs[data]
                push(heap, (t + (rng.expovariate(setup.rate) if poisson else gap), next(seq),
                            ARRIVE, data))
                attempt(data, sc, t, t, ())
            elif kind == RESPONSE:
                sc = data[6]
                if not alive(sc):
                    continue
                sc.answered(data[5], data[3], t)
                if data[0] not in sidecars:
                    continue  # its client left (the cohort's sidecar stays)
                r_intended(data[2]), r_latency(t - data[2] + overhead), r_pod(data[1]), r_ok(1)
                r_sidecar(data[0])
            elif kind == POD_IN:
                pod = pods[data[1]]
                if not pod.up:
                    push(heap, (t + net, next(seq), REFUSED, data))
                elif pod.spec.servers is None:
                    service = pod.draw_service() + pod.draw_extra()
                    push(heap, (back(t + service, data[1]), next(seq), RESPONSE, data))
                elif pod.busy < pod.spec.servers:
                    pod.busy += 1
                    push(heap, (t + pod.draw_service(), next(seq), POD_DONE, data))
                else:
                    pod.queue.append(data)
            elif kind == POD_DONE:
                pod = pods[data[1]]
                pod.busy -= 1
                push(heap, (back(t + pod.draw_extra(), data[1]), next(seq), RESPONSE, data))
                servers = pod.spec.servers
                while pod.queue and (servers is None or pod.busy < servers):
                    pod.busy += 1
                    push(heap, (t + pod.draw_service(), next(seq), POD_DONE, pod.queue.popleft()))
            elif kind == REFUSED:
                sc = data[6]
                if not alive(sc):
                    continue
                sc.refused(data[5], data[3], t)
                if data[0] not in sidecars:
                    continue
                tried = (*data[4], data[5])
                if sc.may_retry(tried):
                    retries += 1
                    attempt(data[0], sc, t, data[2], tried)
                else:
                    r_intended(data[2]), r_latency(t - data[2] + overhead), r_pod(-1), r_ok(0)
                    r_sidecar(data[0])
            elif kind == TICK:
                if alive(data):
                    data.tick(t)
                    push(heap, (t + tick_interval, next(seq), TICK, data))
            elif kind == ROUND:
                if alive(data) and plane is not None:
                    plane.sidecar_round(data.index)
                    push(heap, (t + knobs.epoch, next(seq), ROUND, data))
            elif kind == EPOCH:
                assert plane is not None
                plane.signaler_epoch()
                push(heap, (t + knobs.epoch, next(seq), EPOCH, None))
            elif kind == CHANGE:
                _, what, arg = data
                if what == "heal":
                    pods[arg].change(pods[arg].spec.healed())
                elif what in ("pod-leave", "pod-join"):
                    pods[arg].up = what == "pod-join"
                    if pods[arg].up:
                        listed.append(endpoints[arg])
                    else:
                        listed.remove(endpoints[arg])
                    push(heap, (t + knobs.discovery_delay, next(seq), DISCOVER, tuple(listed)))
                elif what == "sidecars-leave":
                    for index in sorted(sidecars)[:arg]:
                        leave(index)
                elif what == "sidecars-join":
                    for _ in range(arg):
                        join(next_index, t)
                        next_index += 1
            elif kind == DISCOVER:
                for sc in learners.values():
                    sc.set_endpoints(data, t)
    finally:
        gc.set_threshold(*collector)

    for sc in learners.values():
        sc.finish()
    result_sidecars = _sidecar_states(learners)
    plane_state: dict[str, Any] | None = None
    if plane is not None:
        plane_state = {**plane.state(), "following_at_end": plane.following()}
        plane.close()
    return RunResult(policy, rec, [pod.name for pod in pods], events, time.perf_counter() - started,
                     time.process_time() - cpu_started, result_sidecars, plane_state, retries)


def sidecar_states(states: Iterable[tuple[int, float, float, bool, bool]]) -> dict[str, Any]:
    """The sidecars' own view at the end, from each one's (index, Wardrop gap, flapping,
    converged, following) in index order: Wardrop gap, flapping, converged, following."""
    gaps, flaps, converged, following = [], [], 0, 0
    for _, gap, flapping, is_converged, is_following in states:
        gaps.append(gap)
        flaps.append(flapping)
        converged += int(is_converged)
        following += int(is_following)
    n = len(gaps)
    return {
        "count": n,
        "nash_gap_mean": sum(gaps) / n if n else None,
        "nash_gap_max": max(gaps, default=None),
        "flapping_max": max(flaps, default=None),
        "converged": converged,
        "following": following,
    }


def _sidecar_states(sidecars: dict[int, SimSidecar]) -> dict[str, Any]:
    """The sidecars' own view at the end: Wardrop gap, flapping, converged, following."""
    return sidecar_states(
        (c, snap.nash_gap, snap.flapping, snap.converged, snap.following)
        for c, sc in sidecars.items() if (snap := sc.group.snapshot) is not None)
