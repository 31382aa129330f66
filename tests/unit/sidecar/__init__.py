"""Unit tests of the ``sidecar`` package, one file per module."""
