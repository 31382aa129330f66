"""injector.iptables: the interception rules, one builder for iptables and ip6tables, and
their idempotence per family."""

from __future__ import annotations

import ipaddress
import itertools

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from injector.iptables import (
    InterceptionConfig,
    build_rules,
    cleanup_rules,
    commands,
    ip6tables_for,
)

NAT = ["-t", "nat"]
BINARIES = ("iptables", "ip6tables")
CONFIG = InterceptionConfig(outbound_port=16001, inbound_port=16006, proxy_uid=2000,
                            proxy_gid=3000, exclude_outbound_ports=(5432, 6379),
                            exclude_inbound_ports=(15020, 9090))


def family_rules(binary: str, config: InterceptionConfig = CONFIG) -> list[list[str]]:
    return [c[1:] for c in commands(build_rules(config), BINARIES) if c[0] == binary]


def test_default_rules_exactly() -> None:
    rules = build_rules(InterceptionConfig())
    assert rules == [
        [*NAT, "-N", "EQUILIBRIUM_INBOUND"],
        [*NAT, "-N", "EQUILIBRIUM_IN_REDIRECT"],
        [*NAT, "-N", "EQUILIBRIUM_OUTPUT"],
        [*NAT, "-N", "EQUILIBRIUM_REDIRECT"],
        [*NAT, "-A", "EQUILIBRIUM_REDIRECT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "15001"],
        [*NAT, "-A", "EQUILIBRIUM_IN_REDIRECT", "-p", "tcp", "-j", "REDIRECT",
         "--to-ports", "15006"],
        [*NAT, "-A", "PREROUTING", "-p", "tcp", "-j", "EQUILIBRIUM_INBOUND"],
        [*NAT, "-A", "EQUILIBRIUM_INBOUND", "-p", "tcp", "--dport", "15020", "-j", "RETURN"],
        [*NAT, "-A", "EQUILIBRIUM_INBOUND", "-p", "tcp", "-j", "EQUILIBRIUM_IN_REDIRECT"],
        [*NAT, "-A", "OUTPUT", "-p", "tcp", "-j", "EQUILIBRIUM_OUTPUT"],
        [*NAT, "-A", "EQUILIBRIUM_OUTPUT", "-m", "owner", "--uid-owner", "1337", "-j", "RETURN"],
        [*NAT, "-A", "EQUILIBRIUM_OUTPUT", "-m", "owner", "--gid-owner", "1337", "-j", "RETURN"],
        [*NAT, "-A", "EQUILIBRIUM_OUTPUT", "-o", "lo", "-j", "RETURN"],
        [*NAT, "-A", "EQUILIBRIUM_OUTPUT", "-p", "tcp", "-j", "EQUILIBRIUM_REDIRECT"],
    ]


def test_exclusions_come_before_the_redirect_and_are_deduplicated() -> None:
    config = InterceptionConfig(outbound_port=16001, inbound_port=16006, proxy_uid=2000,
                                proxy_gid=None, exclude_outbound_ports=(5432, 6379, 5432),
                                exclude_inbound_ports=(15020, 9090))
    rules = build_rules(config)
    outbound = [r for r in rules if r[2:4] == ["-A", "EQUILIBRIUM_OUTPUT"]]
    assert outbound == [
        [*NAT, "-A", "EQUILIBRIUM_OUTPUT", "-m", "owner", "--uid-owner", "2000", "-j", "RETURN"],
        [*NAT, "-A", "EQUILIBRIUM_OUTPUT", "-o", "lo", "-j", "RETURN"],
        [*NAT, "-A", "EQUILIBRIUM_OUTPUT", "-p", "tcp", "--dport", "5432", "-j", "RETURN"],
        [*NAT, "-A", "EQUILIBRIUM_OUTPUT", "-p", "tcp", "--dport", "6379", "-j", "RETURN"],
        [*NAT, "-A", "EQUILIBRIUM_OUTPUT", "-p", "tcp", "-j", "EQUILIBRIUM_REDIRECT"],
    ]
    inbound = [r for r in rules if r[2:4] == ["-A", "EQUILIBRIUM_INBOUND"]]
    assert [r[6:8] for r in inbound[:-1]] == [["--dport", "15020"], ["--dport", "9090"]]
    assert inbound[-1][-1] == "EQUILIBRIUM_IN_REDIRECT"
    assert rules[4][-2:] == ["--to-ports", "16001"]
    assert rules[5][-2:] == ["--to-ports", "16006"]


def test_cleanup_undoes_every_chain_and_jump() -> None:
    built = build_rules(InterceptionConfig())
    cleanup = cleanup_rules()
    jumps = [r for r in built if r[3] in ("PREROUTING", "OUTPUT")]
    assert [[*r[:2], "-D", *r[3:]] for r in jumps] == cleanup[:2]
    created = {r[3] for r in built if r[2] == "-N"}
    assert {r[3] for r in cleanup if r[2] == "-X"} == created
    assert {r[3] for r in cleanup if r[2] == "-F"} == created


@pytest.mark.parametrize("kwargs", [
    {"outbound_port": 0}, {"inbound_port": 70000}, {"exclude_outbound_ports": (0,)},
    {"outbound_port": 15006}, {"proxy_uid": -1},
])
def test_invalid_configs_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        InterceptionConfig(**kwargs)  # type: ignore[arg-type]


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
