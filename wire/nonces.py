"""The nonces of identities already used: what makes a captured ``X-GT-Identity`` single-use.

Owns :class:`NonceBook`, the inbound side's memory of the nonces of identities it trusted
(:mod:`wire.identity`). A nonce is remembered until its identity could no longer pass the
freshness check anyway (signing time + ``max_skew``), so the book holds at most the identities
of one window. Memory is bounded by ``capacity``: past it the oldest entries go first (counted
in :attr:`NonceBook.evicted_live`, and what the operator must size for: ``capacity`` >= the
trusted request rate times twice ``max_skew``). Pure: ``now`` (unix seconds, the same clock
the identity was checked with) is passed in; no I/O, no clock.
"""

from __future__ import annotations

from collections import OrderedDict

DEFAULT_CAPACITY = 200_000
"""Nonces remembered at most (about 30 MB); enough for ~3,300 trusted requests/s at the
default 30 s skew."""


class NonceBook:
    """Which identity nonces were used within their window (see the module docstring)."""

    def __init__(self, max_skew: float, capacity: int = DEFAULT_CAPACITY) -> None:
        if not max_skew > 0 or capacity < 1:
            raise ValueError("need max_skew > 0 and capacity >= 1")
        self.max_skew = max_skew
        self.capacity = capacity
        self._until: OrderedDict[str, float] = OrderedDict()  # nonce -> forget after
        self.evicted_live = 0
        """Entries dropped before their window ended (the book was full)."""

    def __len__(self) -> int:
        return len(self._until)

    def first_use(self, nonce: str, issued_at: float, now: float) -> bool:
        """Record ``nonce`` (of an identity signed at ``issued_at`` that just verified at
        ``now``); False if it was already used within its window: a replay."""
        self._forget(now)
        if nonce in self._until:
            return False
        self._until[nonce] = issued_at + self.max_skew  # when the identity expires anyway
        while len(self._until) > self.capacity:
            _, until = self._until.popitem(last=False)
            if until >= now:
                self.evicted_live += 1
        return True

    def _forget(self, now: float) -> None:
        """Drop the oldest entries whose window has passed (insertion order is close to
        expiry order; an entry out of order is dropped when it reaches the front)."""
        while self._until:
            nonce, until = next(iter(self._until.items()))
            if until >= now:
                break
            del self._until[nonce]
