"""sidecar.local_callers: who may use the outbound listener (loopback, own addresses,
redirected app traffic); everything else is refused and counted."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from sidecar.local_callers import LocalCallers, bindable


class FakeTransport:
    """Only what the check reads: the peer and the socket."""

    def __init__(self, peer: Any, sock: object | None = None) -> None:
        self.extra = {"peername": peer, "socket": sock}

    def get_extra_info(self, name: str) -> Any:
        return self.extra.get(name)


def callers(own: set[str], redirected: bool = False) -> LocalCallers:
    return LocalCallers(CollectorRegistry(), is_own=lambda ip: ip in own,
                        redirected=lambda sock: ("10.96.0.10", 80) if redirected else None)


@pytest.mark.parametrize("peer", ["127.0.0.1", "127.3.4.5", "::1", "::ffff:127.0.0.1",
                                  "10.1.2.3", "::ffff:10.1.2.3", "fd00::7"])
def test_loopback_and_own_addresses_are_local(peer: str) -> None:
    check = callers({"10.1.2.3", "fd00::7"})
    assert check.admit(FakeTransport((peer, 40000)))  # type: ignore[arg-type]
    assert check.refused._value.get() == 0


@pytest.mark.parametrize("peer", [("10.9.9.9", 1), ("2001:db8::1", 1, 0, 0), None, ("bad", 1)])
def test_a_foreign_peer_is_refused_and_counted(peer: Any) -> None:
    check = callers({"10.1.2.3"})
    assert not check.admit(FakeTransport(peer, sock=object()))  # type: ignore[arg-type]
    assert check.refused._value.get() == 1


def test_redirected_app_traffic_is_accepted_whatever_its_peer() -> None:
    check = callers(set(), redirected=True)
    assert check.admit(FakeTransport(("10.9.9.9", 1), sock=object()))  # type: ignore[arg-type]


def test_bindable_knows_this_hosts_addresses() -> None:
    assert bindable("127.0.0.1")
    assert not bindable("192.0.2.77")  # TEST-NET-1: never assigned here
    if socket.has_ipv6:
        assert not bindable("2001:db8::77")
