"""The probe-cost benchmark's pure parts: which profile samples are probing work."""

from __future__ import annotations

from pathlib import Path

from equilibrium.lab.bench.probe_cost import SCENARIO, parse_profile, probe_sample
from equilibrium.lab.bench.scenarios import Scenario

LOOP = "run (uvloop/__init__.py:92);Runner.run (asyncio/runners.py:118)"


def test_probe_samples_are_the_probers_frames_and_its_aiohttp_session() -> None:
    assert probe_sample(f"{LOOP};Prober._probe (sidecar/prober.py:146);token_bytes (secrets.py:46)")
    assert probe_sample(f"{LOOP};parse_answer (wire/probe.py:80)")
    # aiohttp's client reading an answer from the event loop: the prober's session
    assert probe_sample(f"{LOOP};ResponseHandler.data_received (aiohttp/client_proto.py:359)")
    # the request path, even where it goes through aiohttp (a WebSocket upgrade), is not
    assert not probe_sample(f"{LOOP};UpstreamClient.open_websocket (sidecar/http1/client.py:196)"
                            ";ClientSession._request (aiohttp/client.py:700)")
    assert not probe_sample(f"{LOOP};OutboundProxy.handle (sidecar/outbound.py:300)")


def test_a_raw_profile_is_counted_by_samples(tmp_path: Path) -> None:
    raw = tmp_path / "py-spy.txt"
    raw.write_text(
        f"{LOOP};Prober._probe (sidecar/prober.py:150) 3\n"
        f"{LOOP};OutboundProxy.handle (sidecar/outbound.py:300) 95\n"
        f"{LOOP};ResponseHandler.data_received (aiohttp/client_proto.py:359) 2\n"
        "garbage line\n")
    assert parse_profile(raw) == (100, 5)
    assert parse_profile(tmp_path / "missing.txt") == (0, 0)


def test_scenario_interface_and_defaults() -> None:
    assert isinstance(SCENARIO, Scenario) and SCENARIO.name == "probe-cost"
    assert SCENARIO.default_clients * SCENARIO.default_rate == 500
