"""Unit tests of the ``signaler`` package, one file per module."""
