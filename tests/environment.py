"""What to do when a test's environment is missing: fail in CI, skip with the reason elsewhere.

Some integration tests need more than Python: a Docker engine with the locally built images
(``docker``-marked tests), root with ``ip``/``iptables`` for network namespaces, or
Prometheus's ``promtool``/``prometheus`` for the alert rules. CI (``.ci/run``) provides all of it
and sets ``EQUILIBRIUM_REQUIRE_DOCKER=1``, ``EQUILIBRIUM_REQUIRE_NETNS=1`` and
``EQUILIBRIUM_REQUIRE_PROMTOOL=1``, so there a missing piece is a failure and nothing is skipped.
On a newcomer's machine ``make test`` skips those tests instead, each with the reason and how
to provide what is missing (pytest's ``-ra`` summary lists them).
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

DOCKER = "EQUILIBRIUM_REQUIRE_DOCKER"
NETNS = "EQUILIBRIUM_REQUIRE_NETNS"
PROMTOOL = "EQUILIBRIUM_REQUIRE_PROMTOOL"


def required(variable: str) -> bool:
    """True when CI demands the environment named by ``variable``."""
    return os.environ.get(variable, "") not in ("", "0", "false", "no")


def unavailable(reason: str, *, variable: str) -> NoReturn:
    """Fail (``variable`` set, as in CI) or skip with ``reason``."""
    if required(variable):
        pytest.fail(f"{reason} ({variable}=1: CI must run this test)")
    pytest.skip(f"{reason} (CI runs this test: .ci/run)")
