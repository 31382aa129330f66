"""``equilibrium bench --scenario overload-bids`` end to end (short run, one mode)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import child_env


@pytest.mark.slow
def test_overload_bids_serves_the_high_bid_first_and_reports_prices(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "equilibrium", "bench", "--scenario", "overload-bids",
         "--duration", "4", "--overload-bids-modes", "equilibrium", "--out", "results"],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "results" / "overload-bids.json").read_text())
    eq = doc["data"]["modes"]["equilibrium"]
    high, low = eq["high"], eq["low"]
    assert high["success"] >= low["success"]
    assert high["latency"]["p99"] < low["latency"]["p99"]
    assert high["max_price"] is not None and high["max_price"] <= 5.0
    assert low["max_price"] is None or low["max_price"] <= 1.0
    assert (tmp_path / "results" / "overload-bids.md").read_text().count("| equilibrium |") == 2
