"""``equilibrium demo``: a local mesh with a bad pod; watch the traffic shift away from it.

- :mod:`equilibrium.lab.demo.run` — one run: fleet, sidecars, load (on the benchmark harness),
  live view, summary, JSON and PNG; the :class:`~equilibrium.lab.demo.run.DemoPhase` hooks;
- :mod:`equilibrium.lab.demo.signaling` — the phases that add the signaling plane;
- :mod:`equilibrium.lab.demo.plan` — which plane and which phases a run gets;
- :mod:`equilibrium.lab.demo.cli` — the command line (``equilibrium demo``);
- :mod:`equilibrium.lab.demo.scenario` — the same run as ``equilibrium bench --scenario demo``.

Imports go one way: ``run`` <- ``signaling`` <- ``plan`` <- ``cli`` / ``scenario``.
"""
