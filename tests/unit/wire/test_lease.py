"""wire.lease: the lease value and the Lua scripts shipped as package data."""

from __future__ import annotations

import pytest

from wire.errors import WireError
from wire.lease import Lease, decode_lease, encode_lease


def test_lease_value_round_trip_and_rejections() -> None:
    lease = Lease(holder="signaler-0", fence=12)
    assert encode_lease(lease) == "signaler-0 12"
    assert decode_lease(b"signaler-0 12") == lease
    for bad in ["signaler-0", "signaler-0 0", "signaler-0 -1", "a b c", " 3", b"\xff 1"]:
        with pytest.raises(WireError):
            decode_lease(bad)


def test_lua_scripts_are_read_from_package_files() -> None:
    from importlib.resources import files

    from wire.lease import FENCED_XADD_LUA, LEASE_ACQUIRE_LUA, LEASE_RELEASE_LUA, lua_script

    for name, text in [("lease_acquire", LEASE_ACQUIRE_LUA), ("lease_release", LEASE_RELEASE_LUA),
                       ("fenced_xadd", FENCED_XADD_LUA)]:
        assert text == files("wire").joinpath("lua", f"{name}.lua").read_text()
        assert text == lua_script(name) and "redis.call" in text
