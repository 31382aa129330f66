"""Real peer proxies for the benchmark: HAProxy and nginx as contenders beside the sidecar.

Owns the peers' configurations (generated, never hand-written: HAProxy 2.6 with ``nbthread 1``,
nginx 1.22 with ``worker_processes 1``, i.e. one core's worth of workers each, listening on
loopback only), their lifecycle as child processes (logs to files in the run's log folder,
always stopped), the CPU of each peer's whole process tree read from ``/proc``, CPU pinning,
and one ``wrk`` run against a URL (bounded in time) with its parsed result.

Which peers exist: HAProxy ``leastconn`` and ``random(2)`` (power of two choices), nginx
``least_conn`` and ``random two least_conn``; by name only, HAProxy ``random(1)`` (one server
drawn at random, blind to queues). A peer whose binary is missing is skipped with a
note; nothing here installs anything. It must not know the scenarios: they decide what load
the peers get and what is reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from equilibrium.lab.processes import ChildProcess, cpu_seconds, free_port

#: ``--peers`` values that are not a list of names
AUTO = "auto"
NONE = "none"
READY_TIMEOUT = 10.0
#: the peer every ratio is taken to
REFERENCE = "haproxy-leastconn"


@dataclass(frozen=True, slots=True)
class PeerSpec:
    """One contender: a ``server`` (haproxy or nginx) with one balancing directive."""

    name: str
    server: str
    balance: str


PEERS: tuple[PeerSpec, ...] = (
    PeerSpec("haproxy-leastconn", "haproxy", "leastconn"),
    PeerSpec("haproxy-random2", "haproxy", "random(2)"),
    PeerSpec("nginx-least-conn", "nginx", "least_conn"),
    PeerSpec("nginx-random-two", "nginx", "random two least_conn"),
)
#: chosen by name only (not by ``auto``): HAProxy drawing one server at random, the reference
#: a queue-blind balancer gives (``herding`` separates routing from the proxy hop with it)
BY_NAME_ONLY: tuple[PeerSpec, ...] = (PeerSpec("haproxy-random", "haproxy", "random(1)"),)
_BY_NAME = {p.name: p for p in (*PEERS, *BY_NAME_ONLY)}


def installed(server: str) -> bool:
    return shutil.which(server) is not None


def select(request: str, *, first_of_each: bool = False) -> tuple[list[PeerSpec], list[str]]:
    """The peers ``request`` asks for that are installed, and a note per skipped server.

    ``request`` is ``auto`` (every known peer whose server is installed), ``none``, or a
    comma-separated list of peer names (ValueError names an unknown one). ``first_of_each``
    keeps one peer per server (where the balancing directive does not matter: one backend).
    """
    request = request.strip()
    if request == NONE:
        return [], []
    if request == AUTO:
        wanted = list(PEERS)
    else:
        wanted = []
        for name in (n.strip() for n in request.split(",") if n.strip()):
            if name not in _BY_NAME:
                raise ValueError(f"unknown peer {name!r}; choose from {', '.join(_BY_NAME)}, "
                                 f"{AUTO} or {NONE}")
            wanted.append(_BY_NAME[name])
    if first_of_each:
        firsts: dict[str, PeerSpec] = {}
        for peer in wanted:
            firsts.setdefault(peer.server, peer)
        wanted = list(firsts.values())
    chosen, notes = [], []
    for server in dict.fromkeys(p.server for p in wanted):
        if installed(server):
            chosen += [p for p in wanted if p.server == server]
        else:
            notes.append(f"{server} is not installed: its contenders were skipped "
                         f"(apt-get install -y {server})")
    return chosen, notes


def _hostport(url: str) -> str:
    """``127.0.0.1:8080`` from ``http://127.0.0.1:8080`` (or the address itself)."""
    return url.split("://", 1)[-1].rstrip("/")


def haproxy_config(listen: str, backends: Sequence[str], balance: str) -> str:
    """HAProxy 2.6, one thread, HTTP mode with keep-alive both ways, no access log.

    Only notices and worse reach the log (stderr, a file): the sidecar writes no line per
    request either, so neither pays for logging on the measured path.
    """
    if not backends:
        raise ValueError("haproxy needs at least one backend")
    servers = "\n".join(f"    server pod-{i} {_hostport(b)}" for i, b in enumerate(backends))
    return f"""\
global
    nbthread 1
    maxconn 8192
    log stderr format raw local0 notice

defaults
    mode http
    log global
    option http-keep-alive
    http-reuse safe
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s

frontend contender
    bind {_hostport(listen)}
    default_backend pods

backend pods
    balance {balance}
{servers}
"""


def haproxy_h2_config(listen: str, backends: Sequence[str]) -> str:
    """HAProxy 2.6, one thread, prior-knowledge h2c on both sides (``proto h2`` on the bind
    line and on the servers): each HTTP/2 stream is a request balanced on its own."""
    if not backends:
        raise ValueError("haproxy needs at least one backend")
    servers = "\n".join(f"    server pod-{i} {_hostport(b)} proto h2"
                        for i, b in enumerate(backends))
    return f"""\
global
    nbthread 1
    maxconn 8192
    log stderr format raw local0 notice

defaults
    mode http
    log global
    http-reuse safe
    timeout connect 2s
    timeout client 30s
    timeout server 30s

frontend contender
    bind {_hostport(listen)} proto h2
    default_backend pods

backend pods
    balance leastconn
{servers}
"""


def _nginx_main(workdir: Path) -> str:
    paths = "\n".join(f"    {kind}_temp_path {workdir / kind};"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""\
daemon off;
master_process on;
worker_processes 1;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;

events {{
    worker_connections 8192;
}}

http {{
    access_log off;
{paths}
"""


def nginx_config(listen: str, backends: Sequence[str], balance: str, workdir: Path) -> str:
    """nginx 1.22, one worker, keep-alive to the backends, no access log."""
    if not backends:
        raise ValueError("nginx needs at least one backend")
    servers = "\n".join(f"        server {_hostport(b)};" for b in backends)
    return _nginx_main(workdir) + f"""\
    upstream pods {{
        {balance};
{servers}
        keepalive 64;
    }}

    server {{
        listen {_hostport(listen)};
        location / {{
            proxy_pass http://pods;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }}
    }}
}}
"""


def nginx_static_config(listen: str, workdir: Path) -> str:
    """nginx answering every request ``200 ok`` itself: a backend that costs next to nothing,
    so that a proxy in front of it meets its own ceiling first."""
    return _nginx_main(workdir) + f"""\
    server {{
        listen {_hostport(listen)};
        keepalive_requests 1000000;
        location / {{
            return 200 "ok\\n";
        }}
    }}
}}
"""


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (Linux ``/proc``; just ``[pid]`` elsewhere)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += parents.get(p, [])
    return tree


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its live descendants (nginx: master and worker)."""
    return sum(c for c in (cpu_seconds(p) for p in descendants(pid)) if c == c)


def pin(pid: int, cpus: Iterable[int]) -> None:
    """Pin every thread of ``pid``'s process tree to ``cpus`` (as ``taskset -a -p``)."""
    cpu_set = set(cpus)
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task.name), cpu_set)


class PeerProxy:
    """A running peer: send load to ``url`` (any Host); ``cpu_seconds()`` reads its tree."""

    def __init__(self, name: str, child: ChildProcess, listen: str, log: Path) -> None:
        self.name = name
        self.child = child
        self.url = f"http://{listen}"
        self.log = log

    @classmethod
    async def start(cls, spec: PeerSpec | None, backends: Sequence[str], workdir: Path,
                    *, name: str | None = None) -> PeerProxy:
        """Write the config under ``workdir``, start the server, wait until it answers.

        ``spec`` None starts the static nginx backend (``backends`` is then ignored).
        """
        label = name or (spec.name if spec else "nginx-static")
        home = workdir / label
        home.mkdir(parents=True, exist_ok=True)
        listen = f"127.0.0.1:{free_port()}"
        log = home / "stderr.log"
        if spec is not None and spec.server == "haproxy":
            conf = home / "haproxy.cfg"
            conf.write_text(haproxy_config(listen, backends, spec.balance))
            argv = ["haproxy", "-db", "-f", str(conf)]
        else:
            conf = home / "nginx.conf"
            text = (nginx_config(listen, backends, spec.balance, home) if spec is not None
                    else nginx_static_config(listen, home))
            conf.write_text(text)
            argv = ["nginx", "-e", str(home / "error.log"), "-p", str(home), "-c", str(conf)]
        return await cls.launch(label, argv, listen, log)

    @classmethod
    async def launch(cls, label: str, argv: Sequence[str], listen: str, log: Path) -> PeerProxy:
        """Run ``argv`` (a proxy configured to listen on ``listen``), wait until it does."""
        child = await ChildProcess.start(label, list(argv), stdout_pipe=False,
                                         stderr_path=str(log))
        peer = cls(label, child, listen, log)
        try:
            await peer._wait_listening()
        except BaseException:
            await child.stop()
            raise
        return peer

    async def _wait_listening(self) -> None:
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT
        while True:
            if not self.child.running:
                tail = self.log.read_text(errors="replace")[-500:] if self.log.exists() else ""
                raise RuntimeError(f"{self.name} exited ({self.child.proc.returncode}): {tail}")
            try:
                _, writer = await asyncio.open_connection(host, int(port))
            except OSError:
                if loop.time() > deadline:
                    raise RuntimeError(f"{self.name} not listening on {self.url} after "
                                       f"{READY_TIMEOUT:g} s") from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.child.pid)

    def pin(self, cpus: Iterable[int]) -> None:
        pin(self.child.pid, cpus)

    async def stop(self) -> None:
        await self.child.stop()


@dataclass(frozen=True, slots=True)
class WrkResult:
    """What one ``wrk --latency`` run reports."""

    requests: int
    seconds: float
    requests_per_s: float
    p50: float
    p99: float
    non_2xx: int = 0
    socket_errors: int = 0


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _duration(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if m is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(text: str) -> WrkResult:
    """The numbers of a ``wrk --latency`` report; ValueError when it has none."""
    done = re.search(r"(\d+) requests in ([\d.]+(?:us|ms|s|m))", text)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    p50 = re.search(r"^\s+50(?:\.000)?%\s+(\S+)", text, re.M)
    p99 = re.search(r"^\s+99(?:\.000)?%\s+(\S+)", text, re.M)
    if not (done and rate and p50 and p99):
        raise ValueError("wrk printed no result: " + text.strip()[-300:])
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                     text)
    return WrkResult(
        requests=int(done.group(1)), seconds=_duration(done.group(2)),
        requests_per_s=float(rate.group(1)), p50=_duration(p50.group(1)),
        p99=_duration(p99.group(1)), non_2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sum(int(x) for x in sock.groups()) if sock else 0,
    )


async def run_wrk(url: str, *, duration: float, connections: int, host: str | None = None,
                  cpus: Iterable[int] | None = None, log: Path | None = None) -> WrkResult:
    """One ``wrk -t1 --latency`` run of ``duration`` s (killed if it overruns by 10 s)."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
            "--timeout", "5s"]
    if host:
        argv += ["-H", f"Host: {host}"]
    if cpus is not None:
        argv = ["taskset", "-c", ",".join(str(c) for c in cpus), *argv]
    proc = await asyncio.create_subprocess_exec(
        *argv, url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), duration + 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode(errors="replace")
    if log is not None:
        log.write_text(text)
    return parse_wrk(text)
