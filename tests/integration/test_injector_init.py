"""`equilibrium init` for real: rules installed in a network namespace this test creates.

The namespace gets a veth pair (both ends inside it) with 10.77.0.1/24, so 10.77.0.2:80 stands for a
Service IP: the app's connection to it must land on the outbound port (original destination
recovered with SO_ORIGINAL_DST), and the sidecar UID's must not. Needs root, ip and iptables
(the ``needs`` marker: CI provides them, elsewhere the tests skip); everything is removed at the
end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from injector.config import InjectorConfig
from injector.review import review
from tests.injector_support import apply_patch, decode_patch, make_pod, make_review
from tests.support import REPO_ROOT, child_env

pytestmark = pytest.mark.needs("root", "ip", "iptables", "iptables-save", "ip6tables-save")

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
                          env=child_env())


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


def nat_rules(save: str = "iptables-save") -> list[str]:
    saved = netns(save, "-t", "nat").stdout
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


def injected_init_args(annotations: dict[str, str]) -> list[str]:
    """The init container's args, exactly as the webhook patches them into the pod."""
    pod = make_pod({"equilibrium.io/inject": "true", **annotations})
    patched = apply_patch(pod, decode_patch(review(make_review(pod), InjectorConfig())))
    (init,) = patched["spec"]["initContainers"]
    return list(init["args"])


@pytest.mark.parametrize(("mode", "ipv6_intercepted"), [
    (None, True),  # no annotation: auto, and this namespace has ::1 on lo
    ("auto", True),
    ("required", True),
    ("off", False),
])
def test_the_ipv6_annotation_decides_the_families_init_intercepts(
        namespace: str, mode: str | None, ipv6_intercepted: bool) -> None:
    args = injected_init_args({} if mode is None else {"equilibrium.io/ipv6": mode})
    done = netns(sys.executable, "-m", "equilibrium", *args)
    assert done.returncode == 0, done.stderr
    ipv4 = nat_rules()
    assert "-A EQUILIBRIUM_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in ipv4
    assert nat_rules("ip6tables-save") == (ipv4 if ipv6_intercepted else [])
    assert ("for IPv6" in done.stdout) is ipv6_intercepted


@pytest.mark.parametrize(("mode", "returncode", "says"), [
    ("auto", 0, "the pod's IPv6 traffic is NOT intercepted"),  # starts, loudly IPv4-only
    ("required", 1, "IPv6: `false -t nat -N EQUILIBRIUM_INBOUND` failed"),  # does not start
    ("off", 0, ""),  # IPv6 never tried
])
def test_a_failing_ip6tables_stops_only_a_pod_that_requires_ipv6(
        namespace: str, mode: str, returncode: int, says: str) -> None:
    args = injected_init_args({"equilibrium.io/ipv6": mode})
    done = netns(sys.executable, "-m", "equilibrium", *args, "--ip6tables", "false",
                 check=False)
    assert done.returncode == returncode, done.stderr
    assert says in done.stderr and ("false -t nat" in done.stderr) is (mode != "off")
    assert nat_rules("ip6tables-save") == []
