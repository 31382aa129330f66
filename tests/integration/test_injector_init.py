"""`equilibrium init` for real: rules installed in a network namespace this test creates.

The namespace gets a veth pair (both ends inside it) with 10.77.0.1/24, so 10.77.0.2:80 stands for a
Service IP: the app's connection to it must land on the outbound port (original destination
recovered with SO_ORIGINAL_DST), and the sidecar UID's must not. Needs root and iptables
(both present on these machines and in CI); everything is removed at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from tests.integration.procs import REPO_ROOT

NS = f"eq-init-{os.getpid()}"

# Runs inside the namespace: listen on the outbound port as the "sidecar", connect to the
# fake Service IP as UID `uid`, report where the connection was really going.
PROBE = textwrap.dedent("""
    import os, socket, struct, sys
    uid = int(sys.argv[1])
    listener = socket.socket(); listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", 15001)); listener.listen(1)
    if os.fork() == 0:
        os.setgid(uid); os.setuid(uid)
        client = socket.socket(); client.settimeout(0.5)
        try:
            client.connect(("10.77.0.2", 80))  # nothing answers there unless redirected
        except OSError:
            pass
        os._exit(0)
    os.wait()  # the attempt is over: it either reached the listener or went nowhere
    listener.setblocking(False)
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        print("not redirected")
    else:
        raw = conn.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST
        port, = struct.unpack("!H", raw[2:4])
        print(f"redirected original={socket.inet_ntoa(raw[4:8])}:{port}")
""")


def netns(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", NS, *cmd], capture_output=True, text=True,
                          timeout=30, check=check, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


@pytest.fixture
def namespace() -> Iterator[str]:
    subprocess.run(["ip", "netns", "add", NS], check=True, timeout=10)
    try:
        for cmd in (["ip", "link", "set", "lo", "up"],
                    ["ip", "link", "add", "eq0", "type", "veth", "peer", "name", "eq1"],
                    ["ip", "addr", "add", "10.77.0.1/24", "dev", "eq0"],
                    ["ip", "link", "set", "eq0", "up"],
                    ["ip", "link", "set", "eq1", "up"]):
            netns(*cmd)
        yield NS
    finally:
        subprocess.run(["ip", "netns", "del", NS], check=False, timeout=10)


def nat_rules() -> list[str]:
    saved = netns("iptables-save", "-t", "nat").stdout
    return [line for line in saved.splitlines() if "EQUILIBRIUM" in line]


def probe(uid: int) -> str:
    return netns(sys.executable, "-c", PROBE, str(uid)).stdout.strip()


def test_init_redirects_the_app_but_not_the_sidecar_and_cleans_up(namespace: str) -> None:
    done = netns(sys.executable, "-m", "equilibrium", "init", "--exclude-outbound-ports", "5432")
    assert "rules installed" in done.stdout
    installed = nat_rules()
    assert "-A EQUILIBRIUM_OUTPUT -m owner --uid-owner 1337 -j RETURN" in installed
    assert "-A EQUILIBRIUM_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in installed

    assert probe(1000) == "redirected original=10.77.0.2:80"  # the app
    assert probe(1337) == "not redirected"  # the sidecar's own upstream connection

    # Running init again (a restarted pod) leaves one copy of each rule.
    netns(sys.executable, "-m", "equilibrium", "init", "--exclude-outbound-ports", "5432")
    assert nat_rules() == installed

    netns(sys.executable, "-m", "equilibrium", "init", "--cleanup")
    assert nat_rules() == []
    assert probe(1000) == "not redirected"
