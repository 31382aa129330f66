"""sidecar.runner: what a configuration reload applies live and what it keeps."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from sidecar.config import ConfigSource
from tests.signaling_samples import EPS, KEY

if TYPE_CHECKING:
    from sidecar.runner import SidecarRunner


def started(tmp_path: Path, text: str,
            env: dict[str, str] | None = None) -> tuple[Path, SidecarRunner]:
    """A runner built from a config file holding ``text`` (and ``env``), as the CLI builds
    it; the file, to be edited before a reload."""
    from sidecar.runner import SidecarRunner

    config_file = tmp_path / "sidecar.yaml"
    config_file.write_text(text)
    source = ConfigSource.from_sources({"config": str(config_file)}, env=env or {})
    return config_file, SidecarRunner(source, source.load(), mesh_key=KEY)


def test_a_config_reload_keeps_the_signaling_settings(tmp_path: Path) -> None:
    config_file, runner = started(
        tmp_path,
        f"redis: redis://127.0.0.1:1/0\nsignaling_epoch: 0.5\nupstreams:\n  orders: [{EPS[0]}]\n")
    config_file.write_text(
        f"redis: redis://127.0.0.1:1/0\nsignaling_epoch: 0.5\nupstreams:\n"
        f"  orders: [{EPS[0]}, {EPS[1]}]\n"
    )
    assert runner.reload()
    assert runner.config.upstreams["orders"] == EPS[:2]  # applied live
    assert runner.config.redis == "redis://127.0.0.1:1/0"  # kept (restart-only)
    assert runner.config.signaling_epoch == 0.5


def test_an_unexpected_reload_error_is_counted_and_the_next_edit_still_applies(
    tmp_path: Path,
) -> None:
    """The file watcher and SIGHUP go through ``safe_reload``: an error that is not a
    ConfigError (a bug an unusual edit could meet) must not end the watcher."""
    config_file, runner = started(tmp_path, f"upstreams:\n  orders: [{EPS[0]}]\n")
    source = runner.source

    class Broken:
        def load(self, **_: object) -> None:
            raise RecursionError("a bug met while reading the file")

    runner.source = Broken()  # type: ignore[assignment]
    assert runner.safe_reload() is False
    assert runner.metrics.registry.get_sample_value(
        "equilibrium_config_reloads_total", {"result": "failed"}) == 1
    runner.source = source
    config_file.write_text(f"upstreams:\n  orders: [{EPS[1]}]\n")
    assert runner.safe_reload() is True
    assert runner.config.upstreams["orders"] == (EPS[1],)


def test_a_reload_names_every_changed_setting_it_does_not_apply(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    config_file, runner = started(tmp_path, f"max_attempts: 2\nupstreams:\n  orders: [{EPS[0]}]\n")
    config_file.write_text(
        f"max_attempts: 3\nhedge: true\nupstreams:\n  orders: [{EPS[0]}, {EPS[1]}]\n")
    caplog.set_level(logging.WARNING, logger="sidecar.runner")
    assert runner.reload()
    assert runner.config.upstreams["orders"] == EPS[:2]  # applied live
    assert (runner.config.max_attempts, runner.config.hedge) == (2, False)  # kept
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("config reload: max_attempts, hedge changed; they take effect "
                              "on restart")


def test_a_reload_applies_the_upstreams_long_paths_to_both_listeners(tmp_path: Path) -> None:
    config_file, runner = started(tmp_path, f"upstreams:\n  orders: [{EPS[0]}]\n")
    assert runner.proxy.long_paths("orders") == () and runner.h2.long_paths("orders") == ()
    config_file.write_text(
        f"upstreams:\n  orders:\n    endpoints: [{EPS[0]}]\n    long_paths: [/watch]\n")
    assert runner.reload()
    assert runner.proxy.long_paths("orders") == ("/watch",)
    assert runner.h2.long_paths("orders") == ("/watch",)


def test_a_reload_logs_the_endpoints_it_changed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    # The stranger's finding: removing an endpoint logged "(added none, removed none)", which
    # counts upstreams, as if nothing had changed.
    config_file, runner = started(tmp_path, f"upstreams:\n  orders: [{EPS[0]}, {EPS[1]}]\n")
    runner.table.apply(runner.config.upstreams, 0.0)  # as run() does at start
    config_file.write_text(f"upstreams:\n  orders: [{EPS[1]}, {EPS[2]}]\n")
    caplog.set_level(logging.INFO, logger="sidecar.runner")
    assert runner.reload()
    [line] = [r.getMessage() for r in caplog.records if "config reloaded" in r.getMessage()]
    assert line.endswith(f"(added none, removed none; endpoints changed: orders +{EPS[2]} "
                         f"-{EPS[0]})")


def test_a_reload_applies_which_upstreams_are_outside_the_mesh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    # The stranger's finding: an upstream added by a reload as `mesh: false` was still sent
    # the signed identity, bids and probes until a restart (the reload applied the upstreams
    # but not their declaration, and warned that it would wait for a restart).
    config_file, runner = started(tmp_path, f"upstreams:\n  orders: [{EPS[0]}]\n")
    assert runner.prober is not None
    config_file.write_text(f"upstreams:\n  orders: [{EPS[0]}]\n"
                           f"  ext:\n    endpoints: [{EPS[1]}]\n    mesh: false\n")
    caplog.set_level(logging.WARNING, logger="sidecar.runner")
    assert runner.reload()
    assert runner.config.external_upstreams == {"ext"}
    assert runner.prober.membership.external("ext")
    assert not runner.prober.membership.external("orders")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    config_file.write_text(f"upstreams:\n  orders: [{EPS[0]}]\n  ext: [{EPS[1]}]\n")
    assert runner.reload()
    assert not runner.prober.membership.external("ext")  # in the mesh again


def test_a_reload_says_where_its_upstreams_come_from_when_not_from_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    # The stranger's finding: with EQUILIBRIUM_UPSTREAMS set, an upstream added to the file
    # was "reloaded" and stayed unknown, and nothing said why.
    config_file, runner = started(
        tmp_path, f"upstreams:\n  orders: [{EPS[0]}]\n",
        env={"EQUILIBRIUM_UPSTREAMS": f"orders={EPS[1]}"})
    config_file.write_text(f"upstreams:\n  orders: [{EPS[0]}]\n  users: [{EPS[2]}]\n")
    caplog.set_level(logging.INFO, logger="sidecar.runner")
    assert runner.reload()
    assert set(runner.config.upstreams) == {"orders"}
    [line] = [r.getMessage() for r in caplog.records if "config reloaded" in r.getMessage()]
    assert line.endswith("they come from the environment, which overrides the config file's")


@pytest.mark.parametrize("text", ["", "\n  \n", "# being rewritten\n"])
def test_a_reload_refuses_a_config_file_with_nothing_in_it(tmp_path: Path, text: str) -> None:
    """The stranger's finding: a file caught empty mid-write (an editor, a ConfigMap sync)
    was applied, and every upstream went. It is refused, and an empty config said in so
    many words still applies."""
    config_file, runner = started(tmp_path, f"upstreams:\n  orders: [{EPS[0]}]\n")
    config_file.write_text(text)
    assert runner.reload() is False
    assert runner.config.upstreams["orders"] == (EPS[0],)
    assert runner.metrics.registry.get_sample_value(
        "equilibrium_config_reloads_total", {"result": "rejected"}) == 1
    config_file.write_text("upstreams: {}\n")
    assert runner.reload() is True
    assert runner.config.upstreams == {}
