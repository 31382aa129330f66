"""injector.ipv6_probe: IPv6 detection from ``/proc/net/if_inet6`` and its verdicts."""

from __future__ import annotations

from pathlib import Path

import pytest

from injector.ipv6_probe import ipv6_state, parse_if_inet6, probe

# ---------------------------------------------------------------- IPv6 detection

LO = "00000000000000000000000000000001 01 80 10 80       lo\n"
ETH0_ULA = "fd000201000000000000000000000001 04 40 00 80     eth0\n"
ETH0_LINK = "fe8000000000000000fc00fffe000001 04 40 20 80     eth0\n"


def test_if_inet6_lines_are_parsed() -> None:
    assert [(n, str(a)) for n, a in parse_if_inet6(LO + ETH0_ULA + "\n")] == \
        [("lo", "::1"), ("eth0", "fd00:201::1")]


@pytest.mark.parametrize("text", [
    "0001 01 80 10 80 lo\n", LO.replace(" lo", ""), "zz" * 16 + " 01 80 10 80 lo\n",
])
def test_a_malformed_if_inet6_is_not_trusted(text: str) -> None:
    with pytest.raises(ValueError, match="line 1"):
        parse_if_inet6(text)
    state = ipv6_state(text)
    assert not state.intercept and state.traffic_possible and "unreadable" in state.reason


def test_the_verdicts() -> None:
    on = ipv6_state(LO + ETH0_ULA + ETH0_LINK)
    assert on.intercept
    assert on.reason == "IPv6 is on (lo ::1, eth0 fd00:201::1, eth0 fe80::fc:ff:fe00:1)"
    assert ipv6_state(LO).intercept  # IPv4-only pod on an IPv6 kernel: harmless, covered
    assert ipv6_state(LO).reason == "IPv6 is on (lo ::1, no other address)"

    no_kernel = ipv6_state(None)
    assert (no_kernel.intercept, no_kernel.traffic_possible) == (False, False)
    assert "no /proc/net/if_inet6" in no_kernel.reason
    disabled = ipv6_state("")
    assert (disabled.intercept, disabled.traffic_possible) == (False, False)
    # IPv6 on eth0 but lo has no ::1: traffic could flow but not be redirected anywhere.
    no_loopback = ipv6_state(ETH0_ULA + ETH0_LINK)
    assert (no_loopback.intercept, no_loopback.traffic_possible) == (False, True)
    assert "lo has no ::1" in no_loopback.reason and "eth0 fd00:201::1" in no_loopback.reason
    assert not ipv6_state(LO.replace(" lo", " eth9")).intercept  # ::1 elsewhere is no lo


def test_probe_reads_the_file_and_a_missing_one_means_no_ipv6(tmp_path: Path) -> None:
    path = tmp_path / "if_inet6"
    path.write_text(LO + ETH0_ULA)
    assert probe(path) == ipv6_state(LO + ETH0_ULA)
    assert probe(tmp_path / "missing") == ipv6_state(None)
