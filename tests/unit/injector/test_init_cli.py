"""`equilibrium init` starts in every meshed pod: its import path must stay free of numpy.

Run in a fresh interpreter (this process has numpy loaded already) with the exact arguments the
injector gives the init container, plus ``--dry-run`` so nothing is installed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from injector.config import InjectorConfig
from injector.review import review
from tests.injector_support import apply_patch, decode_patch, make_pod, make_review
from tests.integration.procs import REPO_ROOT

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
