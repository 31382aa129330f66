"""``equilibrium demo`` end to end: real fleet, real sidecars, real load, real exit; by default
with the signaling plane (a real embedded redis-server and a real signaler process)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.support import child_env


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (part.decode(errors="replace").partition("=") for part in raw.split(b"\0") if part)
    return {name: value for name, _, value in pairs}


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


@pytest.mark.slow
def test_demo_with_the_signaler_follows_it_and_shifts_traffic_off_the_bad_pod(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "equilibrium", "demo", "--duration", "10", "--out", str(out)],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    live = [line for line in proc.stdout.splitlines() if line.startswith("t=")]
    assert len(live) >= 7
    assert all("following=" in line for line in live)
    assert any("following=0/3" not in line for line in live)  # someone followed at some point
    assert "sidecars coordinated by the signaler" in proc.stdout
    assert (out / "equilibrium-demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "equilibrium-demo.json").read_text())
    assert summary["config"]["signaler"] is True
    totals = summary["metrics"]["pod_totals"]
    assert all(totals["pod-4"] < totals[f"pod-{i}"] for i in range(4)), totals
    assert summary["metrics"]["errors"] == 0
    signaling = summary["phases"]["signaling"]
    assert set(signaling["following_fraction"]) == {"client-1", "client-2", "client-3"}
    assert max(signaling["following_fraction"].values()) > 0
    assert signaling["recommendations published"] > 0
    followed = [line for line in proc.stdout.splitlines() if "followed the signaler:" in line]
    assert len(followed) == 3 and any("accepted 0," not in line for line in followed)
    # The signaler's plan sends nothing to the bad pod.
    state = signaling["signaler_last_state"]["upstreams"]["demo"]
    bad_url = next(url for url, model in state["models"].items()
                   if model["d"] == max(m["d"] for m in state["models"].values()))
    assert all(w.get(bad_url, 0) == 0 for w in state["plan"]["weights"].values())


@pytest.mark.slow
def test_demo_without_signaler_shifts_traffic_away_from_the_bad_pod_and_writes_a_plot(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "equilibrium", "demo", "--no-signaler", "--duration", "6",
         "--out", str(out)],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Not a terminal: one live line per second, then the summary.
    live = [line for line in proc.stdout.splitlines() if line.startswith("t=")]
    assert len(live) >= 5
    assert "pod-4*=" in live[-1] and "converged=" in live[-1]
    assert "following=" not in live[-1]
    assert "no signaler (each sidecar learns alone)" in proc.stdout
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
    assert summary["config"]["signaler"] is False and "signaling" not in summary["phases"]


@pytest.mark.slow
def test_demo_ctrl_c_stops_and_reaps_every_child_and_keeps_secrets_off_argv(
    tmp_path: Path,
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "equilibrium", "demo", "--duration", "60", "--clients", "2",
         "--out", str(tmp_path)],
        cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
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
        # fleet, 2 sidecars, 2 load generators, redis-server, signaler
        assert len(children) >= 7
        argvs = {pid: _cmdline(pid) for pid in children}
        keys = {pid: _environ(pid).get("EQUILIBRIUM_MESH_SECRET") for pid in children}
        signers = [pid for pid, argv in argvs.items() if "signaler" in argv or "sidecar" in argv]
        assert len(signers) == 3
        key = keys[signers[0]]
        assert key and len(key) >= 32 and all(keys[pid] == key for pid in signers)
        # The Redis URL (with its password) travels like the key, in the environment.
        urls = {_environ(pid).get("EQUILIBRIUM_REDIS_URL") for pid in signers}
        assert len(urls) == 1
        password = urlsplit(urls.pop() or "").password
        assert password and len(password) >= 16
        for secret in (key, password):
            assert not any(secret in " ".join(argv) for argv in argvs.values())
        # only the signaler and the sidecars get the key (not the fleet or the load)
        assert [pid for pid in children if keys[pid]] == signers
        assert any("redis-server" in " ".join(argv) for argv in argvs.values())
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

    from equilibrium.lab.live import Frame, LiveView, PodLine

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
    assert never["re-admitted to half its fair traffic (10%) after (s)"] == "not within the run"


def test_demo_with_redis_but_no_mesh_key_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "equilibrium", "demo", "--redis", "redis://127.0.0.1:9/0",
         "--out", str(tmp_path)],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "EQUILIBRIUM_MESH_SECRET" in proc.stderr and "--redis" in proc.stderr
    assert not (tmp_path / "equilibrium-demo.png").exists()


def test_signaling_mode_falls_back_without_any_redis_server_and_checks_its_flags() -> None:
    from equilibrium.lab.embedded_redis import RedisUnavailable
    from equilibrium.lab.signaling_plane import SignalingUnavailable, resolve_signaling

    def no_binary() -> None:
        raise RedisUnavailable("no redis-server binary")

    fallback = resolve_signaling(no_signaler=False, redis_url=None, environ={},
                                 find_server=no_binary)
    assert fallback.mode == "off" and fallback.mesh_key is None
    assert fallback.warning and "WITHOUT the signaler" in fallback.warning

    first = resolve_signaling(no_signaler=False, redis_url=None, environ={})
    second = resolve_signaling(no_signaler=False, redis_url=None, environ={})
    assert first.mode == "embedded" and first.warning is None
    assert first.mesh_key and len(first.mesh_key) == 64 and first.mesh_key != second.mesh_key
    assert first.mesh_key not in repr(first)

    key = "k" * 32
    external = resolve_signaling(no_signaler=False, redis_url="redis://:pw-42@127.0.0.1:6379/0",
                                 environ={"EQUILIBRIUM_MESH_SECRET": key})
    assert (external.mode, external.mesh_key) == ("external", key)
    assert "pw-42" not in repr(external) and key not in repr(external)
    short_key = {"EQUILIBRIUM_MESH_SECRET": "short"}
    for no_signaler, url, environ, message in [
        (True, "redis://127.0.0.1:6379/0", {}, "contradict"),
        (False, "http://127.0.0.1:6379", {}, "redis://"),
        (False, "http://:pw-42@127.0.0.1:6379", {}, "got http"),
        (False, "redis://127.0.0.1:6379/0", {}, "EQUILIBRIUM_MESH_SECRET"),
        (False, "redis://127.0.0.1:6379/0", short_key, "at least"),
    ]:
        try:
            resolve_signaling(no_signaler=no_signaler, redis_url=url, environ=environ)
        except SignalingUnavailable as exc:
            assert message in str(exc) and "pw-42" not in str(exc)
        else:
            raise AssertionError(f"{no_signaler=} {url=} {environ=} was accepted")
    assert resolve_signaling(no_signaler=True, redis_url=None, environ={}).mode == "off"
    # sidecars wired to a plane that runs elsewhere (compose.yaml): the demo starts none
    wired = ["--redis", "redis://redis:6379/0", "--mesh-secret-file", "/run/mesh.key"]
    assert resolve_signaling(no_signaler=False, redis_url=None, environ={},
                             sidecar_args=wired, find_server=no_binary).mode == "sidecars"
    try:
        resolve_signaling(no_signaler=False, redis_url="redis://127.0.0.1:6379/0",
                          environ={"EQUILIBRIUM_MESH_SECRET": key}, sidecar_args=wired)
    except SignalingUnavailable as exc:
        assert "not both" in str(exc)
    else:
        raise AssertionError("--redis together with --sidecar-arg=--redis was accepted")


def test_live_view_shows_who_follows_the_signaler() -> None:
    import io

    from equilibrium.lab.live import Frame, LiveView, PodLine

    def state(following: bool) -> dict[str, object]:
        return {"upstreams": {"demo": {
            "policy": "equilibrium", "nash_gap": 0.0, "flapping": 0.0, "converged": False,
            "following": following,
            "endpoints": [{"endpoint": "http://127.0.0.1:1", "weight": 1.0, "regret": 0.0}]}}}

    frame = Frame(elapsed=4, duration=10, requests=10, errors=0, window=2,
                  pods=[PodLine("pod-0", 1.0, 0.004, 0.009)],
                  states={"client-1": state(True), "client-2": state(False)}, upstream="demo",
                  extra=["  signaler (embedded Redis): sidecars following 1/2"], signaling=True)
    tty = io.StringIO()
    LiveView(tty, tty=True).show(frame)
    rows = tty.getvalue().splitlines()
    assert any("client-1" in r and r.endswith("follows signaler") for r in rows)
    assert any("client-2" in r and r.endswith("local regret matching (fallback)") for r in rows)
    assert any("1/2 follow the signaler" in r for r in rows)
    pipe = io.StringIO()
    LiveView(pipe, tty=False).show(frame)
    assert "following=1/2" in pipe.getvalue() and "signaler (embedded Redis)" in pipe.getvalue()
