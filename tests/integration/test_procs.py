"""The integration tests' own process helpers (procs.py): what they promise their callers."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.integration import procs


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port something else listens on (and answers nothing)."""
    with socket.socket() as sock:
        sock.bind((procs.LOOPBACK, 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_a_sidecar_whose_free_port_was_taken_meanwhile_starts_on_other_ports(
        taken_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CI-like run's flake: a port chosen free was bound by another test worker's server
    before the sidecar bound it, and the start failed. It is started again elsewhere."""
    ports = iter([taken_port, procs.free_port()])
    real = procs.free_port
    monkeypatch.setattr(procs, "free_port", lambda: next(ports, None) or real())
    with procs.start_sidecar({"svc": ["http://127.0.0.1:9"]}) as sidecar:
        assert sidecar.outbound_port != taken_port
        assert sidecar.state()["upstreams"]["svc"]


def test_ports_given_by_the_caller_are_not_changed(taken_port: int) -> None:
    with pytest.raises(RuntimeError, match="address already in use"):
        procs.start_sidecar({"svc": ["http://127.0.0.1:9"]}, outbound_port=taken_port)
