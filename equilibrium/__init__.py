"""Equilibrium: the command line (:mod:`equilibrium.cli`) and the lab (:mod:`equilibrium.lab`).

The game itself lives in :mod:`mesh` (pure core); the proxy in :mod:`sidecar`, the
correlated-equilibrium service in :mod:`signaler`, the Kubernetes injector in :mod:`injector`.
"""

__version__ = "0.1.0"
