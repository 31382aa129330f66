"""h2-overhead's small parts: HAProxy's h2c configuration and the h2load report parser."""

from __future__ import annotations

import pytest

from equilibrium.lab.bench import peers
from equilibrium.lab.bench.h2_overhead import parse_h2load

REPORT = """\
finished in 1.99s, 501.72 req/s, 31.55KB/s
requests: 1000 total, 1000 started, 998 done, 997 succeeded, 1 failed, 1 errored, 0 timeout
status codes: 995 2xx, 0 3xx, 1 4xx, 1 5xx
traffic: 62.89KB (64401) total, 3.22KB (3300) headers (space savings 95.93%), 6.84KB data
                     min         max         mean         sd        +/- sd
time for request:      551us      6.89ms      1.14ms       489us    90.50%
"""


def test_haproxy_h2_config_speaks_h2c_on_both_sides() -> None:
    text = peers.haproxy_h2_config("127.0.0.1:9000", ["http://127.0.0.1:7001"])
    assert "nbthread 1" in text
    assert "bind 127.0.0.1:9000 proto h2" in text
    assert "server pod-0 127.0.0.1:7001 proto h2" in text
    with pytest.raises(ValueError):
        peers.haproxy_h2_config("127.0.0.1:9000", [])


def test_parse_h2load_reads_counts_codes_and_times() -> None:
    res = parse_h2load(REPORT)
    assert (res.requests, res.succeeded, res.failed, res.non_2xx) == (998, 997, 1, 2)
    assert res.seconds == pytest.approx(1.99)
    assert res.mean == pytest.approx(1.14e-3) and res.max == pytest.approx(6.89e-3)


def test_parse_h2load_without_a_result_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="h2load printed no result"):
        parse_h2load("connect: Connection refused\n")
