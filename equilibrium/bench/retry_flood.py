"""Scenario ``retry-flood`` (defined in :mod:`equilibrium.bench.policing`)."""

from equilibrium.bench.policing import RETRY_FLOOD as SCENARIO

__all__ = ["SCENARIO"]
