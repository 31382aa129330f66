"""Shared pytest configuration: plugins every test may use, and the ``needs`` marker.

``tests.redis_fixture`` provides the real-Redis fixtures (``redis_server``, ...).
``@pytest.mark.needs("root", "iptables", ...)`` names what outside Python a test needs; it is
checked before the test's fixtures run, through the one gate in ``tests.environment``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.environment import require

pytest_plugins = ["tests.redis_fixture"]

ROOT = Path(__file__).resolve().parent.parent


def stale_compiled_modules(root: Path = ROOT) -> list[str]:
    """Sources edited after ``make compile`` built them: the C extension next to each one is
    what imports, so the tests would run the old code."""
    stale = []
    for package in ("sidecar", "wire", "mesh", "equilibrium"):
        for built in sorted((root / package).rglob("*.so")):
            source = built.with_name(built.name.split(".", 1)[0] + ".py")
            if source.exists() and source.stat().st_mtime > built.stat().st_mtime:
                stale.append(str(source.relative_to(root)))
    return stale


def pytest_configure(config: pytest.Config) -> None:
    stale = stale_compiled_modules()
    if stale:
        raise pytest.UsageError(
            f"compiled modules older than their sources: {', '.join(stale)}; rebuild them "
            "(make compile) or remove them (make pure)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers(name="needs"):
        require(*marker.args)
