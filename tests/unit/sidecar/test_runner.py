"""sidecar.runner: what a configuration reload applies live and what it keeps."""

from __future__ import annotations

from pathlib import Path

from sidecar.config import ConfigSource
from tests.signaling_samples import EPS, KEY


def test_a_config_reload_keeps_the_signaling_settings(tmp_path: Path) -> None:
    from sidecar.runner import SidecarRunner

    config_file = tmp_path / "sidecar.yaml"
    config_file.write_text(
        f"redis: redis://127.0.0.1:1/0\nsignaling_epoch: 0.5\nupstreams:\n  orders: [{EPS[0]}]\n"
    )
    source = ConfigSource.from_sources({"config": str(config_file)}, env={})
    runner = SidecarRunner(source, source.load(), mesh_key=KEY)
    config_file.write_text(
        f"redis: redis://127.0.0.1:1/0\nsignaling_epoch: 0.5\nupstreams:\n"
        f"  orders: [{EPS[0]}, {EPS[1]}]\n"
    )
    assert runner.reload()
    assert runner.config.upstreams["orders"] == EPS[:2]  # applied live
    assert runner.config.redis == "redis://127.0.0.1:1/0"  # kept (restart-only)
    assert runner.config.signaling_epoch == 0.5
