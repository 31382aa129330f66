"""``--log-format json`` (``EQUILIBRIUM_LOG_FORMAT``) on real service processes: every line
they write is one JSON object (wire.logs); a bad value is refused before anything starts."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.integration.procs import REPO_ROOT, child_env, start_sidecar


def test_a_sidecar_writes_one_json_object_a_line() -> None:
    sidecar = start_sidecar({"svc": ["http://127.0.0.1:9"]}, sidecar_id="sc-json",
                            env={"EQUILIBRIUM_LOG_FORMAT": "json"})
    try:
        request = urllib.request.Request(f"{sidecar.outbound_url}/x", headers={"Host": "svc"})
        with pytest.raises(urllib.error.HTTPError) as answer:  # a connect error, logged
            urllib.request.urlopen(request, timeout=10)
        assert answer.value.code == 502
    finally:
        assert sidecar.stop() == 0
    lines = [json.loads(line) for line in sidecar.output().splitlines() if line.strip()]
    assert lines and all(set(line) >= {"time", "level", "logger", "message"} for line in lines)
    assert any(line["logger"] == "sidecar.runner" and " ready: outbound=" in line["message"]
               for line in lines)


def test_a_bad_log_format_is_refused() -> None:
    for command in (["sidecar"], ["signaler", "--redis", "redis://127.0.0.1:9"]):
        done = subprocess.run([sys.executable, "-m", "equilibrium", *command],
                              env=child_env({"EQUILIBRIUM_LOG_FORMAT": "xml"}),
                              cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert "EQUILIBRIUM_LOG_FORMAT" in done.stderr and "plain, json" in done.stderr


def test_a_sidecar_that_cannot_start_says_why_in_json_too() -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "equilibrium", "sidecar", "--outbound",
             f"127.0.0.1:{port}", "--admin", "127.0.0.1:0", "--upstream", "svc=http://127.0.0.1:9"],
            env=child_env({"EQUILIBRIUM_LOG_FORMAT": "json"}), cwd=str(REPO_ROOT),
            capture_output=True, text=True, timeout=60)
    finally:
        taken.close()
    assert done.returncode == 1
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1]["level"] == "ERROR" and "equilibrium sidecar: " in lines[-1]["message"]
