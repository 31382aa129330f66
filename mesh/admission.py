"""The inbound admission gate: who may reach the app, who waits for a slot, who is sent away.

This module owns the admission rules of the inbound listener and nothing else. It composes the
pure pieces that decide (:class:`~mesh.reputation.ReputationBook` judges the caller,
:class:`~mesh.concurrency.AdaptiveConcurrencyLimit` counts the app's slots,
:class:`~mesh.auction.SecondPriceAuction` orders the waiters and prices them) and keeps the
one piece of state none of them has: which queued request belongs to which caller, and whether
it was queued in good standing. It is sans-I/O, like h11: no asyncio, no sockets, no clock.
Every method takes ``now`` (monotonic seconds, never decreasing) and returns decisions as frozen
data; the sidecar (:mod:`sidecar.inbound`) maps them to futures and HTTP answers.

The steps of one request
------------------------
1. :meth:`AdmissionGate.police` (every request, WebSocket handshakes too): the book records the
   request and decides (:meth:`ReputationBook.admit`). A punished caller beyond its throttled
   share gets :class:`Reject` ``punished`` with ``retry_after`` (429). Otherwise :class:`Pass`,
   carrying the bid it may use (see *beyond the norm*).
2. :meth:`AdmissionGate.offer` (requests that hold a slot; a WebSocket holds none and stops
   after ``police``): :class:`Admit` now, :class:`Queue` until a slot frees, or :class:`Reject`
   ``queue-full``.
   A request with a body is offered only once its body has arrived (the sidecar reads it
   first, within an upload deadline), so a slow upload holds no slot; an upload that misses
   its deadline or is abandoned is reported with :meth:`AdmissionGate.defect` instead of an
   offer: it counts against its caller (:meth:`ReputationBook.defect`).
3. The request's end: :meth:`AdmissionGate.finish` when an admitted request leaves its slot
   (with its RTT if it finished, the limiter learns from it; pass its :attr:`Admit.slot`),
   :meth:`AdmissionGate.withdraw` when a waiter's client goes away,
   :meth:`AdmissionGate.time_out` when a waiter's own timer runs out (``max_wait`` after it
   queued), :meth:`AdmissionGate.close` at shutdown.

A step may also decide the fate of *other* requests that are waiting (a slot freed, an
eviction, a punishment): those decisions come back in the step's ``woken`` tuple (or as the
return value of ``finish``, ``release``, ``expire`` and ``close``), one :class:`Admit` or
:class:`Reject` per woken waiter, and the sidecar hands each to the waiter's future.

The rules
---------
- **Slots.** A request takes a slot directly (:class:`Admit`, price 0) only if the limiter has
  one free *and nobody waits*: a slot that frees while others wait goes to the best bid through
  :meth:`AdmissionGate.release`, never to whoever arrives (no queue jumping). Every queued
  request is followed by a release, so a slot that is free (the limit grew, a waiter left)
  is never left idle while someone waits.
- **Release.** While anyone waits, each free slot is taken from the limiter and the auction
  admits that many of the highest bids, each paying the highest losing bid (Vickrey 1961,
  :mod:`mesh.auction`); equal bids are served caller by caller in turn (start-time fair
  queueing), so one caller's backlog does not stand in front of the others'. The limiter
  may refuse a slot it reported free (a minRTT probe starting pins the limit): then fewer
  are admitted, and a slot taken for a winner the auction did not produce is given back.
- **Queue full.** The auction keeps at most ``max_queue`` waiters: a newcomer that would be
  served before the waiter served last (a higher bid, or an equal bid from a caller with a
  shorter backlog) pushes that waiter out (it is woken with :class:`Reject` ``queue-full``,
  ``queued=True``): the flood's tail is shed, not the newcomer. Any other newcomer is refused
  (``queue-full``, ``queued=False``).
- **Beyond the norm.** While the app is congested, a request that takes its caller's rate
  above ``max(rate_floor, rate_tolerance * norm_share)`` (the book's own rate norm, with its
  demand-aware share) bids 0
  (:attr:`Pass.voided` says a positive bid was dropped): a bid buys priority only within the
  cooperative norm, so a flood cannot outrank cooperative callers in the seconds before its
  reputation triggers a punishment. (An older rule sent such a request through the queue
  when half the slots were in use; as every queueing is followed by a release that hands out
  any free slot, it changed nothing and is gone.)
- **Punished flush.** When a caller's request finds it punished, its requests still waiting
  that were queued in good standing (the flood that earned the punishment) leave the queue,
  each woken with :class:`Reject` ``punished``, ``queued=True`` and ``retry_after`` the
  punishment left (at least 1 s), so the flood is not served after the verdict. Requests
  queued while already punished (let through by the throttle) are not flushed.
- **Timeouts.** A waiter that has no slot ``max_wait`` seconds after it queued is refused
  ``queue-timeout``. :meth:`AdmissionGate.time_out` is the waiter's own deadline (the sidecar
  calls it from a per-request timer); :meth:`AdmissionGate.expire` applies the same rule to
  every waiter at once for a driver that only has a clock (a simulator, a test).
- **Long requests.** An admitted request at least
  :meth:`~mesh.concurrency.AdaptiveConcurrencyLimit.long_after` old, when the app has since
  answered a request admitted after it, is a long poll, a watch or a stream, not a queue:
  it leaves the limiter's count (:meth:`~mesh.concurrency.AdaptiveConcurrencyLimit.park`,
  the module's *Long requests*) and its slot serves others; at most
  ``max_long_per_caller`` of one caller's requests are parked (the rest keep their slots,
  as the listeners' cap on a caller's long-lived exchanges). Checked when a request asks
  for a slot or one frees, oldest first. A request the operator declared long (a watch's
  path, an event stream: :meth:`AdmissionGate.offer` ``long``) is admitted parked at once,
  within the same caps.
- **Load.** After every offer, release and withdrawal the book learns the app's congestion
  (``in_flight / limit``, and 1 while anyone waits) and capacity (configured, or the
  limiter's Little's-law estimate ``limit / sampleRTT``), which set the fair shares.

What it must not do: read a clock, wait, touch HTTP (statuses, headers and messages are the
sidecar's), or duplicate the rules of the pieces it composes.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from enum import StrEnum

from mesh.auction import Admission, Queued, SecondPriceAuction
from mesh.concurrency import AdaptiveConcurrencyLimit
from mesh.reputation import Decision, Phase, ReputationBook


class RejectReason(StrEnum):
    """Why a request is sent away; the value is the ``reason`` the sidecar answers with."""

    PUNISHED = "punished"
    """The caller is punished: beyond its throttled share, or punished while waiting (429)."""
    QUEUE_FULL = "queue-full"
    """Refused by a full queue of bids at least as high, or pushed out by a higher bid (503)."""
    QUEUE_TIMEOUT = "queue-timeout"
    """No slot within ``max_wait`` (503)."""
    SHUTTING_DOWN = "shutting-down"
    """The gate closed while the request waited (503)."""
    APP_UNREACHABLE = "app-unreachable"
    """Admitted, but no connection to the app could be had (refused, or not in time): the
    app never saw it (503; the inbound listener's, not the gate's own decision)."""


@dataclass(frozen=True, slots=True)
class Admit:
    """The request may go to the app now; it holds a slot until :meth:`AdmissionGate.finish`.

    ``price`` is what it pays (0 when it took a free slot; the highest losing bid when it won
    a release), ``bid`` its effective bid (capped at its caller's budget), ``waited`` the
    seconds it spent queued.
    """

    request_id: str
    caller: str
    bid: float
    price: float
    waited: float
    woken: tuple[Admit | Reject, ...] = ()
    """Other waiters this step decided (always empty on a woken decision itself)."""
    slot: int = field(default=0, compare=False)
    """The slot it holds, to pass to :meth:`AdmissionGate.finish` (a handle: not compared)."""


@dataclass(frozen=True, slots=True)
class Queue:
    """The request waits for a slot; it will be woken with :class:`Admit` or :class:`Reject`,
    unless its client leaves (:meth:`AdmissionGate.withdraw`) or its ``deadline`` passes
    (:meth:`AdmissionGate.time_out`)."""

    request_id: str
    caller: str
    bid: float
    queue_length: int
    deadline: float
    woken: tuple[Admit | Reject, ...] = ()


@dataclass(frozen=True, slots=True)
class Reject:
    """The request is sent away.

    ``queued`` says whether it had been waiting (woken by another step) or was refused on
    arrival; ``retry_after`` is whole seconds for the caller to back off. ``decision`` is the
    policing decision when :meth:`AdmissionGate.police` refused the request (None otherwise:
    a woken waiter's standing is whatever it is when it is answered).
    """

    request_id: str | None
    caller: str
    reason: RejectReason
    retry_after: int
    queued: bool
    decision: Decision | None = None
    woken: tuple[Admit | Reject, ...] = ()


@dataclass(frozen=True, slots=True)
class Pass:
    """Policing let the request through; :meth:`AdmissionGate.offer` takes it from here.

    ``bid`` is the bid it may use: the caller's, or 0 when the request is ``beyond_norm``
    (``voided`` says a positive bid was dropped).
    """

    caller: str
    decision: Decision
    bid: float
    beyond_norm: bool
    voided: bool
    woken: tuple[Admit | Reject, ...] = ()


Woken = Admit | Reject
"""A decision for a request that was waiting (see the module docstring)."""


@dataclass(slots=True)
class _Held:
    caller: str
    start: float


@dataclass(slots=True)
class _Waiting:
    caller: str
    deadline: float
    in_good_standing: bool


class AdmissionGate:
    """The inbound admission rules over one app (see the module docstring).

    ``book``, ``limiter`` and ``auction`` are the pieces it composes (fresh defaults unless
    given); ``max_wait`` is the seconds a request may wait for a slot; ``capacity`` the app's
    capacity in requests/s for fair shares (None: the limiter's estimate).
    """

    def __init__(
        self,
        *,
        book: ReputationBook | None = None,
        limiter: AdaptiveConcurrencyLimit | None = None,
        auction: SecondPriceAuction | None = None,
        max_wait: float = 2.0,
        capacity: float | None = None,
        max_long_per_caller: int | None = None,
    ) -> None:
        if not (math.isfinite(max_wait) and max_wait >= 0):
            raise ValueError(f"max_wait must be finite and >= 0, got {max_wait!r}")
        if capacity is not None and not (math.isfinite(capacity) and capacity > 0):
            raise ValueError(f"capacity must be finite and > 0, got {capacity!r}")
        self.book = book if book is not None else ReputationBook()
        self.limiter = limiter if limiter is not None else AdaptiveConcurrencyLimit()
        self.auction = auction if auction is not None else SecondPriceAuction()
        self.max_wait = max_wait
        self.configured_capacity = capacity
        # Invariant: _waiting holds exactly the auction's waiters, and _queued_by[c] exactly
        # those of caller c's waiters that were queued in good standing (the flushable ones).
        self._waiting: dict[str, _Waiting] = {}
        self._queued_by: dict[str, set[str]] = {}
        self._ids = itertools.count(1)
        # Invariant: _held holds the admitted requests the limiter counts in flight (oldest
        # first), _parked those it parked as long, by slot; _parked_by counts the latter per
        # caller. _answered is the latest start of an admitted request that was answered.
        self.max_long_per_caller = max_long_per_caller
        self._slots = itertools.count(1)
        self._held: dict[int, _Held] = {}
        self._parked: dict[int, str] = {}
        self._parked_by: dict[str, int] = {}
        self._answered = -math.inf
        self._scout: int | None = None  # a slot parked before any later one was answered
        self._scout_start = -math.inf
        self.parked_total = 0
        """Requests parked as long since the start (a counter)."""

    # --- observers ------------------------------------------------------------------------

    @property
    def queue_length(self) -> int:
        return self.auction.queue_length

    def waiting(self) -> tuple[str, ...]:
        """The request ids waiting for a slot, in arrival order."""
        return tuple(self._waiting)

    def capacity(self) -> float:
        """App capacity in requests/s: configured, or Little's law at the learned limit
        (:meth:`AdaptiveConcurrencyLimit.capacity_estimate`), or the book's default."""
        if self.configured_capacity is not None:
            return self.configured_capacity
        return self.limiter.capacity_estimate() or self.book.params.capacity

    def congestion(self) -> float:
        """``in_flight / limit``, and 1 while anyone waits in the bid queue."""
        return 1.0 if self.auction.queue_length else self.limiter.congestion_level()

    # --- the request path -----------------------------------------------------------------

    def police(
        self, caller: str, bid: float, now: float, *, is_retry: bool = False,
        demand: float | None = None,
    ) -> Pass | Reject:
        """Judge one request of ``caller`` (bid already parsed; 0 for an untrusted caller;
        ``demand``: its verified even-spread demand, :meth:`ReputationBook.admit`)."""
        decision = self.book.admit(caller, now, is_retry, demand)
        woken: tuple[Woken, ...] = ()
        if decision.phase is Phase.PUNISHED and caller in self._queued_by:
            woken = self._flush(caller, now)
        if not decision.admitted:
            return Reject(None, caller, RejectReason.PUNISHED,
                          math.ceil(decision.retry_after or 1.0), queued=False,
                          decision=decision, woken=woken)
        beyond = self._beyond_norm(decision)
        return Pass(caller, decision, 0.0 if beyond else bid, beyond, beyond and bid > 0, woken)

    def defect(self, caller: str, now: float) -> tuple[Reject, ...]:
        """A request of ``caller`` that passed policing misbehaved before asking for a slot
        (its upload stalled past the deadline, or was abandoned): the book records a
        defection (:meth:`ReputationBook.defect`); if that punishes the caller, its waiters
        queued in good standing are flushed, as in :meth:`police`."""
        decision = self.book.defect(caller, now)
        if decision.phase is Phase.PUNISHED and caller in self._queued_by:
            return self._flush(caller, now)
        return ()

    def charge_hold(self, caller: str, held: float, now: float) -> tuple[Reject, ...]:
        """An admitted request of ``caller`` held its slot ``held`` seconds while its client
        was still sending (a streaming call): the time beyond one request's share counts as
        requests at the app's rate per slot (``capacity / limit`` per second held), in the
        caller's request rate (:meth:`ReputationBook.charge`); if that punishes the caller,
        its waiters are flushed, as in :meth:`police`."""
        weight = held * self.capacity() / max(1, self.limiter.limit) - 1.0
        if weight <= 0.0:
            return ()
        decision = self.book.charge(caller, now, weight)
        if decision.phase is Phase.PUNISHED and caller in self._queued_by:
            return self._flush(caller, now)
        return ()

    def offer(self, passed: Pass, now: float, *, long: bool = False
              ) -> Admit | Queue | Reject:
        """A policed request asks for a slot (pass the :class:`Pass` of the same ``now``).
        ``long``: the operator declared it long (a watch's path, an event stream): admitted
        at once outside the limit, as a parked request is, while the caps of those allow
        (*Long requests*); otherwise it asks for a slot like any request."""
        request_id = f"r{next(self._ids)}"
        lim = self.limiter
        if long and self._may_park(passed.caller):
            slot = next(self._slots)
            self._parked[slot] = passed.caller
            self._parked_by[passed.caller] = self._parked_by.get(passed.caller, 0) + 1
            lim.on_long_start()
            self.parked_total += 1
            return Admit(request_id, passed.caller, passed.bid, 0.0, 0.0, slot=slot)
        self._park_long(now)
        slot = lim.on_start(now)  # the direct path: a free slot
        if slot and self.auction.queue_length:
            lim.on_abandon(now)  # others wait: the slot goes to the best bid via release
            slot = False
        outcome = self.auction.offer(request_id, passed.caller, passed.bid, now, slot)
        self._update_load(now)
        if isinstance(outcome, Admission):
            return self._admit(outcome, now)
        if not isinstance(outcome, Queued):
            return Reject(request_id, passed.caller, RejectReason.QUEUE_FULL, 1, queued=False)
        woken: list[Woken] = []
        if outcome.evicted is not None:
            evicted_caller = self._forget(outcome.evicted)
            if evicted_caller is not None:
                woken.append(Reject(outcome.evicted, evicted_caller, RejectReason.QUEUE_FULL, 1,
                                    queued=True))
        deadline = now + self.max_wait
        good = passed.decision.phase is not Phase.PUNISHED
        self._waiting[request_id] = _Waiting(passed.caller, deadline, good)
        if good:
            self._queued_by.setdefault(passed.caller, set()).add(request_id)
        # a slot may be free (the limit grew, or a waiter left): hand it out now; it may go
        # to this request
        own: Admit | None = None
        for admit in self.release(now):
            if admit.request_id == request_id:
                own = admit
            else:
                woken.append(admit)
        if own is not None:
            return replace(own, woken=tuple(woken))
        return Queue(request_id, passed.caller, outcome.bid, self.auction.queue_length,
                     deadline, tuple(woken))

    def release(self, now: float) -> tuple[Admit, ...]:
        """Hand every free slot to the best waiters (each pays the highest losing bid)."""
        lim, auction = self.limiter, self.auction
        admitted: list[Admit] = []
        if auction.queue_length:
            self._park_long(now)
        while auction.queue_length:
            # take the slots first: on_start may begin a minRTT probe and refuse one that
            # available() reported free, and the auction must not admit more than were taken
            granted = 0
            while granted < auction.queue_length and lim.available() > 0 and lim.on_start(now):
                granted += 1
            if granted == 0:
                break
            admissions = auction.release(now, granted)
            for _ in range(granted - len(admissions)):
                lim.on_abandon(now)
            for admission in admissions:
                if self._forget(admission.request_id) is None:
                    lim.on_abandon(now)  # not a waiter of this gate: the slot is free again
                else:
                    admitted.append(self._admit(admission, now))
        self._update_load(now)
        return tuple(admitted)

    def finish(self, now: float, rtt: float | None = None, slot: int = 0,
               overtakes: bool = True) -> tuple[Admit, ...]:
        """An admitted request left its slot (``slot``: its :attr:`Admit.slot`; 0: the oldest
        admitted, for a driver that keeps no slots; a slot already finished: nothing
        happens): after ``rtt`` seconds if the app answered it in full (the limiter learns
        from it, unless it was parked as long), None if it ended without a usable RTT (its
        client left, the app failed). ``overtakes``: the answer may show the requests
        admitted before it to be long (False for an error answer: an app that sheds load
        with quick 503s has not served anything around its slow requests). The freed slot
        goes to the best waiter."""
        if slot and slot not in self._held and slot not in self._parked:
            return ()
        caller = self._parked.pop(slot, None)
        if caller is not None:
            if slot == self._scout:
                self._scout = None
            left = self._parked_by[caller] - 1
            if left:
                self._parked_by[caller] = left
            else:
                del self._parked_by[caller]
            self.limiter.on_parked_end()
            return self.release(now)
        held = self._held.pop(slot, None)
        if held is None and self._held:  # an unknown slot: counted as the oldest one
            held = self._held.pop(next(iter(self._held)))
        if rtt is None:
            self.limiter.on_abandon(now)
        else:
            self.limiter.on_finish(rtt, now)
            if overtakes and held is not None and held.start > self._answered:
                self._answered = held.start
        return self.release(now)

    @property
    def long_running(self) -> int:
        """Admitted requests parked as long, now."""
        return len(self._parked)

    def withdraw(self, request_id: str, now: float) -> bool:
        """A waiter's client went away; False if the request was not waiting (then, if it had
        been admitted, its slot is given back with :meth:`finish`)."""
        waiting = self._forget(request_id) is not None
        self.auction.cancel(request_id, now)
        self._update_load(now)
        return waiting

    def time_out(self, queued: Queue, now: float) -> Reject:
        """The deadline of the waiter ``queued`` passed (its own timer, ``max_wait`` after it
        queued): it leaves the queue, refused ``queue-timeout``."""
        self.withdraw(queued.request_id, now)
        return Reject(queued.request_id, queued.caller, RejectReason.QUEUE_TIMEOUT, 1,
                      queued=True)

    def expire(self, now: float) -> tuple[Reject, ...]:
        """Every waiter that has waited longer than ``max_wait`` at ``now`` leaves the queue."""
        woken = []
        for request_id in self.auction.expire(now, self.max_wait):
            caller = self._forget(request_id)
            if caller is not None:
                woken.append(Reject(request_id, caller, RejectReason.QUEUE_TIMEOUT, 1,
                                    queued=True))
        if woken:
            self._update_load(now)
        return tuple(woken)

    def close(self, now: float) -> tuple[Reject, ...]:
        """Shutting down: every waiter leaves the queue, refused ``shutting-down``."""
        woken = []
        for request_id in list(self._waiting):
            caller = self._forget(request_id)
            self.auction.cancel(request_id, now)
            assert caller is not None
            woken.append(Reject(request_id, caller, RejectReason.SHUTTING_DOWN, 1, queued=True))
        return tuple(woken)

    # --- internals ------------------------------------------------------------------------

    def _beyond_norm(self, decision: Decision) -> bool:
        """Whether this request takes its caller over the book's rate norm while the app is
        congested (the over-share test of :mod:`mesh.reputation`, on the rate it judged)."""
        p = self.book.params
        if not self.book.congested or decision.norm_share <= 0:
            return False
        return decision.judged_rate > max(p.rate_floor, p.rate_tolerance * decision.norm_share)

    def _flush(self, caller: str, now: float) -> tuple[Reject, ...]:
        """The punished flush: ``caller``'s waiters queued in good standing leave (429)."""
        standing = self.book.standing(caller, now)
        retry_after = max(1, math.ceil(standing.punished_for)) if standing is not None else 1
        woken = []
        for request_id in sorted(self._queued_by.get(caller, ()), key=_arrival):
            if self.auction.cancel(request_id, now):
                self._forget(request_id)
                woken.append(Reject(request_id, caller, RejectReason.PUNISHED, retry_after,
                                    queued=True))
        self._queued_by.pop(caller, None)
        return tuple(woken)

    def _forget(self, request_id: str) -> str | None:
        """Drop a waiter from the gate's books (not the auction's); its caller, or None."""
        waiting = self._waiting.pop(request_id, None)
        if waiting is None:
            return None
        queued = self._queued_by.get(waiting.caller)
        if queued is not None:
            queued.discard(request_id)
            if not queued:
                del self._queued_by[waiting.caller]
        return waiting.caller

    def _admit(self, admission: Admission, now: float) -> Admit:
        slot = next(self._slots)
        self._held[slot] = _Held(admission.caller, now)
        return Admit(admission.request_id, admission.caller, admission.bid, admission.price,
                     admission.waited, slot=slot)

    def _may_park(self, caller: str) -> bool:
        cap = self.max_long_per_caller
        return (len(self._parked) < self.limiter.params.long_max
                and (cap is None or self._parked_by.get(caller, 0) < cap))

    def _park_long(self, now: float) -> None:
        """Park every admitted request that turned out long (*Long requests*): oldest first,
        up to the first that is too young or that no later admission has overtaken (no
        younger one can be either). When none is overtaken, the slots are full and the
        oldest is that old (long polls took every slot, or the few of a minRTT probe), the
        oldest is parked as a *scout*: its slot lets one more request through, whose answer
        tells long requests from a stuck app; no second scout until a later request is
        answered or the scout ends, so a hung app is sent at most one extra request at a
        time. Nothing is parked while the app queues (the limiter's standing RTT is past
        its tolerance: slow requests are then work waiting, not long polls, however they
        are overtaken by a many-worker app) or ``long_max`` are parked."""
        held = self._held
        if not held:
            return
        lim = self.limiter
        old = now - lim.long_after()
        oldest_slot = next(iter(held))
        if held[oldest_slot].start >= old:  # the common case: nothing to look at
            return
        room = lim.params.long_max - len(self._parked)
        if room <= 0 or lim.queueing():
            return
        if self._scout is not None and self._scout_start < self._answered:
            self._scout = None  # overtaken: a long request after all
        cutoff = min(old, self._answered)
        cap = self.max_long_per_caller if self.max_long_per_caller is not None else math.inf
        by = self._parked_by
        parked: list[int] = []
        for slot, request in held.items():
            if request.start >= cutoff or len(parked) >= room:
                break
            if by.get(request.caller, 0) < cap:
                by[request.caller] = by.get(request.caller, 0) + 1
                parked.append(slot)
        if not parked and self._scout is None and lim.in_flight >= lim.limit:
            caller = held[oldest_slot].caller
            if by.get(caller, 0) < cap:
                by[caller] = by.get(caller, 0) + 1
                parked.append(oldest_slot)
                self._scout, self._scout_start = oldest_slot, held[oldest_slot].start
        for slot in parked:
            self._parked[slot] = held.pop(slot).caller
            lim.park()
        self.parked_total += len(parked)

    def _update_load(self, now: float) -> None:
        self.book.update_load(now, self.congestion(), self.capacity())


def _arrival(request_id: str) -> int:
    """Ids are ``r1, r2, ...`` in arrival order: flushed waiters are woken oldest first."""
    return int(request_id[1:])
