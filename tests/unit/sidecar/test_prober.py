"""sidecar.prober: which endpoints get a probe (and so this sidecar's identity)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from mesh.probes import ProbeRates
from mesh.profiles import get_profile
from sidecar.membership import MeshMembership
from sidecar.metrics import ProberMetrics
from sidecar.prober import Prober, _authority
from sidecar.upstreams import UpstreamTable

KEY = b"prober-test-key-0123456789abcdef"


def test_only_endpoints_in_the_mesh_are_probed() -> None:
    table = UpstreamTable("equilibrium", get_profile("balanced"))
    table.apply({"static": ["http://127.0.0.1:1"], "payments": ["http://127.0.0.1:2"]}, 0.0)
    table.apply({"users.default.80": ["http://10.0.0.1:80"]}, 0.0, source="discovery")
    membership = MeshMembership(lambda name: name == "payments")  # declared mesh: false
    prober = Prober(table, caller_id="caller-1", mesh_key=KEY,
                    metrics=ProberMetrics(CollectorRegistry()), membership=membership)
    assert prober._in_mesh("http://127.0.0.1:1", ["static"])
    assert not prober._in_mesh("http://127.0.0.1:2", ["payments"])
    assert not prober._in_mesh("http://10.0.0.1:80", ["users.default.80"])  # not proven yet
    membership.prove("http://10.0.0.1:80")  # it answered a request with signed signals
    assert prober._in_mesh("http://10.0.0.1:80", ["users.default.80"])


def test_a_probe_is_sent_with_the_host_its_identity_is_bound_to() -> None:
    assert _authority("http://127.0.0.1:8080") == "127.0.0.1:8080"
    assert _authority("http://[::1]:9000/") == "[::1]:9000"
    assert _authority("http://pod-1") == "pod-1"


async def _probe_for(seconds: float, status: int, text: str
                    ) -> tuple[list[float], CollectorRegistry]:
    """A prober at 8 probes a second against one endpoint that answers every path with
    ``status`` and ``text``, for ``seconds``: when each probe came, and the metrics."""
    asked: list[float] = []

    async def answer(request: web.Request) -> web.Response:
        asked.append(time.monotonic())
        return web.Response(status=status, text=text)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    table = UpstreamTable("equilibrium", get_profile("balanced"))
    table.apply({"static": [f"http://127.0.0.1:{port}"]}, 0.0)
    registry = CollectorRegistry()
    prober = Prober(table, caller_id="caller-1", mesh_key=KEY, metrics=ProberMetrics(registry),
                    rates=ProbeRates(idle=8.0, busy=8.0), rng=random.Random(5))
    task = asyncio.create_task(prober.run())
    try:
        await asyncio.sleep(seconds)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await runner.cleanup()
    return asked, registry


async def test_a_catch_all_app_outside_the_mesh_is_probed_less_and_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    # The stranger's finding: a plain app that answers 200 to any path, configured as a
    # static upstream with a mesh key set, was probed four times a second for ever and every
    # answer logged a line. Its answers are not probe answers: it is now asked ever more
    # rarely (up to every 30 s) and logged once a minute; a real inbound sidecar's answers
    # keep an endpoint at the usual rate (mesh.probes' tests).
    caplog.set_level(logging.INFO, logger="sidecar.prober")
    # 24 probes at 8 a second; backed off: 1/8, 2/8, 4/8 s...
    # Its answer is an echo of the request (the probe's signed identity in it): counted
    # not-meshed, which it is, not as a probe answer of another version.
    asked, registry = await _probe_for(3.0, 200, '{"headers": {"X-GT-Identity": '
                                                 '"v=2;id=caller-1;sig=abc"}}')
    assert 2 <= len(asked) <= 8, asked
    told = [r for r in caplog.records if "not a sidecar" in r.getMessage()]
    assert len(told) == 1
    assert registry.get_sample_value("equilibrium_probes_total",
                                     {"upstream": "static", "result": "not-meshed"}) == len(asked)


async def test_a_probe_answer_of_another_version_is_told_apart_from_no_sidecar() -> None:
    asked, registry = await _probe_for(1.0, 200, "v=9;nonce=x;sig=" + "A" * 43)
    assert asked
    assert registry.get_sample_value("equilibrium_probes_total",
                                     {"upstream": "static", "result": "version"}) == len(asked)


async def test_a_sidecar_over_its_probe_budget_is_not_backed_off_from() -> None:
    # The review's finding: a real inbound sidecar answers 429 above its probe budget; a
    # caller that backed off from it for up to 30 s would lose its fresh answers while the
    # others kept the budget. "Not now" keeps the usual rate.
    asked, registry = await _probe_for(2.0, 429, "too many probes")  # 16 at 8 a second
    assert len(asked) >= 10, asked
    busy = registry.get_sample_value("equilibrium_probes_total",
                                     {"upstream": "static", "result": "busy"})
    assert busy is not None and busy >= 10  # told apart from a server without a sidecar
