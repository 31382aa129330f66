"""Unit tests of ``equilibrium.lab.bench``, one file per module."""
