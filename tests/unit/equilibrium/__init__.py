"""Unit tests of the ``equilibrium`` package (the CLI and the lab)."""
