"""equilibrium.lab.processes: free ports for the lab's children."""

from __future__ import annotations

from equilibrium.lab.processes import free_port


def test_free_ports_are_never_handed_out_twice() -> None:
    # the kernel may offer a just-released port again at once; two in a row must not collide
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
