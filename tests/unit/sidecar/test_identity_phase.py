"""The caller phases (identity, bid, self-enforced back-off) and the inbound side's small parts:
bounded caller labels and the token-bucket baseline. Clocks are plain numbers moved by hand."""

from __future__ import annotations

import json

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

from mesh.reputation import ANONYMOUS, Phase
from sidecar.identity_phase import CallerPhases
from sidecar.inbound import OTHER, CallerLabels, InboundProxy, LocalRateLimit
from sidecar.phases import ProxyPhases, RequestContext
from sidecar.policing_config import parse_policing
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
                          registry=CollectorRegistry(), clock=clock,
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
    assert isinstance(answer, web.Response) and answer.status == 400
    assert answer.text is not None
    body = json.loads(answer.text)
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
    assert isinstance(answer, web.Response) and answer.status == 429
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


def test_caller_labels_are_bounded() -> None:
    labels = CallerLabels(2)
    assert [labels.of(c) for c in ("a", "b", "c", "a", ANONYMOUS, "d")] == [
        "a", "b", OTHER, "a", ANONYMOUS, OTHER]
    assert "a" in labels and "c" not in labels and ANONYMOUS in labels
    with pytest.raises(ValueError):
        CallerLabels(0)


def test_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    bucket = LocalRateLimit(rate=10.0, burst=3.0, now=0.0)
    assert [bucket.try_take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.try_take(0.1) and not bucket.try_take(0.1)
    assert sum(bucket.try_take(100.0) for _ in range(10)) == 3  # never above the burst
    with pytest.raises(ValueError):
        LocalRateLimit(rate=0.0, burst=1.0, now=0.0)


def test_caller_gauges_follow_the_book_and_stay_bounded() -> None:
    settings = parse_policing({
        "max_caller_labels": 1,
        "ladder": {"base_punishment": 1, "max_punishment": 1, "max_level": 1, "probation": 1},
        "reputation": {"idle_ttl": 2},
    })
    registry = CollectorRegistry()
    proxy = InboundProxy(sidecar_id="t", app_url="http://127.0.0.1:9", settings=settings,
                         registry=registry, mesh_key=None)

    def level(caller: str) -> float | None:
        return registry.get_sample_value("equilibrium_inbound_caller_punishment_level",
                                          {"caller": caller})

    for caller in ("a", "b"):
        assert proxy.labels.of(caller) == ("a" if caller == "a" else OTHER)
        proxy.book.admit(caller, 0.0)
    proxy.update_gauges(0.0)
    assert level("a") == 0 and level(OTHER) == 0 and level("b") is None
    proxy.book.admit("c", 10.0)  # a and b idle for longer than idle_ttl: forgotten
    proxy.update_gauges(10.0)
    assert level("a") is None and level(OTHER) == 0  # c is untracked: shown as "other"
