"""sidecar.identity_phase: the caller phases the outbound listener runs (identity, bid,
self-enforced back-off). Clocks are plain numbers moved by hand."""

from __future__ import annotations

import json
import math

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry
from yarl import URL

from mesh.profiles import get_profile
from mesh.reputation import Phase
from sidecar.exchange import Answer
from sidecar.identity_phase import CallerPhases
from sidecar.membership import MeshMembership
from sidecar.metrics import CallerMetrics
from sidecar.phases import ProxyPhases, RequestContext
from sidecar.upstreams import UpstreamGroup, UpstreamTable
from wire.demand import Demand, verify_demand
from wire.headers import (
    BID,
    CHALLENGE,
    CONGESTION,
    DEMAND,
    IDENTITY,
    PRICE,
    REFUSED,
    REPUTATION,
    RETRY,
    SIGNALS,
)
from wire.identity import BoundRequest, VerifiedIdentity, verify_identity
from wire.signals import AnsweredRequest, SignedSignals, sign_signals
from wire.standing import format_standing

KEY = b"unit-test-mesh-key-0123456789"


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


EXTERNAL = "payments"  # a static upstream declared ``mesh: false``


def make_phases(key: bytes | None = KEY, caller: str = "orders",
                inner: ProxyPhases | None = None) -> tuple[CallerPhases, Clock]:
    clock = Clock()
    phases = CallerPhases(inner, caller_id=caller, mesh_key=key, default_bid=1.0,
                          metrics=CallerMetrics(CollectorRegistry()), clock=clock,
                          wall_clock=lambda: 1_764_000_000.0 + clock.t,
                          membership=MeshMembership(lambda name: name == EXTERNAL))
    return phases, clock


TABLE = UpstreamTable("round-robin", get_profile("balanced"))
TABLE.apply({"users": ("http://10.0.0.1:80",), "orders": ("http://10.0.0.2:80",),
             EXTERNAL: ("http://10.0.0.3:80",)}, 0.0)
TABLE.apply({"found": ("http://10.0.0.4:80",)}, 0.0, source="discovery")


def ctx_for(upstream: str = "users") -> RequestContext:
    group = TABLE.get(upstream)
    assert group is not None
    return RequestContext(started=0.0, method="GET", target="/", authority=upstream,
                          upstream=upstream, group=group, endpoint=group.endpoints[0])


def now_wall(clock: Clock) -> float:
    return 1_764_000_000.0 + clock.t


async def test_identity_and_bid_are_stamped_and_the_app_header_never_leaves() -> None:
    phases, clock = make_phases()
    ctx = ctx_for()
    request = make_mocked_request("GET", "/", headers={"X-Equilibrium-Bid": "2.5"})
    assert await phases.request_filter(request, ctx) is None
    headers = CIMultiDict({"X-Equilibrium-Bid": "2.5", "Accept": "*/*"})
    phases.upstream_request_filter(ctx, headers)
    assert "X-Equilibrium-Bid" not in headers and headers["Accept"] == "*/*"
    assert headers[BID] == "2.5"
    verified = verify_identity(headers[IDENTITY], KEY, now_wall(clock), 30.0,
                               BoundRequest("GET", "users", "/"))
    assert isinstance(verified, VerifiedIdentity) and verified.caller == "orders"
    assert verified.nonce == headers[CHALLENGE] == ctx.extra["challenge"]
    # bound to its request: another method or target does not verify
    for other in (BoundRequest("DELETE", "users", "/"), BoundRequest("GET", "users", "/admin"),
                  BoundRequest("GET", "orders", "/")):
        assert not verify_identity(headers[IDENTITY], KEY, now_wall(clock), 30.0, other).trusted
    # every attempt is signed anew, with a fresh nonce
    again: CIMultiDict[str] = CIMultiDict()
    phases.upstream_request_filter(ctx, again)
    assert again[CHALLENGE] != headers[CHALLENGE] and again[IDENTITY] != headers[IDENTITY]


@pytest.mark.parametrize("upstream", [EXTERNAL, "found"])
async def test_an_endpoint_outside_the_mesh_gets_no_identity_bid_or_retry_mark(upstream: str
                                                                           ) -> None:
    phases, _ = make_phases()
    ctx = ctx_for(upstream)
    assert await phases.request_filter(make_mocked_request("GET", "/"), ctx) is None
    headers: CIMultiDict[str] = CIMultiDict({RETRY: "1"})
    phases.upstream_request_filter(ctx, headers)
    assert set(headers) == {CHALLENGE}  # only the challenge a member would answer
    if upstream == "found":  # a discovered endpoint proves itself with a signed answer
        game = signed_answer(ctx, "anonymous", congestion="v=1;level=0.5")
        assert phases.response_signals(ctx, game) == {CONGESTION.lower(): "v=1;level=0.5"}
        assert ctx.endpoint in phases.membership
        headers = CIMultiDict()
        phases.upstream_request_filter(ctx, headers)
        assert IDENTITY in headers and BID in headers


def signed_answer(ctx: RequestContext, caller: str, *, congestion: str | None = None,
                  reputation: str | None = None, price: str | None = None,
                  refused: str | None = None, key: bytes = KEY,
                  at: str | None = None) -> dict[str, str]:
    """An answer's game headers signed by a sidecar reached ``at`` (default: where the
    attempt in ``ctx`` went, its endpoint's host, as the outbound listener notes it)."""
    signals = SignedSignals(congestion, reputation, price, refused)
    game = {name.lower(): value for name, value in
            ((CONGESTION, congestion), (REPUTATION, reputation), (PRICE, price),
             (REFUSED, refused)) if value}
    challenge = ctx.extra["challenge"]
    assert isinstance(challenge, str)
    assert ctx.endpoint is not None
    ctx.extra["peer"] = URL(ctx.endpoint).host or ""
    signed = sign_signals(key, AnsweredRequest(challenge, ctx.method, ctx.target,
                                               ctx.extra["peer"] if at is None else at),
                          caller, signals)
    assert signed is not None
    game[SIGNALS.lower()] = signed
    return game


def sent(phases: CallerPhases, ctx: RequestContext) -> None:
    phases.upstream_request_filter(ctx, CIMultiDict())


def test_only_signals_signed_for_this_request_and_this_caller_are_believed() -> None:
    phases, _ = make_phases()
    punished = format_standing(0.1, 1, Phase.PUNISHED, 300.0)
    ctx = ctx_for()
    sent(phases, ctx)
    good = signed_answer(ctx, "orders", congestion="v=1;level=1", reputation=punished,
                         price="2")
    assert phases.response_signals(ctx, dict(good)) == {
        k: v for k, v in good.items() if k != SIGNALS.lower()}
    bad = phases.metrics.bad_signals
    # unsigned (a server outside the mesh): nothing believed
    assert phases.response_signals(ctx, {REPUTATION.lower(): punished}) == {}
    assert bad.labels("x-gt-signals", "unsigned")._value.get() == 1
    # a value changed after signing, another key, an answer to an earlier attempt
    forged = dict(good, **{REPUTATION.lower(): format_standing(0.1, 5, Phase.PUNISHED, 300.0)})
    assert phases.response_signals(ctx, forged) == {}
    other_key = signed_answer(ctx, "orders", reputation=punished,
                              key=b"another-mesh-key-0123456789")
    assert phases.response_signals(ctx, other_key) == {}
    sent(phases, ctx)  # a new attempt: a new challenge
    assert phases.response_signals(ctx, dict(good)) == {}
    assert bad.labels("x-gt-signals", "bad-signature")._value.get() == 3
    # signed about someone else (a relayed answer): only the congestion is kept
    about_other = signed_answer(ctx, "anonymous", congestion="v=1;level=1",
                                reputation=punished)
    assert phases.response_signals(ctx, about_other) == {CONGESTION.lower(): "v=1;level=1"}
    assert bad.labels("x-gt-signals", "wrong-caller")._value.get() == 1
    assert phases.backing_off("users", 1000.0) == 0.0


@pytest.mark.parametrize("at", ["10.0.0.9", ""])
def test_a_refusal_or_proof_signed_elsewhere_is_not_acted_on(at: str) -> None:
    """A stranger's finding: a server outside the mesh passed a caller's challenge on to a
    meshed pod and relayed its signed refusal back; the caller sent the POST again to
    another endpoint (it ran twice), and the relay passed for a member of the mesh. A
    signed answer says where its sidecar was reached (``at``); signed elsewhere ("10.0.0.9",
    not the endpoint's 10.0.0.4), or by an older sidecar that does not say (""), its
    refusal is dropped and it proves nothing. Its congestion is still read."""
    phases, _ = make_phases()
    ctx = ctx_for("found")
    sent(phases, ctx)
    game = signed_answer(ctx, "anonymous", congestion="v=1;level=0.5",
                         refused="app-unreachable", at=at)
    assert phases.response_signals(ctx, game) == {CONGESTION.lower(): "v=1;level=0.5"}
    assert ctx.endpoint not in phases.membership
    assert phases.metrics.bad_signals.labels("x-gt-signals", "elsewhere")._value.get() == 1
    # signed where the attempt went: believed, and a proof
    sent(phases, ctx)
    game = signed_answer(ctx, "anonymous", refused="app-unreachable")
    assert phases.response_signals(ctx, game) == {REFUSED.lower(): "app-unreachable"}
    assert ctx.endpoint in phases.membership


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
        assert IDENTITY not in headers and BID not in headers and DEMAND not in headers
    # and without a key no answer's signal is believed (none could be checked)
    phases, _ = make_phases(None)
    ctx = ctx_for()
    sent(phases, ctx)
    assert phases.response_signals(ctx, {CONGESTION.lower(): "v=1;level=1"}) == {}


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


async def test_after_the_back_off_the_caller_is_paced_back_up() -> None:
    """mesh.probation in the phase: 20 answers/s delivered for 20 s, then punished at level 1
    for 10 s. From its end the allowed rate starts at 0.5 x ~19.6/s and doubles every 2 s;
    refusals are 429 punished-probation, counted; 4 s later nothing is paced."""
    phases, clock = make_phases()
    for _ in range(400):  # delivered: answers in good standing
        ctx = ctx_for()
        ctx.status = 200
        ctx.game_response_headers = {REPUTATION.lower(): format_standing(1.0, 0, Phase.GOOD,
                                                                         None)}
        phases.response_filter(ctx, CIMultiDict())
        clock.t += 0.05
    ctx = ctx_for()
    ctx.status = 429
    ctx.game_response_headers = {REPUTATION.lower(): format_standing(0.3, 1, Phase.PUNISHED,
                                                                     10.0)}
    phases.response_filter(ctx, CIMultiDict())
    assert phases.backing_off("users", clock.t) == 10.0
    clock.t += 10.0
    sent = refused = 0
    for _ in range(100):  # the app floods at 1,000/s for 0.1 s right after the back-off
        answer = await phases.request_filter(make_mocked_request("GET", "/"), ctx_for())
        if answer is None:
            sent += 1
        else:
            refused += 1
            assert isinstance(answer, Answer) and answer.status == 429
            assert json.loads(answer.body)["reason"] == "punished-probation"
        clock.t += 0.001
    assert 9 <= sent <= 12  # the bucket's ~9.8 tokens, refilled at ~10/s for 0.1 s
    assert phases.metrics.probation.labels("users")._value.get() == refused
    assert phases.metrics.backoff.labels("users")._value.get() == 0
    clock.t += 4.0  # two doublings: ~39/s = twice the rate delivered before
    assert all([await phases.request_filter(make_mocked_request("GET", "/"), ctx_for()) is None
                for _ in range(100)])


def test_a_retry_after_a_failed_connect_is_not_marked() -> None:
    from sidecar.phases import UNSENT

    ctx = ctx_for()
    ctx.attempt = 1
    ctx.extra[UNSENT] = 1  # the first attempt never connected
    headers: CIMultiDict[str] = CIMultiDict()
    ProxyPhases().upstream_request_filter(ctx, headers)
    assert RETRY not in headers
    ctx.attempt = 2  # the second attempt connected and failed: the third is a re-send
    ProxyPhases().upstream_request_filter(ctx, headers)
    assert headers[RETRY] == "1"


def test_a_punishment_is_logged_when_it_starts_and_when_its_level_changes(
        caplog: pytest.LogCaptureFixture) -> None:
    """Every answer during a punishment repeats (and extends) it: one log line per punishment
    and per level, naming the endpoint that said so, not one per answer."""
    phases, clock = make_phases()
    caplog.set_level("INFO", logger="sidecar.identity_phase")

    def answer(level: int) -> None:
        ctx = ctx_for()
        ctx.game_response_headers = {
            REPUTATION.lower(): format_standing(0.2, level, Phase.PUNISHED, 10.0)}
        phases.response_filter(ctx, CIMultiDict())
        clock.t += 0.01

    for _ in range(50):
        answer(1)
    answer(2)
    answer(2)
    lines = [r.getMessage() for r in caplog.records if "punishes" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "(level 1, said by http://" in lines[0] and "(level 2, said by" in lines[1]
    clock.t += 20.0  # over; a new punishment is logged again
    answer(1)
    assert sum("punishes" in r.getMessage() for r in caplog.records) == 3


def spread_group() -> UpstreamGroup:
    """A static upstream ``spread`` of three endpoints (round robin, never ticked)."""
    table = UpstreamTable("round-robin", get_profile("balanced"))
    table.apply({"spread": tuple(f"http://10.0.1.{i}:80" for i in range(3))}, 0.0)
    group = table.get("spread")
    assert group is not None
    return group


def declared(phases: CallerPhases, group: UpstreamGroup, alias: str = "spread",
             endpoint: int = 0) -> Demand:
    """The ``X-GT-Demand`` one attempt to ``group`` (named ``alias`` by the app) carries."""
    ctx = RequestContext(started=0.0, method="GET", target="/", authority=alias,
                         upstream=alias, group=group, endpoint=group.endpoints[endpoint])
    headers: CIMultiDict[str] = CIMultiDict()
    phases.upstream_request_filter(ctx, headers)
    demand = verify_demand(headers[DEMAND], KEY, headers[CHALLENGE])
    assert isinstance(demand, Demand)
    return demand


def test_each_attempt_declares_the_callers_rate_to_the_whole_service() -> None:
    """``X-GT-Demand``: the decayed rate of attempts to the upstream (all its endpoints, time
    constant 1 s) and its endpoint count, bound to the attempt's identity nonce."""
    group = spread_group()
    phases, clock = make_phases()
    rates = []
    for k in range(20):  # 10 attempts/s over 2 s, spread over the three endpoints
        clock.t = 1000.0 + k / 10
        demand = declared(phases, group, endpoint=k % 3)
        assert demand.endpoints == 3
        rates.append(demand.rate)
    # a decayed count of a 10/s flow: sum_k exp(-k / 10) over the last 20 attempts
    expected = sum(math.exp(-k / 10) for k in range(20))
    assert rates[-1] == pytest.approx(expected, abs=0.001)
    assert rates == sorted(rates)  # it builds up from the first attempt
    assert rates[0] == 1.0


def test_every_host_alias_of_a_service_counts_toward_one_demand_over_its_usable_endpoints(
) -> None:
    """An app cannot split its declared demand by rotating the names of one service (the
    count is per group), and endpoints its policy may not send to do not dilute it."""
    from dataclasses import replace

    group = spread_group()
    phases, clock = make_phases()
    demands = []
    for k, alias in enumerate(["spread", "spread.ns", "10.96.0.7", "spread.ns.svc"] * 5):
        clock.t = 1000.0 + k / 10
        demands.append(declared(phases, group, alias))
    assert demands[-1].rate == pytest.approx(sum(math.exp(-k / 10) for k in range(20)),
                                             abs=0.001)
    assert {d.endpoints for d in demands} == {3}  # no tick yet: every endpoint counts
    group.tick(1003.0)
    assert group.snapshot is not None
    group.snapshot = replace(group.snapshot, usable=1)  # two ejected, as a policy reports it
    assert declared(phases, group).endpoints == 1
