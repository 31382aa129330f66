"""The mesh dashboard in a real headless Chromium, on a real ``equilibrium demo`` run.

One demo per module (its fleet, real sidecars, the embedded redis-server and a real signaler
process, a bounded load); the page is opened from the ``dashboard:`` line the demo prints. Each
test drives Debian's chromium over the DevTools protocol (:mod:`equilibrium.lab.headless`),
which records console errors, uncaught exceptions and every URL the page requested. The last
test stops the demo's signaler and starts it again on the same admin port, with the same
command line and environment, as a supervisor would.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from equilibrium.lab.headless import Chromium, Page
from tests.support import child_env, interruptible_children, keep_reading

pytestmark = [pytest.mark.slow, pytest.mark.needs("chromium")]

DEMO_SECONDS = 150
LOOPBACK = {"127.0.0.1", "localhost", "[::1]", "::1"}


@dataclass
class Demo:
    proc: subprocess.Popen[str]
    url: str
    out: list[str]

    def children(self) -> list[tuple[int, list[str]]]:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                found.append((int(entry.name), [a.decode(errors="replace") for a in argv if a]))
        return found

    def child(self, command: str) -> tuple[int, list[str]]:
        for pid, argv in self.children():
            if argv[2:4] == ["equilibrium", command]:
                return pid, argv
        raise AssertionError(f"no {command} child of the demo")

    def sidecar_admin(self) -> str:
        _, argv = self.child("sidecar")
        return "http://" + argv[argv.index("--admin") + 1]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:  # loopback only
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    out = tmp_path_factory.mktemp("demo")
    with interruptible_children():  # it is stopped with SIGINT
        proc = subprocess.Popen(
            [sys.executable, "-m", "equilibrium", "demo", "--duration", str(DEMO_SECONDS),
             "--clients", "2", "--pods", "3", "--rate", "30", "--no-live", "--out", str(out)],
            cwd=out, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
    lines: list[str] = []
    errors: list[str] = []
    keep_reading(proc.stderr, errors)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        url = None
        while time.monotonic() < deadline and url is None:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            match = re.match(r"dashboard: (http://127\.0\.0\.1:\d+/dashboard)\b", line)
            url = match.group(1) if match else None
        assert url, f"the demo printed no dashboard line: {lines} {''.join(errors[-50:])}"
        keep_reading(proc.stdout, lines)
        base = url.rsplit("/", 1)[0]
        for _ in range(600):  # the first plan: summaries reach the signaler, it solves
            state = get_json(base + "/debug/state")
            if (state.get("upstreams") or {}).get("demo", {}).get("plan"):
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"the signaler made no plan: {state}")
        yield Demo(proc, url, lines)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


async def open_page(browser: Chromium, url: str) -> Page:
    page = await browser.new_page()
    await page.open(url)
    await page.wait_for("window.eqDashboard && window.eqDashboard.renders > 0", 15)
    return page


ROWS = """JSON.stringify([...document.querySelectorAll('section.upstream tr[data-endpoint]')]
  .map(tr => Object.fromEntries([['endpoint', tr.dataset.endpoint],
    ...[...tr.querySelectorAll('td[data-field]')].map(td => [td.dataset.field,
      td.dataset.value === undefined ? td.textContent : Number(td.dataset.value)])])))"""
SOLVER = "document.querySelector('[data-field=solver]').textContent"


async def test_the_page_loads_without_errors_and_asks_only_its_own_listener(demo: Demo) -> None:
    async with Chromium() as browser:
        page = await open_page(browser, demo.url)
        await page.wait_for("window.eqDashboard.renders > 2", 10)
        status = await page.evaluate("document.getElementById('status').dataset.state")
        record = page.record
    assert status == "live"
    assert record.errors == []
    origin = urlsplit(demo.url).netloc
    assert record.requests, "the DevTools client saw no request"
    for url in record.requests:
        parts = urlsplit(url)
        assert parts.scheme in ("http", "data"), url
        if parts.scheme == "http":
            assert parts.hostname in LOOPBACK and parts.netloc == origin, url
    paths = {urlsplit(u).path for u in record.requests if u.startswith("http")}
    assert {"/dashboard", "/dashboard/dashboard.js", "/dashboard/dashboard.css",
            "/dashboard/events"} <= paths


async def test_the_signaler_page_shows_the_plan_of_its_debug_state(demo: Demo) -> None:
    base = demo.url.rsplit("/", 1)[0]
    async with Chromium() as browser:
        page = await open_page(browser, demo.url)
        matched = None
        for _ in range(10):  # the plan moves every epoch: catch page and state on one plan
            before = get_json(base + "/debug/state")["upstreams"]["demo"]["plan"]
            rows = json.loads(await page.evaluate(ROWS))
            solver = await page.evaluate(SOLVER)
            after = get_json(base + "/debug/state")["upstreams"]["demo"]["plan"]
            shown = {r["endpoint"]: r["tokens"] for r in rows}
            for plan in (before, after):
                if shown == dict(zip(plan["endpoints"], plan["configuration"], strict=True)):
                    matched = plan
            if matched:
                break
            await asyncio.sleep(0.3)
        assert matched is not None, (rows, before, after)
        assert solver.startswith(matched["method"])
        assert sum(r["tokens"] for r in rows) == matched["tokens"]
        assert all(0 <= r["share"] <= 1 for r in rows)  # data-value: the fraction
        assert abs(sum(r["share"] for r in rows) - 1.0) < 1e-6
        optimality = await page.evaluate(
            "Number(document.querySelector('[data-field=optimality]').dataset.value)")
        assert optimality >= 0.999  # nothing beats the system optimum
        assert await page.evaluate(
            "document.querySelectorAll('tr[data-sidecar]').length") == 2
        assert page.record.errors == []


async def test_a_sidecar_page_follows_its_debug_state_within_a_second(demo: Demo) -> None:
    admin = demo.sidecar_admin()
    async with Chromium() as browser:
        page = await open_page(browser, admin + "/dashboard")
        state = get_json(admin + "/debug/state")["upstreams"]["demo"]
        await asyncio.sleep(1.2)  # a frame a second: the page has caught up with `state`
        rows = {r["endpoint"]: r for r in json.loads(await page.evaluate(ROWS))}
        later = get_json(admin + "/debug/state")["upstreams"]["demo"]
        assert set(rows) == {e["endpoint"] for e in state["endpoints"]}
        for before, now in zip(state["endpoints"], later["endpoints"], strict=True):
            shown = rows[before["endpoint"]]
            assert before["requests"] <= shown["requests"] <= now["requests"]
            assert before["failures"] <= shown["failures"] <= now["failures"]
        assert await page.evaluate("window.eqDashboard.last.source") == "sidecar"
        assert page.record.errors == []


async def test_two_renders_seconds_apart_differ(demo: Demo) -> None:
    charts = "document.getElementById('upstreams').innerHTML"
    async with Chromium() as browser:
        page = await open_page(browser, demo.url)
        first = await page.evaluate(charts)
        renders = await page.evaluate("window.eqDashboard.renders")
        await asyncio.sleep(3)
        second = await page.evaluate(charts)
        assert await page.evaluate("window.eqDashboard.renders") >= renders + 2
    assert first != second
    assert "<svg" in first and "polygon" in first  # the stacked shares are drawn


async def test_the_stream_reconnects_after_the_signaler_restarts(demo: Demo) -> None:
    pid, argv = demo.child("signaler")
    env = dict(part.partition("=")[::2] for part in
               Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if part)
    async with Chromium() as browser:
        page = await open_page(browser, demo.url)
        boot = await page.evaluate("window.eqDashboard.boot")
        assert await page.evaluate("window.eqDashboard.connects") == 1
        os.kill(pid, signal.SIGTERM)
        await page.wait_for(
            "document.getElementById('status').dataset.state === 'reconnecting'", 20)
        again = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            await page.wait_for("window.eqDashboard.connects >= 2", 60)
            assert await page.evaluate("window.eqDashboard.boot") != boot
            await page.wait_for(
                "document.getElementById('status').dataset.state === 'live' && "
                "window.eqDashboard.last.upstreams.length > 0", 30)
            errors = [e for e in page.record.errors if "dashboard/events" not in e]
            assert errors == []  # only the refused stream while the signaler was away
        finally:
            again.terminate()
            try:
                again.wait(30)
            except subprocess.TimeoutExpired:
                again.kill()
                again.wait(10)


POLICING = {
    "capacity": 20,
    "reputation": {"rate_tau": 0.5, "reputation_tau": 0.5},
    "ladder": {"base_punishment": 30, "max_punishment": 30},  # still punished when we look
}


async def test_an_inbound_sidecar_page_shows_the_punished_caller(tmp_path: Path) -> None:
    """One inbound sidecar without Redis in front of a loopback app; a rogue caller over its
    retry budget is punished; the sidecar's own page lists it as its /debug/state does."""
    import aiohttp

    from equilibrium.lab.bench.policing import UPSTREAM, open_loop
    from tests.integration.inbound_support import MESH_KEY, signed_identity, write_config
    from tests.integration.procs import LOOPBACK, async_start_sidecar, free_port, start_backend
    from wire.headers import IDENTITY, RETRY

    app = await start_backend("app")
    port = free_port()
    server = await async_start_sidecar(
        {}, sidecar_id="app-sidecar", config_file=write_config(tmp_path / "p.json", POLICING),
        env={"EQUILIBRIUM_MESH_SECRET": MESH_KEY},
        extra_args=["--inbound", f"{LOOPBACK}:{port}", "--app", app.url])
    try:
        url = f"http://{LOOPBACK}:{port}"

        def headers() -> dict[str, str]:  # an identity is good for one request
            return {IDENTITY: signed_identity("rogue", url + "/", host=UPSTREAM), RETRY: "1"}

        async with aiohttp.ClientSession() as session:
            sent = await open_loop(session, url, caller="rogue", rate=40, duration=2.0,
                                   headers=headers)
        assert any(s.status == 429 for s in sent)
        async with Chromium() as browser:
            page = await open_page(browser, server.admin_url + "/dashboard")
            await page.wait_for("!!document.querySelector('tr[data-caller=rogue]')", 10)
            phase = await page.evaluate(
                "document.querySelector('tr[data-caller=rogue] [data-field=phase]').textContent")
            level = await page.evaluate(
                "Number(document.querySelector('tr[data-caller=rogue] [data-field=level]')"
                ".dataset.value)")
            state = await asyncio.to_thread(server.state)
            assert page.record.errors == []
        rogue = next(c for c in state["inbound"]["callers"] if c["caller"] == "rogue")
        assert phase == rogue["phase"] == "punished"
        assert level == rogue["level"] >= 1
    finally:
        await asyncio.to_thread(server.stop, 5.0)
        server.cleanup()
        await app.stop()
