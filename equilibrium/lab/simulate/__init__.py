"""``equilibrium simulate``: the unmodified routing core and signaler in virtual time.

A discrete-event simulation of many sidecars calling one upstream service: the policies of
:mod:`mesh.policies` (one instance per simulated sidecar, built as the sidecar builds them),
and for ``equilibrium-ce`` the real signaling task and signaler over the in-memory signal
store, drive simulated pods (queues with given service-time distributions). Modules:

- :mod:`.pods` — pods as queues; :mod:`.sidecar` — one sidecar's routing calls;
  :mod:`.plane` — the signaling plane; :mod:`.engine` — the event loop of one run;
- :mod:`.scenarios` — ``slow-pod``, ``herding``, ``recovery``, ``churn``;
- :mod:`.metrics` — the bench's numbers over compact record arrays;
  :mod:`.optimum` — Wardrop equilibrium, social optimum and price of anarchy on the true
  curves; :mod:`.cli` — the command, its JSON and tables; :mod:`.plots`.

How to run it and what it does not model: docs/simulate.md.
"""

import os as _os

from equilibrium.cli import one_math_thread as _one_math_thread

# One simulation is one thread: the policies' small linear solves (a 100 x 100 system per tick
# at 100 endpoints) ran 30x slower with OpenBLAS's threads spinning on a shared 2-core machine.
# Set before numpy is first imported (``equilibrium simulate`` has set it already; this covers
# importing the package from Python).
_one_math_thread(_os.environ)
