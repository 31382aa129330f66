"""The ``lab`` extra: the demo and the benchmarks need it, the mesh's own commands do not.

Real ``python`` subprocesses in which the extra's packages cannot be imported (their
``sys.modules`` entries are ``None``, so ``import matplotlib`` raises ImportError as on a machine
without them): ``equilibrium demo`` and ``bench`` print one line saying how to install the extra
and exit 2; ``sidecar``, ``signaler``, ``injector`` and ``init`` build their parsers without
importing anything of the lab.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from equilibrium.lab.extra import LAB_PACKAGES, missing_message, missing_packages

BLOCK = "import sys\nfor name in {names!r}:\n    sys.modules[name] = None\n"


def _run(code: str, blocked: tuple[str, ...] = LAB_PACKAGES) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK.format(names=blocked) + code],
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("command", ["demo", "bench"])
@pytest.mark.parametrize("blocked", [LAB_PACKAGES, ("matplotlib",)])
def test_lab_commands_without_the_extra_say_how_to_install_it(
    command: str, blocked: tuple[str, ...]
) -> None:
    done = _run(f"from equilibrium.cli import main\nsys.exit(main([{command!r}, '--help']))",
                blocked)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # one line, no traceback
    assert f"equilibrium {command} needs the lab extra" in lines[0]
    assert "pip install 'equilibrium-mesh[lab]'" in lines[0]
    assert all(name in lines[0] for name in blocked)
    assert done.stdout == ""


def test_the_mesh_commands_never_import_the_lab() -> None:
    code = (
        "from equilibrium.cli import build_parser\n"
        "for command in ('sidecar', 'signaler', 'injector', 'init'):\n"
        "    build_parser([command, '--help'])\n"
        "lab = sorted(m for m in sys.modules if m.startswith('equilibrium.lab'))\n"
        "print(lab)\n"
    )
    done = _run(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_missing_packages_names_only_what_cannot_be_imported() -> None:
    assert missing_packages(("json", "no_such_package_equilibrium")) == [
        "no_such_package_equilibrium"]
    assert missing_message("demo", ("json",)) is None


def test_the_demo_modules_import_one_way() -> None:
    """``run`` <- ``signaling`` <- ``plan`` <- ``cli`` / ``scenario``: no cycle; the run itself
    imports neither the signaling plane nor matplotlib (the plot is drawn on demand)."""
    code = (
        "import equilibrium.lab.demo.run\n"
        "print(sorted(m for m in sys.modules if m.startswith('equilibrium.lab.demo.')"
        " or m in ('equilibrium.lab.signaling_plane', 'matplotlib')))\n"
    )
    done = _run(code, blocked=())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['equilibrium.lab.demo.run']"
    for module in ("signaling", "plan", "cli", "scenario"):
        alone = _run(f"import equilibrium.lab.demo.{module}\n", blocked=())
        assert alone.returncode == 0, alone.stderr
