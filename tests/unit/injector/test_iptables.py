"""The interception rules (injector/iptables.py) and `equilibrium init --dry-run`."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from equilibrium.cli import main
from injector.iptables import InterceptionConfig, build_rules, cleanup_rules

NAT = ["-t", "nat"]


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


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run_init(capsys: pytest.CaptureFixture[str]) -> Callable[..., Run]:
    """`equilibrium init ARGS` through the real entry point, in this process."""
    def run(*args: str) -> Run:
        try:
            code = main(["init", *args])
        except SystemExit as exc:  # argparse errors
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return Run(code, out.out, out.err)
    return run


def test_dry_run_prints_exactly_the_rules(run_init: Callable[..., Run]) -> None:
    done = run_init("--dry-run", "--exclude-outbound-ports", "5432",
                    "--exclude-inbound-ports", "15020,9090")
    assert done.returncode == 0, done.stderr
    expected = build_rules(InterceptionConfig(exclude_outbound_ports=(5432,),
                                              exclude_inbound_ports=(15020, 9090)))
    assert done.stdout.splitlines() == [shlex.join([binary, *r])
                                        for binary in ("iptables", "ip6tables") for r in expected]

    done = run_init("--dry-run", "--cleanup", "--iptables", "iptables-legacy")
    assert done.stdout.splitlines() == [shlex.join([binary, *r])
                                        for binary in ("iptables-legacy", "ip6tables-legacy")
                                        for r in cleanup_rules()]


def test_bad_port_flags_fail_with_a_message(run_init: Callable[..., Run]) -> None:
    done = run_init("--dry-run", "--exclude-outbound-ports", "5432,http")
    assert done.returncode == 2
    assert "'http' is not a port" in done.stderr
