"""Unit tests of the ``mesh`` package, one file per module."""
