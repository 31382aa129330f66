"""The sidecar process on 0.0.0.0 answers on [::1] too; a fixed port taken on IPv6 fails start.

Real `equilibrium sidecar` processes on loopback only (127.0.0.1 and [::1]).
"""

from __future__ import annotations

import json
import socket

from tests.integration.procs import http_get, run_equilibrium, start_equilibrium, wait_ready


def free_dual_port() -> int:
    """A port free on both 0.0.0.0 and [::] a moment ago."""
    for _ in range(20):
        with socket.socket(socket.AF_INET) as v4:
            v4.bind(("0.0.0.0", 0))
            port = int(v4.getsockname()[1])
            with socket.socket(socket.AF_INET6) as v6:
                v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    v6.bind(("::", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free on both families")


def test_wildcard_listeners_answer_on_ipv4_and_ipv6_loopback() -> None:
    outbound, admin = free_dual_port(), free_dual_port()
    proc = start_equilibrium("sidecar", "--outbound", f"0.0.0.0:{outbound}",
                             "--admin", f"0.0.0.0:{admin}", "--id", "dual",
                             "--upstream", "users=http://127.0.0.1:9")
    try:
        wait_ready(f"http://127.0.0.1:{admin}/readyz", proc, 20)
        assert http_get(f"http://[::1]:{admin}/healthz")[0] == 200
        # The outbound listener's IPv6 side is the same HTTP proxy: an unknown Host is its 404.
        status, body = http_get(f"http://[::1]:{outbound}/", timeout=5)
        answer = json.loads(body)
        assert (status, answer["reason"], answer["sidecar"]) == (404, "unknown-upstream", "dual")
    finally:
        assert proc.stop() == 0


def test_a_fixed_port_taken_on_ipv6_is_a_startup_error() -> None:
    port, admin = free_dual_port(), free_dual_port()
    with socket.socket(socket.AF_INET6) as squatter:
        squatter.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        squatter.bind(("::", port))
        squatter.listen(1)
        done = run_equilibrium("sidecar", "--outbound", f"0.0.0.0:{port}",
                               "--admin", f"127.0.0.1:{admin}", timeout=20)
    assert done.returncode != 0
    assert f"cannot listen on [::]:{port} for outbound" in done.stdout + done.stderr
