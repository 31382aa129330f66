"""``equilibrium demo`` end to end: real fleet, real sidecars, real load, real exit; by default
with the signaling plane (a real embedded redis-server and a real signaler process)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.support import child_env, interruptible_children, keep_reading


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


def _signal_masks(pid: int) -> dict[str, str]:
    """The ignored, blocked and caught signal masks of ``pid`` (hex, from /proc): a child
    that inherited SIGINT ignored or blocked never sees a Ctrl-C."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)
            if k in ("SigBlk", "SigIgn", "SigCgt")}


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
    # The live dashboard is the signaler's (the demo's signaler has the admin port it names).
    assert re.search(r"^dashboard: http://127\.0\.0\.1:\d+/dashboard ", proc.stdout, re.M)
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
    assert re.search(r"^dashboard: http://127\.0\.0\.1:\d+/dashboard ", proc.stdout, re.M)
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
    with interruptible_children():
        proc = subprocess.Popen(
            [sys.executable, "-m", "equilibrium", "demo", "--duration", "60", "--clients", "2",
             "--out", str(tmp_path)],
            cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        line = ""
        errors: list[str] = []
        keep_reading(proc.stderr, errors)
        while time.monotonic() < deadline and not line.startswith("t="):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(errors[-50:])
        assert line.startswith("t="), "the demo never showed its live view"
        keep_reading(proc.stdout, [])  # the live view goes on until the demo stops
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
        masks = _signal_masks(proc.pid)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the demo did not stop within 40 s of SIGINT; its signal masks "
                        f"{masks}; its last stderr lines: {''.join(errors[-30:])}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert not [pid for pid in children if _alive(pid)]
    assert not (tmp_path / "equilibrium-demo.png").exists()  # interrupted: no summary


def test_demo_with_redis_but_no_mesh_key_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "equilibrium", "demo", "--redis", "redis://127.0.0.1:9/0",
         "--out", str(tmp_path)],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "EQUILIBRIUM_MESH_SECRET" in proc.stderr and "--redis" in proc.stderr
    assert not (tmp_path / "equilibrium-demo.png").exists()
