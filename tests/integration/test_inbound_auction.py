"""Under overload the bid queue decides: high bids first, each winner charged the second price
(real sidecar processes; the app's capacity is fixed)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from equilibrium.lab.bench.policing import Shot, open_loop
from tests.integration.inbound_support import (
    UPSTREAM,
    AppProcess,
    mesh,
    p99,
    shots_of,
    write_config,
)

SERVERS, SERVICE = 4, 0.1  # 40 requests/s
RATE = 25.0  # per caller: 50 requests/s together, 25 % over capacity
HIGH, LOW = 5.0, 1.0
POLICING = {
    "max_wait": 2,
    # this test is about the auction: both callers send the same rate, so keep the rate norm
    # out of the way, and give budgets that never bind
    "reputation": {"rate_tolerance": 10},
    "auction": {"budget_rate": 1000, "budget_cap": 10000},
}


@pytest.mark.slow
async def test_high_bids_are_served_first_and_pay_the_second_price(tmp_path: Path) -> None:
    app = await AppProcess.start(SERVERS, SERVICE)
    config = write_config(tmp_path / "policing.json", POLICING)
    try:
        async with mesh(app.url, ["high", "low"], config) as m, \
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            urls = {name: proc.outbound_url for name, proc in m.callers.items()}

            async def load(rate: float, duration: float) -> list[Shot]:
                return await shots_of(*(
                    open_loop(session, urls[name], caller=name, rate=rate, duration=duration,
                              host=UPSTREAM, headers={"X-Equilibrium-Bid": f"{bid:g}"})
                    for name, bid in (("high", HIGH), ("low", LOW))))

            calm = await load(4.0, 2.0)  # uncongested: everyone admitted at once, price 0
            overload = await load(RATE, 6.0)
            paid_metric = await asyncio.to_thread(
                m.server.metric, "equilibrium_inbound_price_paid_total", caller="high")
    finally:
        await app.stop()

    bids = {"high": HIGH, "low": LOW}
    high = [s for s in overload if s.caller == "high"]
    low = [s for s in overload if s.caller == "low"]
    prices = [(s.caller, s.price) for s in overload if s.price is not None]
    story = (f"p99 high {p99(high):.3f}s low {p99(low):.3f}s; high statuses "
             f"{sorted({s.status for s in high})}, low {sorted({s.status for s in low})}; "
             f"prices {sorted(set(prices))}")
    assert all(s.status == 200 and s.price == 0 for s in calm), story
    # the auction decides: high bids clearly ahead
    assert all(s.status == 200 for s in high), story
    assert p99(high) < 0.5 * p99(low), story
    # nobody pays more than their bid; winners pay the highest losing bid (second price):
    # high bidders mostly beat a waiting low bid and pay 1, not their own 5
    assert prices and all(price <= bids[caller] for caller, price in prices), story
    assert {price for _, price in prices} <= {0.0, LOW, HIGH}, story
    assert any(caller == "high" and price == LOW for caller, price in prices), story
    assert paid_metric >= sum(p for c, p in prices if c == "high") - 1e-6, story
