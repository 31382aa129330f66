"""Unit tests of the ``wire`` package, one file per module."""
