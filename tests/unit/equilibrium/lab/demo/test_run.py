"""equilibrium.lab.demo.run: the recovery phase's summary on hand-made records; the dashboard
line and ``--open``."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_recovery_phase_reports_readmission_time_and_peak_share(tmp_path: Path) -> None:
    from equilibrium.lab.demo.run import DemoConfig, DemoRun, RecoveryPhase
    from equilibrium.lab.loadgen import Record

    run = DemoRun(config=DemoConfig(pods=5, bad=4, duration=6.0), logs=tmp_path, t0=100.0)
    # pod-4 gets 1 % until t=3, then 5 %, 12 %, 18 % (one second each, 100 requests a second)
    per_second = [1, 1, 1, 5, 12, 18]
    seq = 0
    for second, bad in enumerate(per_second):
        for i in range(100):
            pod = "pod-4" if i < bad else f"pod-{i % 4}"
            run.records.append(Record("c", seq, 100.0 + second + i / 100, 0.01, 200, pod))
            seq += 1
    summary = RecoveryPhase(at=2.0).summary(run)
    assert summary["re-admitted to half its fair traffic (10%) after (s)"] == 3.0
    assert summary["largest 1 s share after recovery (fair share 20%)"] == 0.18
    never = RecoveryPhase(at=5.5).summary(run)
    said = never["re-admitted to half its fair traffic (10%) after (s)"]
    assert said.startswith("not within the run (") and "--duration 120" in said  # and why


def test_the_demo_announces_the_signalers_dashboard_and_opens_it_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import io
    import webbrowser

    from equilibrium.lab.demo.run import DemoConfig, DemoPhase, DemoRun, announce_dashboard

    class Signaler(DemoPhase):
        def dashboard_url(self, run: DemoRun) -> str | None:
            return "http://127.0.0.1:4321/dashboard"

    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", lambda url, new=0: opened.append(url) or False)
    out = io.StringIO()
    run = DemoRun(config=DemoConfig(), logs=tmp_path)
    announce_dashboard(run, [DemoPhase(), Signaler()], out)
    assert out.getvalue().startswith("dashboard: http://127.0.0.1:4321/dashboard ")
    assert opened == []
    run.config.open_dashboard = True
    announce_dashboard(run, [Signaler()], out)
    assert opened == ["http://127.0.0.1:4321/dashboard"]
    assert "no web browser found" in out.getvalue()  # webbrowser.open said False
