"""injector.cli: the webhook's start-up rules (no serving without a certificate and a key)."""

from __future__ import annotations

import pytest

from equilibrium.cli import main


def test_missing_certificate_flags_fail_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["injector", "--listen", "127.0.0.1:0"]) == 2
    assert "--tls-cert and --tls-key are required" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    (["--kube-api", "ftp://x"], "expected an http(s):// URL"),
    (["--kube-api", "http://127.0.0.1:1", "--redis-host", "no-port"], "--redis-host"),
])
def test_controller_flags_fail_clearly(flags: list[str], message: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["injector", "controller", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("equilibrium injector controller: ") and message in err


def test_controller_outside_a_cluster_needs_an_api_url(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert main(["injector", "controller"]) == 2
    assert "KUBERNETES_SERVICE_HOST is unset" in capsys.readouterr().err
