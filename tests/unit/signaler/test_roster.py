"""signaler.roster: candidates are probed within a budget, active upstreams are forgotten when
no valid summary came for ``forget_after``."""

from __future__ import annotations

from signaler.roster import UpstreamRoster


def test_candidates_are_probed_within_the_budget_and_not_again_before_probe_every() -> None:
    roster = UpstreamRoster(forget_after=60.0, probe_every=30.0, probe_budget=50)
    junk = [f"junk-{i:03d}" for i in range(500)]
    first = roster.discovered(junk, now=0.0)
    assert len(first) == 50
    for upstream in first:
        roster.probed(upstream, valid=False, now=0.0)
    second = roster.discovered(junk, now=2.0)
    assert len(second) == 50 and not set(first) & set(second)
    probed = set()
    for t in range(0, 20, 2):  # 10 rounds within probe_every: each candidate at most once
        for upstream in roster.discovered(junk, float(t)):
            assert upstream not in probed
            probed.add(upstream)
            roster.probed(upstream, valid=False, now=float(t))
    assert roster.active == {}
    assert roster.discovered([], now=100.0) == [] and roster.next_probe == {}  # gone from SCAN


def test_a_valid_summary_makes_an_upstream_active_until_it_goes_quiet() -> None:
    roster = UpstreamRoster(forget_after=60.0, probe_every=30.0)
    assert roster.discovered(["orders"], 0.0) == ["orders"]
    roster.probed("orders", valid=True, now=0.0)
    assert roster.active == {"orders": 0.0}
    assert roster.discovered(["orders"], 1.0) == []  # active: not a candidate
    roster.seen("orders", 50.0)
    assert not roster.needs_probe("orders", 60.0) and roster.needs_probe("orders", 81.0)
    assert roster.expired(110.0) == []
    assert roster.expired(110.5) == ["orders"]
    assert roster.active == {} and roster.discovered(["orders"], 120.0) == []
    assert roster.discovered(["orders"], 140.5) == ["orders"]  # a candidate again
