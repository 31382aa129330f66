"""tests/redis_fixture.py's choice of a Redis kind (the servers themselves are run in
tests/integration/test_redis_fixture.py)."""

from __future__ import annotations

import pytest

from tests.redis_fixture import LOCAL_BINARY, choose_kind


def test_kind_can_be_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EQUILIBRIUM_REDIS_KIND", LOCAL_BINARY)
    assert choose_kind() == LOCAL_BINARY
    monkeypatch.setenv("EQUILIBRIUM_REDIS_KIND", "valkey")
    with pytest.raises(ValueError, match="EQUILIBRIUM_REDIS_KIND"):
        choose_kind()
