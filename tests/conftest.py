"""Shared pytest configuration: plugins every test may use.

``tests.redis_fixture`` provides the real-Redis fixtures (``redis_server``, ...).
"""

pytest_plugins = ["tests.redis_fixture"]
