"""wire.nonces: identity nonces are single-use within their window; memory is bounded."""

from __future__ import annotations

import pytest

from wire.nonces import NonceBook


def test_a_nonce_is_used_once_within_its_window_and_forgotten_after() -> None:
    book = NonceBook(max_skew=30.0)
    assert book.first_use("a", issued_at=100.0, now=100.5)
    assert not book.first_use("a", issued_at=100.0, now=110.0)  # the replay
    assert book.first_use("b", issued_at=100.0, now=110.0)
    # at 130.5 the identity of "a" (signed at 100) is expired anyway: forgotten
    assert book.first_use("c", issued_at=130.0, now=130.5)
    assert len(book) == 1


def test_an_identity_signed_ahead_is_remembered_from_its_signing_time() -> None:
    book = NonceBook(max_skew=30.0)
    assert book.first_use("ahead", issued_at=120.0, now=100.0)  # 20 s ahead: valid to 150
    book.first_use("x", issued_at=145.0, now=145.0)
    assert not book.first_use("ahead", issued_at=120.0, now=145.0)


def test_the_book_is_bounded_and_counts_what_it_dropped_early() -> None:
    book = NonceBook(max_skew=30.0, capacity=2)
    for nonce in ("a", "b", "c"):
        assert book.first_use(nonce, 100.0, 100.0)
    assert len(book) == 2 and book.evicted_live == 1
    assert book.first_use("a", 100.0, 100.0)  # dropped early: the documented limit


@pytest.mark.parametrize(("skew", "capacity"), [(0.0, 1), (1.0, 0)])
def test_bad_settings_are_refused(skew: float, capacity: int) -> None:
    with pytest.raises(ValueError):
        NonceBook(skew, capacity)
