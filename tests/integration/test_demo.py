"""``equilibrium demo`` end to end: real fleet, real sidecars, real load, real exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_demo_shifts_traffic_away_from_the_bad_pod_and_writes_a_plot(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "equilibrium", "demo", "--duration", "8", "--out", str(out)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Not a terminal: one live line per second, then the summary.
    live = [line for line in proc.stdout.splitlines() if line.startswith("t=")]
    assert len(live) >= 5
    assert "pod-4*=" in live[-1] and "converged=" in live[-1]
    assert "the bad pod got less traffic than each good pod: yes" in proc.stdout
    png = out / "equilibrium-demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "equilibrium-demo.json").read_text())
    totals = summary["metrics"]["pod_totals"]
    assert summary["bad_pod_less_than_each_good_pod"] is True
    assert all(totals["pod-4"] < totals[f"pod-{i}"] for i in range(4))
    assert summary["metrics"]["errors"] == 0
    assert set(summary["sidecars"]) == {"client-1", "client-2", "client-3"}
    assert all(s["weights"]["pod-4"] < 0.2 for s in summary["sidecars"].values())


def test_demo_ctrl_c_stops_and_reaps_every_child(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "equilibrium", "demo", "--duration", "60", "--clients", "2",
         "--out", str(tmp_path)],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline and not line.startswith("t="):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert line.startswith("t="), "the demo never showed its live view"
        children = _children(proc.pid)
        assert len(children) >= 5  # fleet, 2 sidecars, 2 load generators
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert not [pid for pid in children if _alive(pid)]
    assert not (tmp_path / "equilibrium-demo.png").exists()  # interrupted: no summary


def test_live_view_redraws_in_place_on_a_terminal_and_prints_lines_otherwise() -> None:
    import io
    import math

    from equilibrium.live import Frame, LiveView, PodLine

    state = {"upstreams": {"demo": {"policy": "equilibrium", "nash_gap": 0.01, "flapping": 0.0,
                                    "converged": True, "endpoints": [
                                        {"endpoint": "http://127.0.0.1:1", "weight": 0.99,
                                         "regret": 0.0},
                                        {"endpoint": "http://127.0.0.1:2", "weight": 0.01,
                                         "regret": 0.2}]}}}
    frame = Frame(elapsed=3, duration=10, requests=300, errors=0, window=2,
                  pods=[PodLine("pod-0", 0.99, 0.004, 0.009),
                        PodLine("pod-1", 0.01, math.nan, math.nan, bad=True)],
                  states={"client-1": state, "client-2": None}, upstream="demo")
    tty = io.StringIO()
    view = LiveView(tty, tty=True)
    view.show(frame)
    first = tty.getvalue()
    view.show(frame)
    second = tty.getvalue()[len(first):]
    drawn = first.count("\n")
    assert not first.startswith("\x1b[") or first.startswith("\x1b[J")
    assert second.startswith(f"\x1b[{drawn}F\x1b[J")  # back up over the last frame, clear
    assert "w=[0.99 0.01]" in first and "regret=0.2000" in first and "converged" in first
    assert "(no state)" in first and "(bad)" in first
    pipe = io.StringIO()
    LiveView(pipe, tty=False).show(frame)
    line = pipe.getvalue()
    assert line.count("\n") == 1 and "\x1b" not in line
    assert "pod-1*=1.0%" in line and "converged=1/2" in line


def test_recovery_phase_reports_readmission_time_and_peak_share(tmp_path: Path) -> None:
    from equilibrium.demo import DemoConfig, DemoRun, RecoveryPhase
    from equilibrium.loadgen import Record

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
    assert never["re-admitted to half its fair traffic (10%) after (s)"] == "not within the run"
