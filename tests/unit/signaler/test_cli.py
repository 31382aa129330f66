"""signaler.cli: the signaler's start-up rules (a mesh key and a redis:// URL, checked flags)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from mesh.errors import ConfigError
from signaler.cli import build_config
from tests.signaling_samples import KEY


def test_signaler_cli_requires_a_key_and_a_redis_url(tmp_path: object) -> None:
    def args(**kw: object) -> argparse.Namespace:
        base = {"redis": "redis://127.0.0.1:1", "epoch": "0.5", "id": "sig-a",
                "admin": "127.0.0.1:0", "tokens": "8", "upstreams": None,
                "mesh_secret_file": None, "lease_epochs": "3", "seed": None}
        return argparse.Namespace(**{**base, **kw})

    key_file = Path(str(tmp_path)) / "mesh.key"
    key_file.write_bytes(KEY + b"\n")
    key_file.chmod(0o440)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("EQUILIBRIUM_MESH_SECRET", raising=False)
        with pytest.raises(ConfigError, match="mesh key: none given"):
            build_config(args())
        assert build_config(args(mesh_secret_file=str(key_file)))[0].key == KEY
        with pytest.raises(ConfigError, match="cannot read"):
            build_config(args(mesh_secret_file=str(key_file) + ".missing"))
        mp.setenv("EQUILIBRIUM_MESH_SECRET", "short")
        with pytest.raises(ConfigError, match="at least 16"):
            build_config(args())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EQUILIBRIUM_MESH_SECRET", KEY.decode())
        config, admin = build_config(args())
        assert config.key == KEY and config.epoch == 0.5 and admin == ("127.0.0.1", 0)
        for bad, message in [({"redis": None}, "required"), ({"redis": "http://x"}, "redis"),
                             ({"epoch": "0"}, "--epoch"), ({"tokens": "x"}, "--tokens"),
                             ({"id": "bad id"}, "--id"), ({"admin": "nope"}, "--admin")]:
            with pytest.raises(ConfigError, match=message):
                build_config(args(**bad))
