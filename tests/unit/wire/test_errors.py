"""wire.errors: one vocabulary of reasons, one error type, and decoders that raise nothing else."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.wire_samples import (
    verify,
)
from wire.errors import Reason, WireError
from wire.summary import decode_summary


def test_reasons_are_the_documented_metric_labels() -> None:
    stream_entries = {
        "malformed", "oversized", "version", "unsigned", "bad-signature", "wrong-upstream",
        "wrong-sidecar", "endpoint-mismatch", "stale", "fenced", "not-yet-valid", "expired",
        "deleted",
    }
    headers = {"too-long", "out-of-range", "missing", "unsupported-version", "future",
               "replayed", "wrong-caller", "elsewhere"}
    bids = {"nan", "infinite", "negative", "too-large"}
    mesh_key = {"no-key", "weak-key", "unreadable"}
    assert {r.value for r in Reason} == stream_entries | headers | bids | mesh_key


def test_the_message_names_the_subject_or_the_reason() -> None:
    assert str(WireError(Reason.MALFORMED, "missing level", "X-GT-Congestion")) == (
        "X-GT-Congestion: missing level")
    stale = WireError(Reason.STALE, "epoch 3 is older than 4")
    assert str(stale) == "stale: epoch 3 is older than 4" and stale.subject == ""
    assert isinstance(WireError(Reason.MALFORMED, "x"), ValueError)


_text_or_bytes = st.one_of(st.text(max_size=40), st.binary(max_size=40))
_any_value = st.one_of(_text_or_bytes, st.integers(), st.none(), st.floats())


@settings(max_examples=120, deadline=None)
@given(st.dictionaries(_text_or_bytes, _any_value, max_size=20))
def test_decoders_only_raise_protocol_error_on_arbitrary_maps(entry: dict) -> None:
    with pytest.raises(WireError):
        decode_summary(entry)
    with pytest.raises(WireError):
        verify(entry)
