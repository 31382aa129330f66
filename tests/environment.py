"""The one gate for tests that need more than Python: fail in CI, skip with the reason elsewhere.

Some tests need an outside tool or privilege: a Docker engine with the locally built images
(and ``docker-compose`` for compose.yaml), root with ``ip``/``iptables`` for network
namespaces, Prometheus's ``promtool``/``prometheus`` for the alert rules. Every such test
states what it needs, either with the marker ``@pytest.mark.needs("root", "iptables")``
(checked before the test sets up anything) or by calling :func:`require` from a fixture, and
nothing else decides. Each need belongs to one CI variable: CI (``.ci/run``) provides
everything and sets ``EQUILIBRIUM_REQUIRE_DOCKER=1``, ``EQUILIBRIUM_REQUIRE_NETNS=1`` and
``EQUILIBRIUM_REQUIRE_PROMTOOL=1`` (and ``EQUILIBRIUM_REQUIRE_PEERS=1`` for the benchmark's
peer proxies HAProxy and nginx and the load tool wrk, ``EQUILIBRIUM_REQUIRE_CHROMIUM=1`` for
the dashboard's tests in a headless Chromium), so there a missing piece is a failure
and nothing is skipped. On a newcomer's machine ``make test`` skips those tests instead, each
with the reason and how to provide what is missing (pytest's ``-ra`` summary lists them).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import pytest

from equilibrium.lab.headless import find_chromium

DOCKER = "EQUILIBRIUM_REQUIRE_DOCKER"
NETNS = "EQUILIBRIUM_REQUIRE_NETNS"
PROMTOOL = "EQUILIBRIUM_REQUIRE_PROMTOOL"
PEERS = "EQUILIBRIUM_REQUIRE_PEERS"
CHROMIUM = "EQUILIBRIUM_REQUIRE_CHROMIUM"


@dataclass(frozen=True, slots=True)
class Need:
    """Something outside Python a test may need: how to tell it is there, which CI variable
    makes it mandatory, and how a newcomer provides it."""

    present: Callable[[], bool]
    variable: str
    how: str


def _on_path(tool: str) -> Callable[[], bool]:
    return lambda: shutil.which(tool) is not None


def _loads(library: str, soname: str) -> Callable[[], bool]:
    """Whether the shared library loads (by the name ldconfig knows, else its soname: with
    /sbin off PATH, ``find_library`` finds nothing)."""
    def present() -> bool:
        for name in (ctypes.util.find_library(library), soname):
            if name is None:
                continue
            try:
                ctypes.CDLL(name)
            except OSError:
                continue
            return True
        return False
    return present


_IPTABLES = "apt-get install -y iptables (brings ip6tables)"
_PROMETHEUS = "apt-get install -y prometheus"

NEEDS: dict[str, Need] = {
    "root": Need(lambda: os.geteuid() == 0, NETNS, "run the tests as root"),
    "ip": Need(_on_path("ip"), NETNS, "apt-get install -y iproute2"),
    "setpriv": Need(_on_path("setpriv"), NETNS, "apt-get install -y util-linux"),
    **{tool: Need(_on_path(tool), NETNS, _IPTABLES)
       for tool in ("iptables", "iptables-save", "ip6tables", "ip6tables-save")},
    "promtool": Need(_on_path("promtool"), PROMTOOL, _PROMETHEUS),
    "prometheus": Need(_on_path("prometheus"), PROMTOOL, _PROMETHEUS),
    **{tool: Need(_on_path(tool), PEERS, f"apt-get install -y {tool}")
       for tool in ("haproxy", "nginx", "wrk")},
    "chromium": Need(lambda: find_chromium() is not None, CHROMIUM,
                     "apt-get install -y chromium"),
    "h2load": Need(_on_path("h2load"), PEERS, "apt-get install -y nghttp2-client"),
    "libnghttp2": Need(_loads("nghttp2", "libnghttp2.so.14"), PEERS,
                       "apt-get install -y libnghttp2-14 (libcurl and nghttp2-client bring it)"),
    "docker": Need(_on_path("docker"), DOCKER,
                   "apt-get install -y docker.io, then scripts/ci/docker-up.sh"),
    "docker-compose": Need(_on_path("docker-compose"), DOCKER,
                           "apt-get install -y docker-compose (Compose 1.29; with Compose v2 "
                           "installed instead, run the stack by hand: docker compose -p NAME up)"),
}


def required(variable: str) -> bool:
    """True when CI demands the environment named by ``variable``."""
    return os.environ.get(variable, "") not in ("", "0", "false", "no")


def unavailable(reason: str, *, variable: str) -> NoReturn:
    """Fail (``variable`` set, as in CI) or skip with ``reason``."""
    if required(variable):
        pytest.fail(f"{reason} ({variable}=1: CI must run this test)")
    pytest.skip(f"{reason} (CI runs this test: .ci/run)")


def missing(*names: str) -> list[str]:
    """The needs among ``names`` that this machine lacks (unknown names raise ``KeyError``)."""
    return [name for name in names if not NEEDS[name].present()]


def require(*names: str) -> None:
    """Return when every need in ``names`` is met; otherwise fail or skip through
    :func:`unavailable`, naming each missing need and how to provide it. A test fails when any
    missing need's CI variable is set."""
    lacking = missing(*names)
    if not lacking:
        return
    hows = dict.fromkeys(NEEDS[name].how for name in lacking)
    reason = f"needs {', '.join(lacking)}: {'; '.join(hows)}"
    demanded = [NEEDS[name].variable for name in lacking if required(NEEDS[name].variable)]
    unavailable(reason, variable=demanded[0] if demanded else NEEDS[lacking[0]].variable)
