"""Unit tests of ``equilibrium.lab``, one file per module."""
