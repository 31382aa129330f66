"""wire.keys: one hash slot per upstream; names that could not be keys are refused."""

from __future__ import annotations

import pytest

from wire.errors import Reason, WireError
from wire.keys import fence_key, leader_key, recommendation_stream, summary_stream


def test_keys_share_one_cluster_hash_slot_per_upstream() -> None:
    assert summary_stream("orders.shop") == "eq:{orders.shop}:summaries"
    assert recommendation_stream("orders.shop", "sc-1") == "eq:{orders.shop}:recs:sc-1"
    assert leader_key("orders.shop") == "eq:{orders.shop}:leader"
    assert fence_key("orders.shop") == "eq:{orders.shop}:fence"


@pytest.mark.parametrize("name", ["", "a}b", "a{b", "a b", "a:b", "-lead", "x" * 129, "é"])
def test_bad_names_never_become_keys(name: str) -> None:
    with pytest.raises(WireError) as err:
        summary_stream(name)
    assert err.value.reason is Reason.MALFORMED
    with pytest.raises(WireError):
        recommendation_stream("orders", name)
