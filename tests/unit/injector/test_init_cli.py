"""injector.init_cli (`equilibrium init`): ``--dry-run`` prints exactly the rules, for both
families unless told otherwise; bad flags are usage errors; and the import path stays free of
numpy, since it starts in every meshed pod (run in a fresh interpreter, with the exact
arguments the injector gives the init container plus ``--dry-run`` so nothing is installed).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from equilibrium.cli import main
from injector.config import InjectorConfig
from injector.iptables import (
    InterceptionConfig,
    build_rules,
    cleanup_rules,
    commands,
)
from injector.review import review
from tests.injector_support import apply_patch, decode_patch, make_pod, make_review
from tests.integration.procs import REPO_ROOT

BINARIES = ("iptables", "ip6tables")
HEAVY = ("numpy", "mesh.profiles", "cvxpy", "aiohttp")

# Runs `equilibrium init ARGS` through the real entry point, then reports what got imported.
PROBE = (
    "import json, sys\n"
    "from equilibrium.cli import main\n"
    "code = main(sys.argv[1:])\n"
    f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
    "print(json.dumps({'code': code, 'heavy': heavy}), file=sys.stderr)\n"
)


def injected_init_args(annotations: dict[str, str]) -> list[str]:
    pod = make_pod({"equilibrium.io/inject": "true", **annotations}, ports=(8080, 9090))
    patched = apply_patch(pod, decode_patch(review(make_review(pod), InjectorConfig())))
    (init,) = patched["spec"]["initContainers"]
    return list(init["args"])


@pytest.mark.parametrize("annotations", [
    {"equilibrium.io/exclude-outbound-ports": "5432"},
    {"equilibrium.io/ipv6": "required"},
    {"equilibrium.io/ipv6": "off", "equilibrium.io/strategy": "conservative"},
])
def test_the_injected_init_command_does_not_import_numpy(annotations: dict[str, str]) -> None:
    args = injected_init_args(annotations)
    assert args[0] == "init" and "--exclude-inbound-ports" in args  # port flags are parsed
    done = subprocess.run([sys.executable, "-c", PROBE, *args, "--dry-run"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    report = json.loads(done.stderr.strip().splitlines()[-1])
    assert report["code"] == 0, done.stderr
    assert report["heavy"] == [], f"`equilibrium init` imported {report['heavy']}"
    assert done.stdout.startswith("iptables -t nat ")  # it really ran


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
