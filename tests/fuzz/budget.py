"""How hard the fuzzers try: one setting for every property in ``tests/fuzz``.

``make test`` (and so CI) runs a short, derandomised profile: the same examples every run, so
a CI failure is reproducible and never a coin toss. ``make fuzz`` sets
``EQUILIBRIUM_FUZZ_EXAMPLES=10000`` and lets Hypothesis draw fresh examples each time (it keeps
what it found in ``.hypothesis/`` and replays it first).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_ASKED = os.environ.get("EQUILIBRIUM_FUZZ_EXAMPLES", "").strip()
EXAMPLES = int(_ASKED) if _ASKED.isascii() and _ASKED.isdigit() else 60
#: True for ``make fuzz``: fresh random examples; False (the default): a fixed, short run.
DEEP = bool(_ASKED)

fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not DEEP,
    database=None if not DEEP else settings.default.database,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)
"""Apply as ``@fuzz`` under ``@given``: the number of examples and the profile above."""
