"""equilibrium.lab.processes: free ports and the environment of the lab's children."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from equilibrium.lab.processes import free_port


def test_free_ports_are_never_handed_out_twice() -> None:
    # the kernel may offer a just-released port again at once; two in a row must not collide
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)


def test_children_import_this_checkout_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """A child runs ``python -m equilibrium ...`` from the same code as its parent: the folder
    that holds the ``equilibrium`` package comes first on its PYTHONPATH, once, before what was
    there already (not the package folder itself, whose modules would shadow top-level ones)."""
    import equilibrium
    from equilibrium.lab.processes import child_environment

    root = str(Path(equilibrium.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/elsewhere", root]))
    paths = child_environment()["PYTHONPATH"].split(os.pathsep)
    assert paths == [root, "/elsewhere"]
    assert (Path(paths[0]) / "equilibrium" / "__main__.py").is_file()
