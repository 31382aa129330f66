"""The names of the strategy profiles: the values ``equilibrium.io/strategy`` accepts.

The one list of names. ``mesh/profiles.py`` defines a profile for each and re-exports
``PROFILE_NAMES``; this module stays dependency-free so that code which only validates a name
(the injector's annotation parser, hence the ``equilibrium init`` container) does not import
numpy with the profiles' parameters.
"""

from __future__ import annotations

from typing import Final

PROFILE_NAMES: Final[tuple[str, ...]] = ("balanced", "aggressive-learning", "conservative")
