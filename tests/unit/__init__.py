"""Unit tests: one folder per package and one ``test_<module>.py`` per module, as in the tree.

Every folder is a package (``tests.unit.wire``, ...), so a folder named for a package never
shadows the package itself and two folders may each hold a ``test_cli.py``.
"""
