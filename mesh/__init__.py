"""The pure game core of Equilibrium (sans-I/O).

Rules of this package:

1. No I/O. Nothing here imports asyncio, aiohttp, redis, cvxpy or socket (a test and an
   import-linter contract enforce it).
2. No clock and no global random generator. Time (``now``, in seconds on any monotonic
   scale) and randomness (a ``random.Random`` or ``numpy.random.Generator``) are passed in.
3. Observations in, decisions out. The sidecar drives this code on its request path; the
   tests drive the same code with a hand-made clock and a seeded generator.
"""
