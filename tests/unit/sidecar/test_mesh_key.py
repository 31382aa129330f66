"""sidecar.mesh_key: the sidecar's mesh key, from the environment or a file, and a bad one as
a ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import ConfigError, ConfigSource


def test_mesh_key_from_env_or_file(tmp_path: Path) -> None:
    from sidecar.mesh_key import sidecar_mesh_key as read_mesh_key

    key_file = tmp_path / "mesh.key"
    key_file.write_text("file-key-0123456789abcdef\n")
    key_file.chmod(0o400)
    with_file = ConfigSource.from_sources({"mesh_secret_file": str(key_file)}, env={}).load()
    without = ConfigSource.from_sources({}, env={}).load()
    assert read_mesh_key(with_file, {}) == b"file-key-0123456789abcdef"
    assert read_mesh_key(with_file, {"EQUILIBRIUM_MESH_SECRET": "env-key-0123456789abcdef"}) \
        == b"env-key-0123456789abcdef"  # the environment wins
    assert read_mesh_key(without, {}) is None  # no key: everyone anonymous, not an error
    key_file.chmod(0o600)
    key_file.write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        read_mesh_key(with_file, {})
    with pytest.raises(ConfigError, match="at least 16"):
        read_mesh_key(without, {"EQUILIBRIUM_MESH_SECRET": "short"})
    with pytest.raises(ConfigError, match="set but blank"):  # never a silent unsigned start
        read_mesh_key(without, {"EQUILIBRIUM_MESH_SECRET": " "})
