"""The dashboard's routes on an admin listener: the page, its files, and a live frame stream.

Owns :class:`DashboardFeed`: a sampler task that builds one frame a second (the frame shape is in
:mod:`dashboard`) and keeps the last few minutes of them, and the routes it adds to an admin
app::

    GET /dashboard                 the page (text/html)
    GET /dashboard/dashboard.js    its script; /dashboard/dashboard.css its style sheet
    GET /dashboard/events          Server-Sent Events (text/event-stream): one ``history``
                                   event with the frames kept, then one ``frame`` event per frame
    GET /dashboard/frame           the newest frame as JSON (for curl and scripts)

Server-Sent Events (WHATWG HTML, "Server-sent events") rather than a WebSocket: the stream only
flows one way, and the browser's ``EventSource`` reconnects by itself (``retry:``) when the
process restarts, which a WebSocket page would have to do by hand. Read-only: GET only, no
cookies, a Content-Security-Policy that lets the page load nothing but its own files and connect
nowhere but its own origin. What the frame holds is the caller's ``sample``; this module never
reads a service's state itself and never touches Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

from aiohttp import web

from dashboard import FRAME_VERSION
from wire.admin import json_safe

log = logging.getLogger(__name__)

PAGE_PATH = "/dashboard"
EVENTS_PATH = "/dashboard/events"
FRAME_PATH = "/dashboard/frame"
STATIC_FILES = {
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}
PERIOD = 1.0
"""Seconds between frames (the issue asks for at least one a second)."""
KEEP = 300
"""Frames kept for a page that connects (five minutes at one a second)."""
MAX_CLIENTS = 16
"""Open event streams at most; more are answered 503 (an admin port is not a fan-out server)."""
MAX_LOAD = 0.05
"""Largest share of the event loop's time the sampler may take (it slows down beyond)."""
KEEPALIVE = 15.0
RETRY_MS = 1000
"""How soon a browser reconnects after the stream ends (the ``retry:`` field)."""

SECURITY_HEADERS = {
    # Only the page's own files; connections only back to the admin listener; the one image is
    # the empty data: favicon (so the browser asks for no /favicon.ico).
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def asset(name: str) -> bytes:
    """One of the page's files from the package data (``index.html`` or a STATIC_FILES name)."""
    return resources.files("dashboard").joinpath("static", name).read_bytes()


class DashboardFeed:
    """One frame per ``period`` from ``sample()``, the last ``keep`` kept, streamed to pages.

    ``sample`` returns the frame's body (``source``, ``id``, ``upstreams``...); the feed adds
    ``v``, ``boot``, ``time`` and ``seq``. A ``sample`` that raises is logged and skipped: the
    page keeps the previous frame and the admin listener keeps answering.
    """

    def __init__(
        self,
        sample: Callable[[], dict[str, Any]],
        *,
        period: float = PERIOD,
        keep: int = KEEP,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not period > 0:
            raise ValueError(f"period must be > 0, got {period!r}")
        self.sample = sample
        self.period = period
        self.clock = clock
        self.boot = clock()
        self.frames: deque[tuple[int, str]] = deque(maxlen=max(1, keep))
        self.seq = 0
        self.clients = 0
        self.closed = False
        self._tick = asyncio.Event()
        self._failing = False

    # ------------------------------------------------------------------ frames

    def take(self) -> dict[str, Any] | None:
        """Build one frame now and keep it (None if ``sample`` failed)."""
        try:
            body = self.sample()
        except Exception:  # a bug in a view must not stop the admin listener
            if not self._failing:
                log.exception("dashboard: building a frame failed (keeping the previous one)")
            self._failing = True
            return None
        self._failing = False
        self.seq += 1
        frame = json_safe({**body, "v": FRAME_VERSION, "boot": self.boot, "time": self.clock(),
                           "seq": self.seq})
        self.frames.append((self.seq, json.dumps(frame, separators=(",", ":"),
                                                 allow_nan=False)))
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()
        return frame

    async def run(self) -> None:
        """Take a frame every ``period`` seconds until cancelled; if building one takes more
        than :data:`MAX_LOAD` of that, wait longer, so the dashboard never holds the event
        loop (and the service on it) for more than that share of the time."""
        loop = asyncio.get_running_loop()
        while not self.closed:
            started = loop.time()
            self.take()
            spent = loop.time() - started
            await asyncio.sleep(max(self.period, spent / MAX_LOAD) - spent)

    async def close(self, _: web.Application | None = None) -> None:
        """Let every open stream end (on the app's shutdown, so it does not wait for them)."""
        self.closed = True
        self._tick.set()

    # ------------------------------------------------------------------ routes

    def attach(self, app: web.Application) -> None:
        """Add the dashboard's routes to ``app`` and run the sampler while the app runs."""
        page = asset("index.html")
        files = {name: (asset(name), kind) for name, kind in STATIC_FILES.items()}

        async def index(_: web.Request) -> web.Response:
            return web.Response(body=page, content_type="text/html", charset="utf-8",
                                headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})

        def static(name: str) -> Callable[[web.Request], Any]:
            body, kind = files[name]

            async def handler(_: web.Request) -> web.Response:
                return web.Response(body=body, content_type=kind, charset="utf-8",
                                    headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})
            return handler

        async def slash(_: web.Request) -> web.Response:
            # the page's links are relative to /dashboard (so it works under a path prefix)
            raise web.HTTPFound(PAGE_PATH)

        async def latest(_: web.Request) -> web.Response:
            if not self.frames:
                return web.json_response({"status": "no frame yet"}, status=503,
                                         headers=SECURITY_HEADERS)
            return web.Response(text=self.frames[-1][1], content_type="application/json",
                                headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})

        async def sampler(_: web.Application) -> AsyncIterator[None]:
            task = asyncio.create_task(self.run(), name="dashboard-sampler")
            yield
            self.closed = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        app.router.add_get(PAGE_PATH, index)
        app.router.add_get(PAGE_PATH + "/", slash)
        for name in files:
            app.router.add_get(f"{PAGE_PATH}/{name}", static(name))
        app.router.add_get(EVENTS_PATH, self.events)
        app.router.add_get(FRAME_PATH, latest)
        app.cleanup_ctx.append(sampler)
        app.on_shutdown.append(self.close)

    async def events(self, request: web.Request) -> web.StreamResponse:
        """The event stream: the kept frames as one ``history`` event, then each new frame."""
        if self.clients >= MAX_CLIENTS:
            return web.json_response({"status": "too many dashboard streams"}, status=503,
                                     headers=SECURITY_HEADERS)
        self.clients += 1
        response = web.StreamResponse(headers={
            **SECURITY_HEADERS, "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        try:
            await response.prepare(request)
            history = "[" + ",".join(text for _, text in self.frames) + "]"
            last = self.frames[-1][0] if self.frames else 0
            await response.write(
                f"retry: {RETRY_MS}\nevent: history\ndata: {history}\n\n".encode())
            while not self.closed:
                tick = self._tick
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(tick.wait(), KEEPALIVE)
                if self.closed:
                    break
                fresh = [(seq, text) for seq, text in self.frames if seq > last]
                if not fresh:
                    await response.write(b": keepalive\n\n")
                    continue
                for seq, text in fresh:
                    await response.write(f"event: frame\ndata: {text}\n\n".encode())
                    last = seq
        except ConnectionResetError:  # the page went away
            pass
        finally:
            self.clients -= 1
        return response
