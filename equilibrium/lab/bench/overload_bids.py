"""Scenario ``overload-bids`` (defined in :mod:`equilibrium.lab.bench.policing`)."""

from equilibrium.lab.bench.policing import OVERLOAD_BIDS as SCENARIO

__all__ = ["SCENARIO"]
