"""Scenario ``retry-flood`` (defined in :mod:`equilibrium.lab.bench.policing`)."""

from equilibrium.lab.bench.policing import RETRY_FLOOD as SCENARIO

__all__ = ["SCENARIO"]
