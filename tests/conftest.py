"""Shared pytest configuration: plugins every test may use, and the ``needs`` marker.

``tests.redis_fixture`` provides the real-Redis fixtures (``redis_server``, ...).
``@pytest.mark.needs("root", "iptables", ...)`` names what outside Python a test needs; it is
checked before the test's fixtures run, through the one gate in ``tests.environment``.
"""

from __future__ import annotations

import pytest

from tests.environment import require

pytest_plugins = ["tests.redis_fixture"]


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers(name="needs"):
        require(*marker.args)
