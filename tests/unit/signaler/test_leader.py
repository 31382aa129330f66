"""signaler.leader: the leadership bookkeeping one replica keeps per upstream."""

from __future__ import annotations

from signaler.leader import Leadership


def test_leadership_transitions() -> None:
    lead = Leadership("sig-a")
    assert lead.update("orders", 0) == "standby"
    assert lead.update("orders", 7) == "elected"
    assert lead.update("orders", 7) == "renewed"
    assert lead.update("orders", 9) == "elected"  # re-elected under a new token
    assert lead.token("orders") == 9
    assert lead.update("orders", 0) == "deposed"
    assert lead.token("orders") is None
