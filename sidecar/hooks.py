"""``equilibrium sidecar-hook``: the container lifecycle hooks the injector gives the proxy.

A pod's ordinary containers start together and get SIGTERM together, so an app can call out
before its sidecar listens (its very first requests) and after its sidecar stopped accepting
(the calls it makes while it shuts down): both meet a closed port. The injector closes both
gaps on any Kubernetes version (docs/kubernetes.md, "Start and stop order"):

- ``post-start``: the sidecar is the pod's first container, and this hook waits until it
  answers ``/readyz``. The kubelet starts a pod's containers in their order and runs each
  one's postStart hook to its end before it starts the next, so the app starts once the
  sidecar is ready (what Istio's ``holdApplicationUntilProxyStarts`` does). Bounded: past
  ``--timeout`` the hook returns anyway, and the app starts as it would without it.
- ``pre-stop``: waits ``--seconds`` before the kubelet sends the sidecar SIGTERM, while the
  app, which gets its SIGTERM at once, makes its last calls through a sidecar still serving
  (what Linkerd's ``proxy-wait-before-exit-seconds`` does). The wait counts against the
  pod's ``terminationGracePeriodSeconds``.

A native sidecar (``--native-sidecar``, Kubernetes 1.29+) gets both orders from the kubelet
and needs neither hook. Both hooks exit 0 whatever happens: a failed postStart hook would
only make the kubelet kill and restart the sidecar.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

DEFAULT_ADMIN = "127.0.0.1:15020"
DEFAULT_TIMEOUT = 60.0  # seconds post-start waits for /readyz at most
MAX_WAIT = 600.0  # the longest wait either hook accepts
POLL = 0.1  # seconds between two /readyz checks


def is_ready(admin: str, timeout: float = 1.0) -> bool:
    """Whether the sidecar's admin listener at ``admin`` (HOST:PORT) answers ``/readyz`` 200
    within ``timeout`` seconds in all. A plain socket, not urllib: no proxy from the
    environment applies, and the time bound is the whole exchange's (urllib's is each read's:
    a listener that drips bytes would hold it forever); whatever answers, nothing raises."""
    deadline = time.monotonic() + timeout
    host, _, port = admin.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
            sock.sendall(b"GET /readyz HTTP/1.0\r\nHost: " + admin.encode("ascii")
                         + b"\r\nConnection: close\r\n\r\n")
            line = b""
            while b"\n" not in line and len(line) < 64:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                sock.settimeout(left)
                chunk = sock.recv(64)
                if not chunk:
                    break
                line += chunk
    except (OSError, ValueError, UnicodeError):
        return False
    return line.startswith((b"HTTP/1.0 200 ", b"HTTP/1.1 200 "))


def wait_ready(admin: str, timeout: float, *,
               ready: Callable[[str], bool] = is_ready,
               clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep) -> bool:
    """Poll ``/readyz`` until it answers 200 (True) or ``timeout`` seconds passed (False)."""
    deadline = clock() + timeout
    while True:
        if ready(admin):
            return True
        left = deadline - clock()
        if left <= 0:
            return False
        sleep(min(POLL, left))


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value <= MAX_WAIT:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_WAIT:g} seconds")
    return value


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sidecar-hook", help="container lifecycle hooks of an injected sidecar",
        description=__doc__.split("\n\n")[0])
    hooks = parser.add_subparsers(dest="hook", metavar="HOOK", required=True)
    start = hooks.add_parser("post-start", help="wait until the sidecar is ready (bounded)")
    start.add_argument("--admin", default=DEFAULT_ADMIN, metavar="HOST:PORT",
                       help=f"the sidecar's admin listener (default {DEFAULT_ADMIN})")
    start.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                       help=f"return anyway after this long (default {DEFAULT_TIMEOUT:g})")
    stop = hooks.add_parser("pre-stop", help="let the app shut down before the sidecar does")
    stop.add_argument("--seconds", type=_seconds, required=True,
                      help="how long the sidecar keeps serving before its SIGTERM")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.hook == "post-start":
        started = time.monotonic()
        if wait_ready(args.admin, args.timeout):
            print(f"sidecar ready after {time.monotonic() - started:.1f} s")
        else:
            print(f"sidecar not ready after {args.timeout:g} s: the app starts anyway",
                  file=sys.stderr)
        return 0
    time.sleep(args.seconds)
    return 0
