"""Unit tests of ``equilibrium.lab.demo``, one file per module."""
