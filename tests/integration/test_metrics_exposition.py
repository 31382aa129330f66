"""What a real sidecar's ``/metrics`` exposes: no ``*_created`` series unless asked for."""

from __future__ import annotations

import pytest

from tests.integration.procs import start_sidecar


@pytest.mark.parametrize(("env", "created"), [({}, False),
                                              ({"PROMETHEUS_DISABLE_CREATED_SERIES": "False"},
                                               True)])
def test_created_series_are_left_out_unless_the_operator_wants_them(
    env: dict[str, str], created: bool,
) -> None:
    sidecar = start_sidecar({"svc": ["http://127.0.0.1:9"]}, sidecar_id="exposition", env=env)
    try:
        text = sidecar.metrics_text()
        assert "equilibrium_requests_total" in text or "equilibrium_config_reloads" in text
        assert ("_created" in text) is created
    finally:
        assert sidecar.stop() == 0, sidecar.output()
