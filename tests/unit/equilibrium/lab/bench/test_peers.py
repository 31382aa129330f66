"""The benchmark's peer proxies: generated HAProxy and nginx configurations, peer selection,
wrk report parsing, process-tree CPU (pure: no server is started here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from equilibrium.lab.bench import peers

PODS = ["http://127.0.0.1:9001", "http://127.0.0.1:9002/"]


def _directives(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("balance", ["leastconn", "random(2)"])
def test_haproxy_config_has_one_thread_one_listener_and_every_pod(balance: str) -> None:
    lines = _directives(peers.haproxy_config("127.0.0.1:8000", PODS, balance))
    assert "nbthread 1" in lines
    assert "mode http" in lines
    assert [x for x in lines if x.startswith("bind ")] == ["bind 127.0.0.1:8000"]
    assert f"balance {balance}" in lines
    assert [x for x in lines if x.startswith("server ")] == [
        "server pod-0 127.0.0.1:9001", "server pod-1 127.0.0.1:9002"]
    # no access log line per request: only notices and worse, to stderr (a file)
    assert "log stderr format raw local0 notice" in lines
    assert not any("httplog" in x for x in lines)


@pytest.mark.parametrize("balance", ["least_conn", "random two least_conn"])
def test_nginx_config_has_one_worker_keepalive_upstream_and_own_paths(
        balance: str, tmp_path: Path) -> None:
    text = peers.nginx_config("127.0.0.1:8000", PODS, balance, tmp_path)
    lines = _directives(text)
    assert "worker_processes 1;" in lines and "daemon off;" in lines
    assert f"{balance};" in lines
    assert [x for x in lines if x.startswith("server 127")] == [
        "server 127.0.0.1:9001;", "server 127.0.0.1:9002;"]
    assert "listen 127.0.0.1:8000;" in lines
    assert "proxy_http_version 1.1;" in lines and 'proxy_set_header Connection "";' in lines
    assert any(x.startswith("keepalive ") for x in lines)
    assert "access_log off;" in lines
    # every file nginx writes stays under the peer's own folder
    paths = [x.split()[1].rstrip(";") for x in lines
             if x.startswith(("pid ", "error_log ")) or "_temp_path " in x]
    assert len(paths) == 7 and all(p.startswith(str(tmp_path)) for p in paths)
    assert text.count("{") == text.count("}")


def test_static_backend_answers_by_itself(tmp_path: Path) -> None:
    text = peers.nginx_static_config("127.0.0.1:8001", tmp_path)
    assert "proxy_pass" not in text and 'return 200 "ok\\n";' in text
    assert "worker_processes 1;" in text and text.count("{") == text.count("}")


def test_a_proxy_without_backends_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one backend"):
        peers.haproxy_config("127.0.0.1:1", [], "leastconn")
    with pytest.raises(ValueError, match="at least one backend"):
        peers.nginx_config("127.0.0.1:1", [], "least_conn", tmp_path)


def test_select_names_auto_none_and_missing_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peers, "installed", lambda server: server == "haproxy")
    chosen, notes = peers.select("auto")
    assert [p.name for p in chosen] == ["haproxy-leastconn", "haproxy-random2"]
    assert len(notes) == 1 and "nginx is not installed" in notes[0]
    assert peers.select("none") == ([], [])
    chosen, notes = peers.select("haproxy-random2")
    assert [p.name for p in chosen] == ["haproxy-random2"] and notes == []
    with pytest.raises(ValueError, match="unknown peer 'envoy'"):
        peers.select("haproxy-leastconn,envoy")


def test_select_first_of_each_keeps_one_peer_per_server(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peers, "installed", lambda server: True)
    chosen, _ = peers.select("auto", first_of_each=True)
    assert [p.name for p in chosen] == ["haproxy-leastconn", "nginx-least-conn"]
    assert chosen[0].name == peers.REFERENCE


WRK = """\
Running 5s test @ http://127.0.0.1:8000
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   652.00us  1.02ms  21.87ms   96.12%
    Req/Sec    26.80k     1.93k   29.37k    82.00%
  Latency Distribution
     50%  501.00us
     75%  620.00us
     90%  795.00us
     99%    4.42ms
  133405 requests in 5.00s, 19.85MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec:  26680.33
Transfer/sec:      3.97MB
"""


def test_parse_wrk_reads_rate_percentiles_and_errors() -> None:
    r = peers.parse_wrk(WRK)
    assert r.requests == 133405 and r.seconds == 5.0
    assert r.requests_per_s == pytest.approx(26680.33)
    assert r.p50 == pytest.approx(501e-6) and r.p99 == pytest.approx(4.42e-3)
    assert r.non_2xx == 7 and r.socket_errors == 3


def test_parse_wrk_without_a_result_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="wrk printed no result: unable to connect"):
        peers.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux /proc only")
def test_process_tree_cpu_includes_this_process() -> None:
    tree = peers.descendants(os.getppid())
    assert os.getpid() in tree and tree[0] == os.getppid()
    sum(i * i for i in range(200_000))  # burn a little CPU of our own
    assert peers.tree_cpu_seconds(os.getpid()) > 0
