"""Scenario ``overload-bids`` (defined in :mod:`equilibrium.bench.policing`)."""

from equilibrium.bench.policing import OVERLOAD_BIDS as SCENARIO

__all__ = ["SCENARIO"]
