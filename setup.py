"""Build hook: the hot modules (the sidecar's request path, the routing core, the simulator's event
loop) compiled to C extensions with mypyc, on request.

Everything else about the package is in pyproject.toml. By default nothing is compiled and the
package is pure Python, exactly as without this file. With ``EQUILIBRIUM_COMPILE=1`` and mypyc
importable (it ships with mypy, the ``test`` extra), the modules of :data:`COMPILED` are compiled
as well: ``make compile`` builds them in place, next to their sources;
``EQUILIBRIUM_COMPILE=1 pip install --no-build-isolation .`` into a platform wheel (an isolated
build has no mypy). Without mypyc the build warns and stays pure Python. A compiled module is
the same typed Python, run without the interpreter's per-step overhead (docs/benchmarks.md,
"the request path compiled with mypyc": a quarter less CPU per request saturated, no change at
500 req/s; docs/simulate.md, "Cost", for the simulator at scale).
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

# The modules on the outbound HTTP/1.1 request path (docs/benchmarks.md, "Where the CPU still
# goes"), then the core's and the simulator's. Each group becomes one shared library inside its
# own package, so a process loads only the packages it imports (the signaler never loads the
# sidecar's). Not compiled: modules that declare runtime-checkable Protocols (mesh/policy.py,
# mesh/hedging.py), which mypyc does not support.
COMPILED: dict[str, list[str]] = {
    "sidecar": [
        "sidecar/http1/server.py",
        "sidecar/http1/client_connection.py",
        "sidecar/http1/client.py",
        "sidecar/exchange.py",
        "sidecar/forward.py",
        "sidecar/outbound.py",
        "sidecar/phases.py",
        "sidecar/identity_phase.py",
        "sidecar/watchdog.py",
        "sidecar/rescue.py",
        "sidecar/metrics.py",
    ],
    # the routing core: what every sidecar runs per request and per tick, and what the
    # simulator runs a thousand times over (docs/simulate.md, "Cost")
    "mesh": [
        "mesh/pacing.py",
        "mesh/policies.py",
        "mesh/estimators.py",
        "mesh/regret.py",
        "mesh/herd.py",
        "mesh/probes.py",
        "mesh/concurrency.py",
        "mesh/probation.py",
    ],
    # the simulator's event loop and its sidecars and pods (the lab's, not the product's)
    "equilibrium": [
        "equilibrium/lab/simulate/engine.py",
        "equilibrium/lab/simulate/sidecar.py",
        "equilibrium/lab/simulate/pods.py",
    ],
}


def compiled_extensions() -> list[object]:
    if os.environ.get("EQUILIBRIUM_COMPILE", "") != "1":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("EQUILIBRIUM_COMPILE=1 but mypyc is not installed (pip install mypy): building "
              "pure Python", file=sys.stderr)
        return []
    groups = [(paths, f"{package}._compiled") for package, paths in COMPILED.items()]
    paths = [path for group, _ in groups for path in group]
    # pyproject's mypy sections name every package; mypyc sees only these files
    return list(mypycify(["--no-warn-unused-configs", *paths], separate=groups, opt_level="3"))


setup(ext_modules=compiled_extensions())
