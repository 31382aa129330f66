"""``mesh/`` is the sans-I/O core: no I/O libraries, no clock, no global random generator.

import-linter checks the import graph too (``lint-imports``, contract in pyproject.toml); this
test also catches calls that an import contract cannot see, such as ``time.monotonic()``.
"""

from __future__ import annotations

import ast
from pathlib import Path

MESH = Path(__file__).resolve().parents[3] / "mesh"
FORBIDDEN_MODULES = {"asyncio", "aiohttp", "redis", "cvxpy", "socket", "requests", "httpx",
                     "threading", "subprocess", "wire", "sidecar", "signaler", "injector",
                     "equilibrium"}
FORBIDDEN_CALLS = {("time", "time"), ("time", "monotonic"), ("time", "perf_counter"),
                   ("time", "sleep"), ("datetime", "now"), ("os", "urandom")}
GLOBAL_RANDOM = {"random", "uniform", "choice", "choices", "randint", "randrange", "shuffle",
                 "sample", "gauss", "rand", "randn", "normal", "seed"}


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "").split(".")[0]]
        else:
            names = []
        found += [f"{path.name}:{node.lineno} imports {n}" for n in names
                  if n in FORBIDDEN_MODULES]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            chain = []
            while isinstance(owner, ast.Attribute):
                chain.append(owner.attr)
                owner = owner.value
            if isinstance(owner, ast.Name):
                chain.append(owner.id)
            root = chain[-1] if chain else ""
            attr = node.func.attr
            if (root, attr) in FORBIDDEN_CALLS or (
                root in {"random", "np", "numpy"} and attr in GLOBAL_RANDOM
                and (root == "random" or "random" in chain)
            ):
                found.append(f"{path.name}:{node.lineno} calls {'.'.join(reversed(chain))}.{attr}")
    return found


def test_mesh_has_no_io_clock_or_global_rng() -> None:
    files = sorted(MESH.glob("*.py"))
    assert files, "mesh/ not found"
    problems = [v for f in files for v in _violations(f)]
    assert problems == []


def test_the_checker_itself_catches_violations(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import asyncio\nimport time\nimport random\nimport numpy as np\n"
                   "time.monotonic()\nrandom.random()\nnp.random.choice([1])\n")
    assert len(_violations(bad)) == 4
