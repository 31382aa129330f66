"""Unit tests of the ``injector`` package, one file per module."""
