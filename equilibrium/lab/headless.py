"""A headless Chromium driven over the DevTools protocol, for the dashboard's tests and screenshot.

Owns starting Debian's ``chromium`` on loopback only (no proxy reachable, every host name but
127.0.0.1 unresolvable, no background or component-update traffic, a throw-away profile) and a
small DevTools protocol client over aiohttp's WebSocket client: navigate, evaluate JavaScript,
take a screenshot, and record what the page did -- console errors, uncaught exceptions, log
entries, and every URL it requested -- so a test can check the page and that nothing left the
machine. No Playwright or Selenium: the protocol needs one WebSocket, which aiohttp already has
(Chrome DevTools Protocol, https://chromedevtools.github.io/devtools-protocol/).

Bounded: every command waits at most ``timeout`` seconds; :meth:`Chromium.close` kills the
browser's whole process group.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = "/usr/bin/chromium"
START_TIMEOUT = 30.0
COMMAND_TIMEOUT = 15.0
LOOPBACK_ONLY = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--disable-default-apps", "--metrics-recording-only",
    "--disable-features=Translate,MediaRouter,OptimizationHints",
    "--proxy-server=127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
_LISTENING = re.compile(rb"DevTools listening on (ws://\S+)")


def find_chromium() -> str | None:
    """The chromium binary (``/usr/bin/chromium`` or ``chromium`` on PATH), or None."""
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class PageRecord:
    """What a page did since it was opened."""

    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    log_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        return self.console_errors + self.exceptions + self.log_errors


class Page:
    """One tab, over its own DevTools WebSocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, timeout: float) -> None:
        self.ws = ws
        self.timeout = timeout
        self.record = PageRecord()
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read(), name="cdp-reader")

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            if "id" in data:
                future = self._waiting.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            else:
                self._event(data.get("method", ""), data.get("params") or {})
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ConnectionError("the DevTools connection closed"))

    def _event(self, method: str, params: dict[str, Any]) -> None:
        record = self.record
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            record.console_errors.append(" ".join(
                str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails") or {}
            exc = details.get("exception") or {}
            record.exceptions.append(str(exc.get("description") or details.get("text")))
        elif method == "Log.entryAdded":
            entry = params.get("entry") or {}
            if entry.get("level") == "error":
                record.log_errors.append(f"{entry.get('text')} {entry.get('url', '')}".strip())
        elif method == "Network.requestWillBeSent":
            record.requests.append(str((params.get("request") or {}).get("url", "")))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its ``result`` (RuntimeError on a protocol error)."""
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        await self.ws.send_str(json.dumps({"id": ident, "method": method, "params": params}))
        answer = await asyncio.wait_for(future, self.timeout)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result") or {}
        return result

    async def open(self, url: str) -> None:
        """Turn on the event domains, then navigate to ``url`` and wait for its load event."""
        for domain in ("Runtime", "Log", "Network", "Page"):
            await self.send(f"{domain}.enable")
        await self.send("Page.navigate", url=url)
        for _ in range(int(self.timeout * 10)):
            if await self.evaluate("document.readyState") == "complete":
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{url} did not finish loading in {self.timeout} s")

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of ``expression`` in the page (awaits a promise)."""
        result = await self.send("Runtime.evaluate", expression=expression,
                                 returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return (result.get("result") or {}).get("value")

    async def wait_for(self, expression: str, timeout: float) -> Any:
        """Poll ``expression`` until it is truthy (TimeoutError after ``timeout`` s)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if loop.time() > deadline:
                raise TimeoutError(f"{expression!r} stayed false for {timeout} s")
            await asyncio.sleep(0.1)

    async def screenshot(self, path: Path, width: int = 1400, height: int = 1000) -> None:
        """A PNG of the page at ``width`` x its full height (at most ``height`` x 4)."""
        await self.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                        deviceScaleFactor=1, mobile=False)
        full = await self.evaluate("document.body.scrollHeight + 16") or height
        await self.send("Emulation.setDeviceMetricsOverride", width=width,
                        height=min(int(full), height * 4), deviceScaleFactor=1, mobile=False)
        shot = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader
        await self.ws.close()


class Chromium:
    """A headless Chromium on loopback (``async with Chromium() as browser``)."""

    def __init__(self, binary: str | None = None, *, timeout: float = COMMAND_TIMEOUT) -> None:
        found = binary or find_chromium()
        if found is None:
            raise FileNotFoundError("chromium is not installed (apt-get install -y chromium)")
        self.binary = found
        self.timeout = timeout
        self.process: asyncio.subprocess.Process | None = None
        self.endpoint = ""
        self._profile = tempfile.TemporaryDirectory(prefix="equilibrium-chromium-")
        self._session: aiohttp.ClientSession | None = None
        self.pages: list[Page] = []

    async def __aenter__(self) -> Chromium:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            self.binary, *LOOPBACK_ONLY, f"--user-data-dir={self._profile.name}",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
            "about:blank",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, start_new_session=True,
        )
        assert self.process.stderr is not None
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while True:
                    line = await self.process.stderr.readline()
                    if not line:
                        raise RuntimeError("chromium exited before its DevTools endpoint opened")
                    match = _LISTENING.search(line)
                    if match:
                        self.endpoint = match.group(1).decode()
                        break
        except BaseException:
            await self.close()
            raise
        # Keep reading stderr so the browser never blocks on a full pipe.
        self._drainer = asyncio.create_task(self._drain(), name="chromium-stderr")
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))

    async def _drain(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        with contextlib.suppress(Exception):
            while await self.process.stderr.read(65536):
                pass

    async def new_page(self) -> Page:
        """A fresh tab (about:blank), connected."""
        assert self._session is not None
        http = "http://" + self.endpoint.split("/")[2]
        async with self._session.put(f"{http}/json/new?about:blank") as resp:
            target = await resp.json()
        ws = await self._session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0,
                                            timeout=aiohttp.ClientWSTimeout(ws_close=5.0))
        page = Page(ws, self.timeout)
        self.pages.append(page)
        return page

    async def close(self) -> None:
        for page in self.pages:
            with contextlib.suppress(Exception):
                await page.close()
        self.pages.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(process.wait(), 10.0)
        self._profile.cleanup()
