"""Equilibrium's test suite (a package, so that ``tests.redis_fixture`` is importable)."""
