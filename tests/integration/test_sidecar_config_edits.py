"""Bad edits of a real sidecar's config file (issue 14, finding 9): non-UTF-8 bytes, a
5,000-digit number, YAML nested thousands deep, broken YAML. While running, each edit is
rejected, logged and counted and the file watcher lives on, so the next valid edit applies;
at start-up, each is a message and exit 2, never a traceback."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.integration.procs import async_start_sidecar, async_stop, run_equilibrium
from tests.support import eventually

BAD_EDITS: list[tuple[str, bytes]] = [
    ("not UTF-8", b"upstreams:\n  svc: ['http://127.0.0.1:1']\n  \xff\xfe: []\n"),
    ("a number too long", b"drain_timeout: " + b"9" * 5000 + b"\n"),
    ("nested too deeply", b"upstreams: " + b"[" * 5000 + b"]" * 5000 + b"\n"),
    ("not valid YAML", b"upstreams: {svc: [\n"),
]


def endpoints(state: dict, upstream: str) -> list[str]:  # type: ignore[type-arg]
    return [e["endpoint"] for e in state["upstreams"].get(upstream, {"endpoints": []})
            ["endpoints"]]


async def test_bad_edits_are_counted_and_the_next_good_edit_applies(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text("upstreams:\n  svc: ['http://127.0.0.1:9001']\n")
    sidecar = await async_start_sidecar(config_file=config)
    try:
        for count, (_, content) in enumerate(BAD_EDITS, start=1):
            staged = tmp_path / "next.yaml"
            staged.write_bytes(content)
            staged.replace(config)  # the mtime watcher notices
            await eventually(
                lambda n=count: sidecar.metric("equilibrium_config_reloads_total",
                                               result="rejected") >= n,
                f"bad edit {count} is rejected", timeout=20)
        assert endpoints(sidecar.state(), "svc") == ["http://127.0.0.1:9001"]
        staged = tmp_path / "next.yaml"
        staged.write_text("upstreams:\n  svc: ['http://127.0.0.1:9002']\n  more: []\n")
        staged.replace(config)
        await eventually(lambda: endpoints(sidecar.state(), "svc") == ["http://127.0.0.1:9002"],
                         "the watcher is alive: a good edit after bad ones applies", timeout=20)
        assert sidecar.metric("equilibrium_config_reloads_total", result="failed") == 0
        output = sidecar.output()
        assert output.count("config reload rejected") == len(BAD_EDITS)
        assert "Traceback" not in output
    finally:
        assert await async_stop(sidecar) == 0


async def test_a_bad_file_at_start_up_is_a_message_and_exit_2(tmp_path: Path) -> None:
    paths = []
    for i, (_, content) in enumerate(BAD_EDITS):
        path = tmp_path / f"bad-{i}.yaml"
        path.write_bytes(content)
        paths.append(path)
    results = await asyncio.gather(*(asyncio.to_thread(
        run_equilibrium, "sidecar", "--config", str(path)) for path in paths))
    for (what, _), result in zip(BAD_EDITS, results, strict=True):
        assert result.returncode == 2, (what, result.stderr)
        assert "bad configuration" in result.stderr, what
        assert "Traceback" not in result.stderr, what
