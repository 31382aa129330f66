"""Dual-stack interception rules: one builder for iptables and ip6tables, IPv6 detection,
and `equilibrium init --dry-run`'s IPv6 flags."""

from __future__ import annotations

import ipaddress
import itertools
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from equilibrium.cli import main
from injector.iptables import (
    InterceptionConfig,
    build_rules,
    cleanup_rules,
    commands,
    ip6tables_for,
)
from injector.ipv6_probe import ipv6_state, parse_if_inet6, probe

BINARIES = ("iptables", "ip6tables")
CONFIG = InterceptionConfig(outbound_port=16001, inbound_port=16006, proxy_uid=2000,
                            proxy_gid=3000, exclude_outbound_ports=(5432, 6379),
                            exclude_inbound_ports=(15020, 9090))


def family_rules(binary: str, config: InterceptionConfig = CONFIG) -> list[list[str]]:
    return [c[1:] for c in commands(build_rules(config), BINARIES) if c[0] == binary]


# ---------------------------------------------------------------- the same rules, both families


def test_ipv6_gets_exactly_the_ipv4_rules_through_ip6tables() -> None:
    built = commands(build_rules(CONFIG), BINARIES)
    half = len(built) // 2
    assert [c[0] for c in built] == ["iptables"] * half + ["ip6tables"] * half
    assert [c[1:] for c in built[half:]] == [c[1:] for c in built[:half]] == build_rules(CONFIG)


def test_ipv6_exemptions_and_excluded_ports_precede_the_redirect() -> None:
    output = [r[4:] for r in family_rules("ip6tables") if r[2:4] == ["-A", "EQUILIBRIUM_OUTPUT"]]
    assert output == [
        ["-m", "owner", "--uid-owner", "2000", "-j", "RETURN"],
        ["-m", "owner", "--gid-owner", "3000", "-j", "RETURN"],
        ["-o", "lo", "-j", "RETURN"],  # ::1 and the pod's own IPv6 addresses
        ["-p", "tcp", "--dport", "5432", "-j", "RETURN"],
        ["-p", "tcp", "--dport", "6379", "-j", "RETURN"],
        ["-p", "tcp", "-j", "EQUILIBRIUM_REDIRECT"],
    ]
    inbound = [r[4:] for r in family_rules("ip6tables") if r[2:4] == ["-A", "EQUILIBRIUM_INBOUND"]]
    assert inbound == [["-p", "tcp", "--dport", "15020", "-j", "RETURN"],
                       ["-p", "tcp", "--dport", "9090", "-j", "RETURN"],
                       ["-p", "tcp", "-j", "EQUILIBRIUM_IN_REDIRECT"]]
    redirects = [r[-2:] for r in family_rules("ip6tables") if "REDIRECT" in r]
    assert redirects == [["--to-ports", "16001"], ["--to-ports", "16006"]]


def _is_address(token: str) -> bool:
    try:
        ipaddress.ip_network(token, strict=False)
    except ValueError:
        return False
    return not token.isdigit()  # a bare port number parses as an IPv4 integer address


@given(
    outbound=st.integers(1, 65535), inbound=st.integers(1, 65535),
    uid=st.integers(0, 2**31), gid=st.none() | st.integers(0, 2**31),
    excluded_out=st.lists(st.integers(1, 65535), max_size=4),
    excluded_in=st.lists(st.integers(1, 65535), max_size=4),
)
def test_no_rule_names_an_address_so_both_families_can_share_them(
    outbound: int, inbound: int, uid: int, gid: int | None,
    excluded_out: list[int], excluded_in: list[int],
) -> None:
    assume(outbound != inbound)
    config = InterceptionConfig(outbound, inbound, uid, gid, tuple(excluded_out),
                                tuple(excluded_in))
    for rule in build_rules(config) + cleanup_rules():
        assert not any(_is_address(token) for token in rule), rule
        assert not {"-s", "-d", "--to-destination"} & set(rule), rule


# ---------------------------------------------------------------- idempotence, per family


class NatTable:
    """The nat table as iptables keeps it, enough to run our commands: chains of rules, and
    the refusals that matter (a chain that exists, a missing rule, deleting a referenced or
    non-empty chain)."""

    BUILTIN = ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")

    def __init__(self) -> None:
        self.chains: dict[str, list[tuple[str, ...]]] = {c: [] for c in self.BUILTIN}

    def run(self, argv: list[str]) -> int:
        assert argv[:2] == ["-t", "nat"], argv
        op, chain, *spec = argv[2:]
        rules = self.chains.get(chain)
        target = spec[spec.index("-j") + 1] if "-j" in spec else None
        if op == "-N" and rules is None:
            self.chains[chain] = []
        elif op == "-A" and rules is not None and (
                target in (None, "RETURN", "REDIRECT") or target in self.chains):
            rules.append(tuple(spec))
        elif op == "-D" and rules is not None and tuple(spec) in rules:
            rules.remove(tuple(spec))
        elif op == "-F" and rules is not None:
            rules.clear()
        elif op == "-X" and rules == [] and chain not in self.BUILTIN and not any(
                chain in rule for rule in itertools.chain(*self.chains.values())):
            del self.chains[chain]
        else:
            return 1
        return 0


def init(tables: dict[str, NatTable], config: InterceptionConfig) -> None:
    """What `equilibrium init` does per binary: remove any earlier copy, then install."""
    for binary, *rule in commands(cleanup_rules(), BINARIES):
        tables[binary].run(rule)  # misses expected
    for binary, *rule in commands(build_rules(config), BINARIES):
        assert tables[binary].run(rule) == 0, (binary, rule)


def test_init_twice_leaves_one_copy_in_each_family_and_cleanup_removes_all() -> None:
    tables = {binary: NatTable() for binary in BINARIES}
    for table in tables.values():  # someone else's rule, which must survive everything
        table.run(["-t", "nat", "-A", "OUTPUT", "-d", "169.254.169.254", "-j", "RETURN"])
    init(tables, CONFIG)
    once = {binary: {k: list(v) for k, v in t.chains.items()} for binary, t in tables.items()}
    assert once["ip6tables"] == once["iptables"]
    assert len(once["ip6tables"]["EQUILIBRIUM_OUTPUT"]) == 6
    init(tables, CONFIG)
    assert {binary: t.chains for binary, t in tables.items()} == once

    for binary, *rule in commands(cleanup_rules(), BINARIES):
        assert tables[binary].run(rule) == 0, (binary, rule)  # every removal finds its rule
    for table in tables.values():
        assert table.chains == {**{c: [] for c in NatTable.BUILTIN},
                                "OUTPUT": [("-d", "169.254.169.254", "-j", "RETURN")]}


def test_a_changed_config_replaces_the_old_rules_in_both_families() -> None:
    tables = {binary: NatTable() for binary in BINARIES}
    init(tables, CONFIG)
    init(tables, InterceptionConfig(exclude_outbound_ports=(8125,)))
    for table in tables.values():
        assert ("-p", "tcp", "--dport", "5432", "-j", "RETURN") \
            not in table.chains["EQUILIBRIUM_OUTPUT"]
        assert ("-p", "tcp", "--dport", "8125", "-j", "RETURN") \
            in table.chains["EQUILIBRIUM_OUTPUT"]


@pytest.mark.parametrize(("iptables", "ip6tables"), [
    ("iptables", "ip6tables"), ("iptables-legacy", "ip6tables-legacy"),
    ("iptables-nft", "ip6tables-nft"), ("/usr/sbin/iptables-legacy",
                                        "/usr/sbin/ip6tables-legacy"),
])
def test_the_ip6tables_binary_follows_the_iptables_one(iptables: str, ip6tables: str) -> None:
    assert ip6tables_for(iptables) == ip6tables


def test_an_iptables_name_without_a_twin_is_refused() -> None:
    with pytest.raises(ValueError, match="pass --ip6tables"):
        ip6tables_for("/opt/bin/xtables")


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


# ---------------------------------------------------------------- init --dry-run flags


@pytest.fixture
def init_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    def run(*args: str) -> tuple[int, str, str]:
        try:
            code = main(["init", *args])
        except SystemExit as exc:
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


def test_dry_run_shows_both_families_unless_told_otherwise(
    init_cli: Callable[..., tuple[int, str, str]],
) -> None:
    rules = build_rules(InterceptionConfig())
    code, out, _ = init_cli("--dry-run")
    assert code == 0
    assert out.splitlines() == [shlex.join(c) for c in commands(rules, BINARIES)]
    code, out, _ = init_cli("--dry-run", "--no-ipv6")
    assert out.splitlines() == [shlex.join(c) for c in commands(rules, ["iptables"])]
    code, out, _ = init_cli("--dry-run", "--ipv6", "--ip6tables", "/sbin/ip6tables-legacy")
    assert out.splitlines() == [shlex.join(c) for c in commands(
        rules, ["iptables", "/sbin/ip6tables-legacy"])]


def test_an_underivable_ip6tables_is_a_usage_error_unless_ipv6_is_off(
    init_cli: Callable[..., tuple[int, str, str]],
) -> None:
    code, out, err = init_cli("--dry-run", "--iptables", "/opt/xtables")
    assert (code, out) == (2, "")
    assert "cannot derive the ip6tables binary from '/opt/xtables': pass --ip6tables" in err
    code, out, _ = init_cli("--dry-run", "--iptables", "/opt/xtables", "--no-ipv6")
    assert code == 0 and out.startswith("/opt/xtables -t nat -N EQUILIBRIUM_INBOUND\n")
