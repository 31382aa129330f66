"""injector.cli: the webhook's start-up rules (no serving without a certificate and a key)."""

from __future__ import annotations

import pytest

from equilibrium.cli import main


def test_missing_certificate_flags_fail_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["injector", "--listen", "127.0.0.1:0"]) == 2
    assert "--tls-cert and --tls-key are required" in capsys.readouterr().err
