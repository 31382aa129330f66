"""Unit tests of ``sidecar.discovery``, one file per module."""
