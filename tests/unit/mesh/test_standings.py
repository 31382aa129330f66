"""mesh.standings through the reputation book: the periodic reads (gauge digest, snapshot)
agree with a full scan of every standing, and their work per read is bounded by what
changed, not by how many callers are tracked (issue 14, finding 14; counted, not timed)."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.reputation import ANONYMOUS, LadderRules, Phase, PolicingParams, ReputationBook
from mesh.standings import busy_key


def full_scan(book: ReputationBook, now: float, named: set[str]) -> tuple[object, ...]:
    every = book.standings(now)
    others = [s for s in every if s.caller not in named]
    return (
        sorted((s.caller, s.reputation, s.level) for s in every if s.caller in named),
        len(others),
        min((s.reputation for s in others), default=1.0),
        max((s.level for s in others), default=0),
        sum(s.phase is Phase.PUNISHED for s in every),
    )


def digest_view(book: ReputationBook, now: float, named: set[str]) -> tuple[object, ...]:
    d = book.gauge_digest(now, named)
    return (sorted((s.caller, s.reputation, s.level) for s in d.named), d.others,
            d.others_worst_reputation, d.others_worst_level, d.punished)


_events = st.lists(
    st.tuples(st.integers(0, 30), st.floats(0.0, 3.0), st.booleans(), st.booleans()),
    max_size=150,
)


@settings(max_examples=120, deadline=None)
@given(_events)
def test_the_digest_and_the_snapshot_agree_with_a_full_scan(events) -> None:
    params = PolicingParams(capacity=20.0, max_callers=12, idle_ttl=300.0,
                            ladder=LadderRules(base_punishment=5.0, max_punishment=60.0,
                                               probation=10.0))
    book = ReputationBook(params)
    book.update_load(0.0, 1.0)  # congested: the rate norm applies, callers get punished
    named = {ANONYMOUS, "c1", "c2"}
    now = 0.0
    for caller, dt, retry, read in events:
        now += dt
        book.admit(ANONYMOUS if caller == 0 else f"c{caller}", now, is_retry=retry)
        if read:
            assert digest_view(book, now, named) == full_scan(book, now, named)
            snap = book.snapshot(now, top=4)
            every = book.standings(now)
            expect = sorted(every, key=lambda s: (-s.recent_requests, s.caller))[:4]
            busiest = snap.callers[:len(expect)]  # (the anonymous bucket may follow)
            assert len(busiest) == len(expect)
            for got, want in zip(busiest, expect, strict=True):  # same counts, same order
                assert math.isclose(got.recent_requests, want.recent_requests, rel_tol=1e-9)
            if all(s.caller != ANONYMOUS for s in busiest) and book.standing(ANONYMOUS, now):
                assert snap.callers[-1].caller == ANONYMOUS
            assert snap.tracked == len(every)
            assert snap.punished == sum(s.phase is Phase.PUNISHED for s in every)


def test_the_work_per_read_is_bounded_by_the_callers_that_changed() -> None:
    """10,000 callers: after the first read, a tick where 10 callers made requests costs a
    few operations per changed caller, not one per tracked caller."""
    book = ReputationBook(PolicingParams(capacity=1000.0, max_callers=20_000))
    now = 0.0
    for i in range(10_000):
        now += 0.0001
        book.admit(f"caller-{i}", now)
    named = {ANONYMOUS, *(f"caller-{i}" for i in range(50))}  # the labelled ones
    book.gauge_digest(now, named)
    book.snapshot(now, top=20)
    index = book._index
    for tick in range(20):  # ten seconds of 0.5 s ticks, 10 busy callers each
        for j in range(10):
            now += 0.05
            book.admit(f"caller-{(tick * 37 + j * 101) % 10_000}", now)
        before = index.operations
        book.gauge_digest(now, named)
        digest_work = index.operations - before
        before = index.operations
        book.snapshot(now, top=20)
        snapshot_work = index.operations - before
        assert digest_work <= 10 * 3 + 2 * (10 + len(named)) + 2, digest_work
        assert snapshot_work <= 2 * (20 + 10) + 2, snapshot_work


def test_busy_key_orders_decayed_counts_as_they_decay() -> None:
    tau = 60.0
    a = [(5.0, 100.0), (1.0, 130.0)]  # (count, as of)
    b = [(4.0, 125.0)]
    for now in (130.0, 200.0, 1000.0):
        value = [sum(c * math.exp(-(now - t) / tau) for c, t in parts) for parts in (a, b)]
        assert (busy_key(a, tau) > busy_key(b, tau)) == (value[0] > value[1])
    assert busy_key([(0.0, 5.0)], tau) == -math.inf
    assert math.isfinite(busy_key([(1.0, 1e7)], tau))  # a large monotonic clock: no overflow
