"""Priority auction for admission under overload: bid budgets and a second-price (Vickrey)
clearing of the inbound wait queue (the ``X-GT-Bid`` text format is :mod:`wire.bid`'s).

This module owns who is admitted first when the app is congested and what they pay. It is pure:
the sidecar passes ``now``, tells :meth:`SecondPriceAuction.offer` whether a concurrency slot is
free, and tells :meth:`SecondPriceAuction.release` how many slots have freed up. The waiting
itself (a future per queued request, a timeout) belongs to the sidecar's async wrapper::

    outcome = auction.offer(request_id, caller, bid, now, slot_available=limiter.on_start(now))
    if isinstance(outcome, Rejected): answer 503
    if isinstance(outcome, Queued):
        if outcome.evicted: answer 503 to outcome.evicted
        wait for the request's future (answered by release) or its expiry
    ...after each response:  limiter.on_finish(rtt, now)
        for admission in auction.release(now, slots=limiter.available()):
            limiter.on_start(now); resolve admission.request_id's future
        for request_id in auction.expire(now, max_wait): answer 503

Rules (Vickrey 1961, "Counterspeculation, auctions, and competitive sealed tenders"):

- **Uncongested** (a slot is free when the request arrives): admitted at once, price 0.
- **Congested**: the request waits. When ``k`` slots free, the ``k`` highest bids win (equal
  bids in fair-queueing order, below) and each pays the *highest losing bid*, the (k+1)-th
  highest bid among those that were waiting, or 0 if nobody is left waiting. With one slot
  this is the second price: bids (5, 3, 1) -> 5 wins and pays 3. A winner never pays more
  than its own bid, and since the price does not depend on the winner's own bid, bidding
  one's true value is a dominant strategy (for unit demand; multi-unit uniform (k+1)-th
  price is the VCG price).
- **Budgets**: each caller pays from a :class:`BidBudget` that refills at ``budget_rate`` per
  second up to ``budget_cap``. A bid is capped at the caller's *available* budget, the balance
  minus what its other queued bids have reserved; the capped bid is reserved while it waits and
  the reservation is released when it wins (after paying the price), expires or is evicted. So
  a balance can never go negative however many requests a caller has queued.
- **Fair queueing among equal bids**: waiters with the same bid are served caller by caller
  in turn, not in arrival order, so a caller that floods waits behind its own backlog and not
  in front of everyone else's requests. Each waiter gets a start tag, start-time fair queueing
  with unit cost per request (Goyal, Vin & Cheng, SIGCOMM 1996; the idea of Demers, Keshav &
  Shenker, SIGCOMM 1989): ``start = max(V, the caller's previous start + 1)``, where the
  virtual time ``V`` is the largest start tag served so far; a caller with nothing waiting
  starts again at ``V``. Equal bids are served by start tag, then by arrival. With one waiter
  per caller this is FIFO; with one caller holding 500 waiters and another arriving, the
  newcomer is served after at most one of the 500.
- **Bounded queue**: at most ``max_queue`` waiters. When full, the waiter served last (the
  lowest bid; among equal lowest bids the largest start tag, which is the tail of the longest
  backlog: shed from the longest queue) is evicted if the newcomer would be served before it
  (a higher bid, or an equal bid with an earlier start tag); otherwise the newcomer is
  rejected.
- **Bounded budgets**: at most ``max_callers`` budgets are kept, the least recently bidding
  dropped first, but never the budget of a caller with a request waiting (even one whose
  effective bid is 0) nor the bidder's own: a waiter's reservation always lives in the budget
  its next bid is capped by, so however the queue churns (offers, evictions, expiries,
  clearings) a caller's waiting bids never add up to more than ``budget_cap``. (Dropping a
  waiting caller's budget and re-creating it full at its eviction once let a caller hold 200
  in bids against a cap of 100.)

:meth:`SecondPriceAuction.snapshot` reads the auction for ``/debug/state`` (the last clearing
price, the queue, chosen callers' budgets) without changing it.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass


class BidBudget:
    """One caller's replenishing budget: a token bucket of money, with reservations.

    ``balance`` refills at ``rate`` per second up to ``cap`` (starting full). ``reserved`` is
    held by queued bids; ``available = balance - reserved`` is what a new bid may use.
    """

    __slots__ = ("_balance", "_last", "cap", "rate", "reserved")

    def __init__(self, rate: float, cap: float, now: float) -> None:
        if not (math.isfinite(rate) and math.isfinite(cap)) or rate < 0 or cap < 0:
            raise ValueError("budget rate and cap must be finite and non-negative")
        self.rate, self.cap = rate, cap
        self._balance, self._last = cap, now
        self.reserved = 0.0

    def balance(self, now: float) -> float:
        """The balance at ``now`` after refilling (time never runs backwards here)."""
        if now > self._last:
            self._balance = self.balance_at(now)
            self._last = now
        return self._balance

    def balance_at(self, now: float) -> float:
        """What :meth:`balance` would return at ``now``, without refilling (reads only)."""
        if now > self._last:
            return min(self.cap, self._balance + (now - self._last) * self.rate)
        return self._balance

    def available(self, now: float) -> float:
        return max(0.0, self.balance(now) - self.reserved)

    def reserve(self, bid: float, now: float) -> float:
        """Reserve ``min(bid, available)`` and return it (the effective, capped bid)."""
        effective = min(bid, self.available(now))
        self.reserved += effective
        return effective

    def settle(self, reserved: float, price: float, now: float) -> None:
        """Release a reservation and pay ``price`` (which is at most the reservation)."""
        self.balance(now)
        self.reserved = max(0.0, self.reserved - reserved)
        self._balance = max(0.0, self._balance - min(price, reserved))


@dataclass(frozen=True, slots=True)
class Admission:
    """A request that may go to the app now; ``price`` is charged and sent as ``X-GT-Price``."""

    request_id: str
    caller: str
    bid: float
    """The effective bid (capped at the caller's available budget)."""
    price: float
    waited: float


@dataclass(frozen=True, slots=True)
class Queued:
    """A request waiting for a slot; ``evicted`` is a waiter pushed out to make room (503)."""

    request_id: str
    bid: float
    queue_length: int
    evicted: str | None = None


@dataclass(frozen=True, slots=True)
class Rejected:
    """A request refused because the queue is full of bids at least as high (503)."""

    request_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class BudgetView:
    """One caller's budget at an instant: ``balance`` of ``cap``, ``reserved`` by its queued
    bids; ``available = balance - reserved`` is what its next bid may use."""

    balance: float
    reserved: float
    cap: float
    rate: float

    @property
    def available(self) -> float:
        return max(0.0, self.balance - self.reserved)


@dataclass(frozen=True, slots=True)
class AuctionSnapshot:
    """The auction at one instant (:meth:`SecondPriceAuction.snapshot`).

    ``budgets`` holds the asked-for callers that have a budget; a caller without one has
    never bid and would start with a full budget (``budget_cap``).
    """

    last_price: float
    queue_length: int
    highest_waiting_bid: float | None
    budgets: dict[str, BudgetView]
    tracked_callers: int


@dataclass(frozen=True, slots=True)
class AuctionParams:
    budget_rate: float = 10.0
    """Budget each caller earns per second."""
    budget_cap: float = 100.0
    max_queue: int = 1000
    max_callers: int = 10_000
    """Budgets kept at most; the least recently bidding caller's budget is dropped beyond this."""


@dataclass(slots=True)
class _Waiter:
    request_id: str
    caller: str
    bid: float
    start: int
    """The fair-queueing start tag (see the module docstring)."""
    seq: int
    arrived: float

    def key(self) -> tuple[float, int, int, str]:
        """The waiter's place in the service order: best bid, earliest start, arrival."""
        return (-self.bid, self.start, self.seq, self.request_id)


class SecondPriceAuction:
    """The inbound wait queue, cleared by second price (see the module docstring)."""

    def __init__(self, params: AuctionParams | None = None) -> None:
        self.params = params or AuctionParams()
        if self.params.max_queue < 1 or self.params.max_callers < 1:
            raise ValueError("max_queue and max_callers must be at least 1")
        self._budgets: OrderedDict[str, BidBudget] = OrderedDict()
        self._waiting: dict[str, int] = {}  # caller -> requests waiting (their budget stays)
        self._waiters: dict[str, _Waiter] = {}  # insertion order is arrival order
        # sorted by _Waiter.key, (-bid, start, seq, id): served first at the front
        self._order: list[tuple[float, int, int, str]] = []
        self._seq = 0
        self._virtual = 0  # V: the largest start tag served so far
        self._next_start: dict[str, int] = {}  # caller with waiters -> its last start + 1
        self.last_price = 0.0

    def __len__(self) -> int:
        return len(self._waiters)

    @property
    def queue_length(self) -> int:
        return len(self._waiters)

    @property
    def tracked_callers(self) -> int:
        """How many callers' budgets are kept (at most ``max_callers`` plus waiters')."""
        return len(self._budgets)

    def budget(self, caller: str, now: float) -> BidBudget:
        """The caller's budget (created full on first use; least recently used dropped)."""
        budget = self._budgets.get(caller)
        if budget is None:
            budget = BidBudget(self.params.budget_rate, self.params.budget_cap, now)
            self._budgets[caller] = budget
            self._drop_idle_budgets()
        else:
            self._budgets.move_to_end(caller)
        return budget

    def snapshot(self, now: float, callers: Iterable[str] = ()) -> AuctionSnapshot:
        """The last clearing price, the queue, and the budgets of ``callers`` at ``now``.
        Reads only: no budget is created, refilled or moved in the least-recently-used order.
        """
        budgets = {
            caller: BudgetView(budget.balance_at(now), budget.reserved, budget.cap, budget.rate)
            for caller in callers if (budget := self._budgets.get(caller)) is not None
        }
        highest = -self._order[0][0] if self._order else None
        return AuctionSnapshot(self.last_price, len(self._waiters), highest, budgets,
                               len(self._budgets))

    def offer(
        self, request_id: str, caller: str, bid: float, now: float, slot_available: bool
    ) -> Admission | Queued | Rejected:
        """A request arrives with a parsed ``bid`` (see :func:`wire.bid.parse_bid`).

        ``slot_available`` says whether the concurrency limiter granted a slot right now; if
        so the request is admitted at price 0. Only pass True when nobody is waiting (a slot
        that frees while others wait goes through :meth:`release`, so nobody jumps the
        queue). ``request_id`` must be unique among waiters, and ``now`` must not decrease
        from one call to the next.
        """
        if request_id in self._waiters:
            raise ValueError(f"request id {request_id!r} is already waiting")
        if slot_available and self._waiters:
            raise ValueError("slot_available with requests waiting: release() the slot instead")
        if not math.isfinite(bid) or bid < 0:
            raise ValueError(f"bid must be finite and non-negative, got {bid!r}")
        budget = self.budget(caller, now)
        if slot_available:
            self.last_price = 0.0
            return Admission(request_id, caller, min(bid, budget.available(now)), 0.0, 0.0)
        evicted: str | None = None
        start = max(self._virtual, self._next_start.get(caller, 0))
        if len(self._waiters) >= self.params.max_queue:
            last = self._order[-1]
            if (-min(bid, budget.available(now)), start) >= last[:2]:
                return Rejected(request_id, "queue full of bids served before it")
            evicted = last[3]
            self._remove(evicted, now)
            # the victim may have been this caller's own latest waiter: its tag is free again
            start = max(self._virtual, self._next_start.get(caller, 0))
        effective = budget.reserve(bid, now)
        self._seq += 1
        waiter = _Waiter(request_id, caller, effective, start, self._seq, now)
        self._waiters[request_id] = waiter
        self._waiting[caller] = self._waiting.get(caller, 0) + 1
        self._next_start[caller] = start + 1
        bisect.insort(self._order, waiter.key())
        return Queued(request_id, effective, len(self._waiters), evicted)

    def release(self, now: float, slots: int = 1) -> list[Admission]:
        """``slots`` slots freed: admit the best waiters at the highest losing bid."""
        count = min(max(0, slots), len(self._order))
        if count == 0:
            return []
        winners = self._order[:count]
        del self._order[:count]
        price_bid = -self._order[0][0] if self._order else 0.0
        admissions = []
        for neg_bid, start, _, request_id in winners:
            waiter = self._waiters.pop(request_id)
            self._virtual = max(self._virtual, start)
            price = min(price_bid, -neg_bid)
            self._stop_waiting(waiter, served=True).settle(waiter.bid, price, now)
            admissions.append(
                Admission(request_id, waiter.caller, waiter.bid, price, now - waiter.arrived)
            )
        self.last_price = price_bid
        return admissions

    def expire(self, now: float, max_wait: float) -> list[str]:
        """Drop waiters that have waited longer than ``max_wait`` (the sidecar answers 503)."""
        expired = []
        for request_id, waiter in self._waiters.items():
            if now - waiter.arrived <= max_wait:
                break  # arrival order: everyone after arrived later
            expired.append(request_id)
        for request_id in expired:
            self._remove(request_id, now)
        return expired

    def cancel(self, request_id: str, now: float) -> bool:
        """Drop a waiter whose client went away; False if it was not waiting."""
        if request_id not in self._waiters:
            return False
        self._remove(request_id, now)
        return True

    def _remove(self, request_id: str, now: float) -> None:
        waiter = self._waiters.pop(request_id)
        index = bisect.bisect_left(self._order, waiter.key())
        del self._order[index]
        self._stop_waiting(waiter, served=False).settle(waiter.bid, 0.0, now)

    def _stop_waiting(self, waiter: _Waiter, *, served: bool) -> BidBudget:
        """The budget holding ``waiter``'s reservation, after counting it out of the queue.

        Never creates one: a caller with a request waiting always has its budget (see
        :meth:`_drop_idle_budgets`), and releasing into a fresh, full one would hand the caller
        its cap a second time.
        """
        left = self._waiting[waiter.caller] - 1
        if left:
            self._waiting[waiter.caller] = left
            if not served and waiter.start + 1 == self._next_start[waiter.caller]:
                # its latest waiter left unserved (evicted, expired, cancelled): the caller's
                # next request may take that tag again (at least V, as for anyone)
                self._next_start[waiter.caller] = waiter.start
        else:
            del self._waiting[waiter.caller]
            del self._next_start[waiter.caller]  # nothing waiting: it starts again at V
        return self._budgets[waiter.caller]

    def _drop_idle_budgets(self) -> None:
        """Drop least recently used budgets of callers with nothing waiting (never the
        newest one, which is the caller bidding now)."""
        newest = next(reversed(self._budgets))
        while len(self._budgets) > self.params.max_callers:
            for caller, budget in self._budgets.items():
                if caller != newest and caller not in self._waiting and budget.reserved == 0.0:
                    del self._budgets[caller]
                    break
            else:
                return
