"""equilibrium.lab.analysis: the report metrics (time to shift, flapping, shares) on records
with known answers."""

from __future__ import annotations

import pytest

from equilibrium.lab import analysis
from equilibrium.lab.loadgen import Record


def _records(shares: list[dict[str, int]], t0: float = 100.0) -> list[Record]:
    """One second per entry; each entry says how many requests each pod answered."""
    out = []
    seq = 0
    for second, counts in enumerate(shares):
        n = sum(counts.values())
        i = 0
        for pod, k in counts.items():
            for _ in range(k):
                out.append(Record("c", seq, t0 + second + i / n, 0.5 if pod == "bad" else 0.01,
                                  200, pod))
                seq += 1
                i += 1
    return out


def test_time_to_shift_flapping_and_shares_on_known_records() -> None:
    pods = ["a", "b", "bad"]
    seconds = [
        {"a": 40, "b": 40, "bad": 20},
        {"a": 45, "b": 45, "bad": 10},
        {"a": 47, "b": 47, "bad": 6},   # still >= 5 %
        {"a": 49, "b": 49, "bad": 2},
        {"a": 60, "b": 39, "bad": 1},
        {"a": 40, "b": 59, "bad": 1},
    ]
    recs = _records(seconds)
    wins = analysis.windows(recs, 100.0, 1.0, 6.0)
    assert [w.answered for w in wins] == [100] * 6
    assert analysis.share_series(wins, "bad") == [0.2, 0.1, 0.06, 0.02, 0.01, 0.01]
    assert analysis.time_to_shift(wins, "bad") == 3.0
    assert analysis.flapping_index(wins[3:], pods) == pytest.approx(20.0)
    assert analysis.flapping_index(wins[:1], pods) != analysis.flapping_index(wins[:1], pods)
    assert analysis.share_between(recs, "bad", 100.0, 102.0) == pytest.approx(0.15)
    m = analysis.run_metrics(recs, 100.0, 6.0, pods, "bad", flap_window=1.0, first_window=1.0)
    assert m.bad_share_first == pytest.approx(0.2)
    assert m.bad_share_steady == pytest.approx(4 / 300)
    assert m.time_to_shift == 3.0
    assert (m.first_under, m.relapses) == (3.0, 0)
    assert m.flapping_pp == pytest.approx(20.0)
    assert m.pod_totals["bad"] == 40
    assert m.steady_latency["p99"] == 0.5 and m.steady_latency["p50"] == 0.01


def test_time_to_shift_is_none_when_never_shifted_and_zero_when_never_high() -> None:
    stuck = analysis.windows(_records([{"a": 80, "bad": 20}] * 3), 100.0, 1.0, 3.0)
    assert analysis.time_to_shift(stuck, "bad") is None
    clean = analysis.windows(_records([{"a": 99, "bad": 1}] * 3), 100.0, 1.0, 3.0)
    assert analysis.time_to_shift(clean, "bad") == 0.0
    assert analysis.flapping_index(clean, ["a", "bad"]) == 0.0
    assert analysis.share_noise_pp(clean, ["a", "bad"]) > 0
    relapse = analysis.windows(
        _records([{"a": 80, "bad": 20}, {"a": 99, "bad": 1}, {"a": 90, "bad": 10},
                  {"a": 99, "bad": 1}]), 100.0, 1.0, 4.0)
    assert analysis.first_under(relapse, "bad") == (1.0, 1)
    assert analysis.time_to_shift(relapse, "bad") == 3.0
    assert analysis.first_under(stuck, "bad") == (None, 0)
