"""sidecar.identity_phase: the caller phases the outbound listener runs (identity, bid,
self-enforced back-off). Clocks are plain numbers moved by hand."""

from __future__ import annotations

import json

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

from mesh.reputation import Phase
from sidecar.exchange import Answer
from sidecar.identity_phase import CallerPhases
from sidecar.metrics import CallerMetrics
from sidecar.phases import ProxyPhases, RequestContext
from wire.headers import BID, IDENTITY, PRICE, REPUTATION
from wire.identity import VerifiedIdentity, verify_identity
from wire.standing import format_standing

KEY = b"unit-test-mesh-key-0123456789"


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_phases(key: bytes | None = KEY, caller: str = "orders",
                inner: ProxyPhases | None = None) -> tuple[CallerPhases, Clock]:
    clock = Clock()
    phases = CallerPhases(inner, caller_id=caller, mesh_key=key, default_bid=1.0,
                          metrics=CallerMetrics(CollectorRegistry()), clock=clock,
                          wall_clock=lambda: 1_764_000_000.0 + clock.t)
    return phases, clock


def ctx_for(upstream: str = "users") -> RequestContext:
    return RequestContext(started=0.0, method="GET", target="/", authority=upstream,
                          upstream=upstream)


async def test_identity_and_bid_are_stamped_and_the_app_header_never_leaves() -> None:
    phases, clock = make_phases()
    ctx = ctx_for()
    request = make_mocked_request("GET", "/", headers={"X-Equilibrium-Bid": "2.5"})
    assert await phases.request_filter(request, ctx) is None
    headers = CIMultiDict({"X-Equilibrium-Bid": "2.5", "Accept": "*/*"})
    phases.upstream_request_filter(ctx, headers)
    assert "X-Equilibrium-Bid" not in headers and headers["Accept"] == "*/*"
    assert headers[BID] == "2.5"
    verified = verify_identity(headers[IDENTITY], KEY, 1_764_000_000.0 + clock.t)
    assert isinstance(verified, VerifiedIdentity) and verified.caller == "orders"


async def test_default_bid_and_retry_mark_come_from_the_inner_phases() -> None:
    phases, _ = make_phases()
    ctx = ctx_for()
    assert await phases.request_filter(make_mocked_request("GET", "/"), ctx) is None
    ctx.attempt = 1
    headers: CIMultiDict[str] = CIMultiDict()
    phases.upstream_request_filter(ctx, headers)
    assert headers[BID] == "1" and headers["X-GT-Retry"] == "1"  # inner default phases ran


async def test_without_a_key_nothing_is_signed_or_bid() -> None:
    for key, caller in ((None, "orders"), (KEY, "anonymous"), (KEY, "has space")):
        phases, _ = make_phases(key, caller)
        ctx = ctx_for()
        assert await phases.request_filter(make_mocked_request("GET", "/"), ctx) is None
        headers: CIMultiDict[str] = CIMultiDict()
        phases.upstream_request_filter(ctx, headers)
        assert IDENTITY not in headers and BID not in headers


@pytest.mark.parametrize(("raw", "reason"), [("abc", "malformed"), ("-1", "negative"),
                                             ("nan", "nan"), ("1e9", "too-large")])
async def test_a_malformed_app_bid_is_answered_400_and_counted(raw: str, reason: str) -> None:
    phases, _ = make_phases()
    answer = await phases.request_filter(
        make_mocked_request("GET", "/", headers={"X-Equilibrium-Bid": raw}), ctx_for())
    assert isinstance(answer, Answer) and answer.status == 400
    body = json.loads(answer.body)
    assert body["reason"] == "bad-bid" and body["header"] == "X-Equilibrium-Bid"
    assert "X-Equilibrium-Bid" in body["error"]
    assert phases.metrics.bad_app_bids.labels(reason)._value.get() == 1


async def test_punished_caller_backs_off_locally_until_retry_after() -> None:
    phases, clock = make_phases()
    ctx = ctx_for()
    ctx.game_response_headers = {
        REPUTATION.lower(): format_standing(0.3, 1, Phase.PUNISHED, 9.4), PRICE.lower(): "1.5"}
    app_headers: CIMultiDict[str] = CIMultiDict()
    phases.response_filter(ctx, app_headers)
    assert app_headers["X-Equilibrium-Price"] == "1.5"  # the app learns what it paid
    clock.t += 4.0
    answer = await phases.request_filter(make_mocked_request("GET", "/"), ctx_for())
    assert isinstance(answer, Answer) and answer.status == 429
    assert answer.headers["Retry-After"] == "6"  # 10 s punishment, 4 s gone
    other = await phases.request_filter(make_mocked_request("GET", "/"), ctx_for("orders"))
    assert other is None  # only the upstream that punishes
    clock.t += 6.0
    assert await phases.request_filter(make_mocked_request("GET", "/"), ctx_for()) is None
    assert phases.metrics.backoff.labels("users")._value.get() == 1


def test_good_standing_or_a_bad_header_never_backs_off() -> None:
    phases, _ = make_phases()
    for value in (format_standing(1.0, 0, Phase.GOOD, None),
                  format_standing(0.8, 2, Phase.PROBATION, None), "v=1;score=oops"):
        ctx = ctx_for()
        ctx.game_response_headers = {REPUTATION.lower(): value, PRICE.lower(): "-4"}
        headers: CIMultiDict[str] = CIMultiDict({"X-Equilibrium-Price": "0"})  # forged
        phases.response_filter(ctx, headers)
        assert "X-Equilibrium-Price" not in headers  # a bad price is dropped
        assert phases.backing_off("users", 1000.0) == 0.0


def test_back_off_is_capped() -> None:
    phases, clock = make_phases()
    ctx = ctx_for()
    ctx.game_response_headers = {REPUTATION.lower(): "v=1;score=0;level=5;phase=punished;"
                                                     "retry=86400"}
    phases.response_filter(ctx, CIMultiDict())
    assert phases.backing_off("users", clock.t) == 300.0
