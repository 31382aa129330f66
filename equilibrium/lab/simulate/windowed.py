"""The same run on several cores: sidecars in worker processes, pods in one, in time windows.

Owns :func:`simulate_windowed`, the engine behind ``equilibrium simulate --workers N``. The
event engine (:mod:`equilibrium.lab.simulate.engine`) runs a fleet on one core; at 1,000
sidecars x 100 pods nearly all of its time is the sidecars' own work (each policy's pick,
observation and tick), which is independent from one sidecar to the next. Sidecars only meet
at the pods, and a request takes one ``network`` delay to get there and one to come back: that
delay is the *lookahead* of conservative parallel discrete-event simulation (Chandy & Misra
1979, "Distributed simulation: a case study in design and verification of distributed
programs"; Fujimoto 1990, "Parallel discrete event simulation", CACM 33(10)). Time is cut into
windows a little shorter than the delay:

1. each worker process owns the sidecars ``c % N == w`` (``c`` a sidecar's index, or its
   cohort's) and handles, in time order, every event of theirs in the window: arrivals (the
   client's schedule, as in the event engine), the responses and refusals the coordinator
   delivered for the window, ticks and the timeline's sidecar changes; each attempt it sends
   reaches its pod one delay later, so after the window;
2. the coordinator (the calling process) owns the pods: it takes every attempt sent in the
   window, in the order (arrival at the pod, client, attempt), and serves each pod's arrivals
   in time order exactly as the event engine's pods do (FIFO servers, the bad delay, a pod
   gone refuses); every response it makes reaches its sidecar at least one delay later, so
   in a window not yet handed out. It keeps each worker two windows ahead (the responses of
   window k + 2 are all known once the attempts of window k are in), so the workers compute
   while it serves the pods, and a fast worker may run a window ahead of a slow one.

Nothing a sidecar decides depends on another sidecar's events of the same window. Events of
one instant keep the event engine's order: its sequence numbers follow when each event was
scheduled, so every event here carries that time (a response computed as its attempt is
sent, :data:`AT_SENDING`, takes the attempt's) and, within one step, an arrival schedules
the next arrival before its response, as there. The pods see the attempts in the order of
their arrival and draw their service times, and their jitter
(:func:`equilibrium.lab.simulate.engine.response_delay`: each pod its own stream), in the
order of their own arrivals and completions, as the event engine does. So the records, the
event count, the retries and the sidecars' states are the event engine's, bit for bit,
whatever the number of workers (tests hold it on every scenario, with cohorts, jitter,
Poisson arrivals, constant service times, long delays and changes after the end; records are
put in one canonical order, :func:`merged`).

``equilibrium-ce`` is not supported here: its signaler reads every sidecar's summary in one
store each epoch (the event engine runs it).
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import itertools
import multiprocessing
import queue
import random
import threading
import time
from array import array
from typing import Any

import numpy as np

from equilibrium.lab.simulate.engine import (
    CE_POLICY,
    LONG_RUN_COLLECTOR,
    Knobs,
    Records,
    RunResult,
    endpoints_of,
    make_pods,
    response_delay,
    sidecar_states,
)
from equilibrium.lab.simulate.scenarios import Setup
from equilibrium.lab.simulate.sidecar import SimSidecar
from mesh.profiles import get_profile

#: the window is this much shorter than the network delay, so that a response made at a
#: window's first instant lands in a later window whatever the rounding of the sums of times
WINDOW_MARGIN = 1e-6

# what the coordinator hands a worker: (time, kind, payload, when it was scheduled)
RESPONSE, REFUSED, DISCOVER, LISTED, JOIN, LEAVE = range(6)
#: "when it was scheduled" of a response the event engine schedules as the attempt is sent
AT_SENDING = -1.0
DEFAULT_KNOBS = Knobs()
# a worker's own events
_ARRIVE, _TICK, _DELIVERED = range(3)
# the pods' events in the coordinator
_POD_IN, _POD_DONE, _CHANGE = range(3)


def _owner(index: int, cohort: int, workers: int) -> int:
    return (index // cohort) % workers


def _sidecar_timeline(setup: Setup, knobs: Knobs, workers: int,
                      ) -> list[list[tuple[float, int, Any, float]]]:
    """What each worker is told along the run besides responses: sidecars joining and leaving,
    the endpoint set a sidecar joining gets (changed when a pod leaves or joins) and,
    ``discovery_delay`` later, the new set for every sidecar there. All of it follows from the
    scenario alone, so it is worked out before the run. Nothing after the end, which the event
    engine skips too."""
    told: list[list[tuple[float, int, Any, float]]] = [[] for _ in range(workers)]
    end = setup.total
    endpoints, listed = endpoints_of(setup)
    clients = list(range(setup.sidecars))
    next_index = setup.sidecars
    for at, what, arg in sorted(setup.changes, key=lambda c: c[0]):
        t = setup.warmup + at
        if t > end:
            continue
        if what in ("pod-leave", "pod-join"):
            if what == "pod-join":
                listed.append(endpoints[arg])
            else:
                listed.remove(endpoints[arg])
            found = t + knobs.discovery_delay
            for w in range(workers):  # a sidecar that joins from now on starts with it
                told[w].append((t, LISTED, tuple(listed), 0.0))
                if found <= end:  # (the change's own event was scheduled at the start)
                    told[w].append((found, DISCOVER, tuple(listed), t))
        elif what == "sidecars-leave":
            for index in sorted(clients)[:arg]:
                clients.remove(index)
                told[_owner(index, knobs.cohort, workers)].append((t, LEAVE, index, 0.0))
        elif what == "sidecars-join":
            for _ in range(arg):
                clients.append(next_index)
                told[_owner(next_index, knobs.cohort, workers)].append(
                    (t, JOIN, next_index, 0.0))
                next_index += 1
    return told


class _Fleet:
    """One worker's sidecars and clients: the event engine's sidecar half."""

    def __init__(self, setup: Setup, policy: str, seed: int, knobs: Knobs, worker: int,
                 workers: int, observed: bool) -> None:
        self.setup, self.seed, self.knobs = setup, seed, knobs
        self.worker, self.workers = worker, workers
        self.observed = observed
        self.profile = get_profile(knobs.strategy)
        self.policy = policy
        self.tick_interval = self.profile.tick_interval
        self.gap = 1.0 / setup.rate
        self.poisson = knobs.arrivals == "poisson"
        endpoints, self.listed = endpoints_of(setup)
        self.index_of = {e: i for i, e in enumerate(endpoints)}
        # (time, when scheduled, 0 for its own and 1 for a delivery, sequence, kind, data):
        # among events of the same instant, the event engine's order (its sequence follows
        # when each was scheduled, and a step schedules the next arrival before a response)
        self.heap: list[tuple[float, float, int, int, int, Any]] = []
        self.seq = itertools.count()
        self.learners: dict[int, SimSidecar] = {}
        self.members: dict[int, int] = {}
        self.sidecars: dict[int, SimSidecar] = {}
        self.arrival_rngs: dict[int, random.Random] = {}
        self.inflight: dict[int, list[Any]] = {}
        self.rid = itertools.count()
        self.sent: list[tuple[float, int, int, int, float]] = []
        self.records = Records()
        self.retries = 0
        self.events = 0
        for index in range(setup.sidecars):
            if _owner(index, knobs.cohort, workers) == worker:
                self.join(index, 0.0)

    def join(self, index: int, at: float) -> None:
        phase = random.Random(f"{self.seed}:phase:{index}")
        self.arrival_rngs[index] = phase
        heapq.heappush(self.heap, (at + phase.random() * self.gap, at, 0, next(self.seq),
                                   _ARRIVE, index))
        c = index // self.knobs.cohort
        sc = self.learners.get(c)
        if sc is None:
            rng = random.Random(f"{self.seed}:sidecar:{c}")
            sc = self.learners[c] = SimSidecar(c, f"sim-{c:05d}", self.policy, self.profile,
                                               self.listed, rng, at, observed=self.observed)
            self.members[c] = 0
            heapq.heappush(self.heap, (at + phase.random() * self.tick_interval, at, 0,
                                       next(self.seq), _TICK, sc))
        self.members[c] += 1
        self.sidecars[index] = sc

    def leave(self, index: int) -> None:
        c = index // self.knobs.cohort
        del self.sidecars[index]
        self.members[c] -= 1
        if not self.members[c]:
            del self.learners[c], self.members[c]

    def alive(self, sc: SimSidecar) -> bool:
        """Whether ``sc`` is still there (its cohort's last client did not leave)."""
        return self.learners.get(sc.index) is sc

    def attempt(self, index: int, sc: SimSidecar, t: float, intended: float,
                tried: tuple[str, ...]) -> None:
        endpoint = sc.route(t, tried)
        if endpoint is None:
            self.record(intended, t, -1, 0, index)
            return
        j = self.index_of[endpoint]
        rid = next(self.rid)
        self.inflight[rid] = [index, j, intended, t, tried, endpoint, sc]
        self.sent.append((t + self.knobs.network, index, rid, j, t))

    def record(self, intended: float, t: float, pod: int, ok: int, index: int) -> None:
        rec = self.records
        rec.intended.append(intended)
        rec.latency.append(t - intended + self.knobs.overhead)
        rec.pod.append(pod)
        rec.ok.append(ok)
        rec.sidecar.append(index)

    def window(self, until: float, told: list[tuple[float, int, Any, float]],
               ) -> tuple[list[tuple[float, int, int, int, float]], int]:
        """Handle every event before ``until``; the attempts sent and the requests still in
        flight."""
        heap, push, pop = self.heap, heapq.heappush, heapq.heappop
        seq, inflight = self.seq, self.inflight
        for t, kind, payload, scheduled in told:
            if scheduled == AT_SENDING:
                scheduled = inflight[payload][3]
            push(heap, (t, scheduled, 1, next(seq), _DELIVERED, (kind, payload)))
        end = self.setup.total
        gap, rate, poisson = self.gap, self.setup.rate, self.poisson
        learners, sidecars = self.learners, self.sidecars
        events = 0
        while heap and heap[0][0] < until:
            t, _, _, _, kind, data = pop(heap)
            if kind == _ARRIVE:
                if t > end:
                    continue
                events += 1
                client = sidecars.get(data)
                if client is None:
                    continue
                rng = self.arrival_rngs[data]
                push(heap, (t + (rng.expovariate(rate) if poisson else gap), t, 0, next(seq),
                            _ARRIVE, data))
                self.attempt(data, client, t, t, ())
            elif kind == _TICK:
                if t > end:
                    continue
                events += 1
                if self.alive(data):
                    data.tick(t)
                    push(heap, (t + self.tick_interval, t, 0, next(seq), _TICK, data))
            else:
                what, payload = data
                if what in (RESPONSE, REFUSED):
                    events += 1
                    index, j, intended, sent, tried, endpoint, sc = inflight.pop(payload)
                    if not self.alive(sc):
                        continue
                    if what == RESPONSE:
                        sc.answered(endpoint, sent, t)
                        if index in sidecars:
                            self.record(intended, t, j, 1, index)
                        continue
                    sc.refused(endpoint, sent, t)
                    if index not in sidecars:
                        continue
                    tried = (*tried, endpoint)
                    if sc.may_retry(tried):
                        self.retries += 1
                        self.attempt(index, sc, t, intended, tried)
                    else:
                        self.record(intended, t, -1, 0, index)
                elif what == LISTED:
                    self.listed = list(payload)
                elif what == DISCOVER:
                    for sc in learners.values():
                        sc.set_endpoints(payload, t)
                elif what == JOIN:
                    self.join(payload, t)
                elif what == LEAVE:
                    self.leave(payload)
        self.events += events
        sent, self.sent = self.sent, []
        return sent, len(inflight)

    def finish(self) -> dict[str, Any]:
        for sc in self.learners.values():
            sc.finish()
        states = []
        for c, sc in self.learners.items():
            snap = sc.group.snapshot
            if snap is not None:
                states.append((c, snap.nash_gap, snap.flapping, snap.converged, snap.following))
        return {"records": columns(self.records),
                "states": states, "retries": self.retries, "events": self.events,
                "cpu": time.process_time()}


_GONE = object()


def _work(conn: Any, setup: Setup, policy: str, seed: int, knobs: Knobs, worker: int,
          workers: int, observed: bool, inherited: tuple[Any, ...]) -> None:
    """A worker process: windows until told to finish (``None``). ``inherited``: the
    coordinator's ends of the pipes, which the fork copied: closed, so that each worker hears
    EOF when the coordinator closes its end. A thread reads the pipe all the time: the
    coordinator may be sending window k + 2 while the worker sends what it did in window
    k + 1, and with both directions' buffers full neither would ever finish (a review's
    finding, with windows of 20,000 attempts)."""
    for end in inherited:
        end.close()
    gc.set_threshold(*LONG_RUN_COLLECTOR)
    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def read() -> None:
        try:
            while True:
                message = conn.recv()
                inbox.put(message)
                if message is None:
                    return
        except (EOFError, OSError):
            inbox.put(_GONE)

    try:
        fleet = _Fleet(setup, policy, seed, knobs, worker, workers, observed)
        threading.Thread(target=read, name="simulate-inbox", daemon=True).start()
        conn.send(("ready",))
        while True:
            message = inbox.get()
            if message is _GONE:
                return  # the coordinator stopped (its own error, or an interrupt)
            if message is None:
                break
            conn.send(fleet.window(*message))
        conn.send(fleet.finish())
    except (KeyboardInterrupt, BrokenPipeError, ConnectionResetError):
        return  # interrupted, or the coordinator is gone: it has its own error to tell
    except Exception as exc:  # the coordinator must hear of it, not wait for ever
        with contextlib.suppress(OSError):
            conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        conn.close()


class WorkerFailed(RuntimeError):
    """A worker process stopped with an error (its message says which)."""


def _send(conn: Any, message: Any) -> None:
    """Hand a worker ``message``; a worker gone stops the run with what it said last."""
    try:
        conn.send(message)
    except OSError:  # its end is closed: it failed (and said why) or was killed
        while True:
            _receive(conn)  # raises WorkerFailed with its own message, or at EOF


def _receive(conn: Any) -> Any:
    try:
        message = conn.recv()
    except (EOFError, OSError) as exc:
        raise WorkerFailed(f"a simulator worker exited without a word ({exc!r})") from None
    if isinstance(message, tuple) and message and message[0] == "failed":
        raise WorkerFailed(f"a simulator worker failed: {message[1]}")
    return message


def simulate_windowed(setup: Setup, policy: str, seed: int, knobs: Knobs = DEFAULT_KNOBS,
                      workers: int = 2, observed: bool = False) -> RunResult:
    """Run ``setup`` with every sidecar on ``policy``, the sidecars in ``workers`` processes
    (see the module docstring); the same records for every number of workers."""
    if policy == CE_POLICY:
        raise ValueError(f"{CE_POLICY} runs on the event engine only (no --workers): its "
                         "signaler reads every sidecar's summary in one store")
    if knobs.network <= 0:
        raise ValueError("--workers needs a network delay above 0: it is the window in which "
                         "sidecars do not hear from each other")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if "fork" not in multiprocessing.get_all_start_methods():
        raise ValueError("--workers needs the fork start method (Linux): run without it here")
    started, cpu_started = time.perf_counter(), time.process_time()
    pods, instant = make_pods(setup, seed)
    back = response_delay(seed, len(pods), knobs)
    net = knobs.network
    width = net * (1.0 - WINDOW_MARGIN)

    # each worker's deliveries: a heap of (time, sequence, kind, payload, when scheduled)
    outboxes: list[list[tuple[float, int, int, Any, float]]] = [[] for _ in range(workers)]
    out_seq = itertools.count()
    for w, told in enumerate(_sidecar_timeline(setup, knobs, workers)):
        for t, kind, payload, scheduled in told:
            heapq.heappush(outboxes[w], (t, next(out_seq), kind, payload, scheduled))
    # the pods' events: (time, when scheduled, sequence, kind, data), the event engine's order
    pod_heap: list[tuple[float, float, int, int, Any]] = []
    pod_seq = itertools.count()
    for change in setup.changes:
        at = setup.warmup + change[0]
        if change[1] in ("heal", "pod-leave", "pod-join") and at <= setup.total:
            heapq.heappush(pod_heap, (at, 0.0, next(pod_seq), _CHANGE, change))
    handed_out = 0.0  # every delivery before this has been handed to its worker

    def deliver(w: int, t: float, kind: int, rid: int, scheduled: float) -> None:
        if t < handed_out:
            raise AssertionError(f"a delivery at {t} after the window up to {handed_out} was "
                                 "handed out: the window is longer than the lookahead")
        heapq.heappush(outboxes[w], (t, next(out_seq), kind, rid, scheduled))

    pod_events = 0

    def serve(until: float) -> None:
        """The pods' events before ``until``, in the event engine's order."""
        nonlocal pod_events
        push, pop = heapq.heappush, heapq.heappop
        while pod_heap and pod_heap[0][0] < until:
            t, _, _, kind, data = pop(pod_heap)
            if kind == _POD_IN:
                w, rid, j = data
                pod = pods[j]
                if pod.direct:  # the event engine computes these as the attempt is sent
                    deliver(w, back(pod.departure(t), j), RESPONSE, rid, AT_SENDING)
                    continue
                if j in instant and pod.up:
                    service = pod.draw_service() + pod.draw_extra()  # summed first, as there
                    deliver(w, back(t + service, j), RESPONSE, rid, AT_SENDING)
                    continue
                pod_events += 1  # the event engine's arrival at the pod
                if not pod.up:
                    deliver(w, t + net, REFUSED, rid, t)
                elif pod.spec.servers is None:
                    service = pod.draw_service() + pod.draw_extra()
                    deliver(w, back(t + service, j), RESPONSE, rid, t)
                elif pod.busy < pod.spec.servers:
                    pod.busy += 1
                    push(pod_heap, (t + pod.draw_service(), t, next(pod_seq), _POD_DONE, data))
                else:
                    pod.queue.append(data)
            elif kind == _POD_DONE:
                pod_events += 1
                w, rid, j = data
                pod = pods[j]
                pod.busy -= 1
                deliver(w, back(t + pod.draw_extra(), j), RESPONSE, rid, t)
                servers = pod.spec.servers
                while pod.queue and (servers is None or pod.busy < servers):
                    pod.busy += 1
                    push(pod_heap, (t + pod.draw_service(), t, next(pod_seq), _POD_DONE,
                                    pod.queue.popleft()))
            else:
                _, what, arg = data
                pod_events += 1
                if what == "heal":
                    pods[arg].change(pods[arg].spec.healed())
                else:
                    pods[arg].up = what == "pod-join"

    def take(w: int, until: float) -> list[tuple[float, int, Any, float]]:
        box, taken = outboxes[w], []
        while box and box[0][0] < until:
            t, _, kind, payload, scheduled = heapq.heappop(box)
            taken.append((t, kind, payload, scheduled))
        return taken

    context = multiprocessing.get_context("fork")
    conns: list[Any] = []
    procs: list[Any] = []
    for w in range(workers):
        mine, theirs = context.Pipe()
        proc = context.Process(target=_work, name=f"simulate-worker-{w}", daemon=True,
                               args=(theirs, setup, policy, seed, knobs, w, workers, observed,
                                     (*conns, mine)))
        proc.start()
        theirs.close()
        conns.append(mine)
        procs.append(proc)
    try:
        for conn in conns:
            _receive(conn)  # ready
        end = setup.total

        def hand_out(k: int) -> None:
            """Window ``k``, [k w, (k + 1) w), to every worker with its deliveries."""
            nonlocal handed_out
            until = (k + 1) * width
            for w, conn in enumerate(conns):
                _send(conn, (until, take(w, until)))
            handed_out = until

        # Two windows ahead: the deliveries of window k + 2 come from pod events before
        # (k + 2) w - delay, which are before (k + 1) w, so they are all made once the
        # attempts of window k are in and the pods served up to (k + 2) w. A worker never
        # waits for the pods, and a fast one may run a window ahead of a slow one.
        hand_out(0)
        hand_out(1)
        k = 0
        while True:
            replies = [_receive(c) for c in conns]  # window k's attempts
            sent = sorted(a for w, r in enumerate(replies) for a in _tagged(r[0], w))
            for t, _, rid, j, sent_at, w in sent:
                heapq.heappush(pod_heap, (t, sent_at, next(pod_seq), _POD_IN, (w, rid, j)))
            serve((k + 2) * width)  # every attempt arriving before then is in
            if (k + 1) * width > end and not any(r[1] for r in replies) and not pod_heap:
                # nothing in flight: window k + 1, handed out, can only be empty
                if any(_receive(c)[0] for c in conns):
                    raise AssertionError("a worker sent an attempt after the end")
                break
            hand_out(k + 2)
            k += 1
        for conn in conns:
            _send(conn, None)
        finals = [_receive(c) for c in conns]
    finally:
        for conn in conns:  # a worker still waiting for a window hears EOF and stops
            conn.close()
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    records = merged([f["records"] for f in finals])
    states = sorted(s for f in finals for s in f["states"])
    cpu = time.process_time() - cpu_started + sum(f["cpu"] for f in finals)
    # as the event engine counts them: one event a change of the timeline, one a discovery
    timeline = sum(setup.warmup + at <= setup.total for at, what, _ in setup.changes
                   if what.startswith("sidecars-"))  # (the pods' own: counted by serve)
    timeline += sum(setup.warmup + at + knobs.discovery_delay <= setup.total
                    for at, what, _ in setup.changes if what.startswith("pod-"))
    events = pod_events + timeline + sum(f["events"] for f in finals)
    return RunResult(policy, records, [pod.name for pod in pods], events,
                     time.perf_counter() - started, cpu, sidecar_states(states), None,
                     sum(f["retries"] for f in finals))


def _tagged(sent: list[tuple[float, int, int, int, float]], worker: int,
            ) -> list[tuple[float, int, int, int, float, int]]:
    return [(*attempt, worker) for attempt in sent]


def columns(rec: Records) -> tuple[bytes, ...]:
    """A run's records as the bytes of their columns (what a worker hands back)."""
    return (rec.intended.tobytes(), rec.latency.tobytes(), rec.pod.tobytes(), rec.ok.tobytes(),
            rec.sidecar.tobytes())


def merged(parts: list[tuple[bytes, ...]]) -> Records:
    """The workers' records (:func:`columns`) in one canonical order (intended start, client,
    latency), so that the same run split over any number of workers gives the same arrays
    (and the event engine's records, put in that order, the same again)."""
    intended = np.concatenate([np.frombuffer(p[0], dtype=np.float64) for p in parts])
    latency = np.concatenate([np.frombuffer(p[1], dtype=np.float64) for p in parts])
    pod = np.concatenate([np.frombuffer(p[2], dtype=np.int32) for p in parts])
    ok = np.concatenate([np.frombuffer(p[3], dtype=np.int8) for p in parts])
    sidecar = np.concatenate([np.frombuffer(p[4], dtype=np.int32) for p in parts])
    order = np.lexsort((latency, sidecar, intended))
    rec = Records()
    rec.intended = array("d", intended[order].tobytes())
    rec.latency = array("d", latency[order].tobytes())
    rec.pod = array("i", pod[order].tobytes())
    rec.ok = array("b", ok[order].tobytes())
    rec.sidecar = array("i", sidecar[order].tobytes())
    return rec
