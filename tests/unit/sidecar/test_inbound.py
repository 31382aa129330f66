"""sidecar.inbound's small parts: bounded caller labels, the token-bucket baseline and the
per-caller gauges. Times are plain numbers."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from mesh.reputation import ANONYMOUS
from sidecar.inbound import InboundProxy
from sidecar.inbound_policing import OTHER, CallerLabels, LocalRateLimit
from sidecar.metrics import InboundMetrics
from sidecar.policing_config import parse_policing


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
                         metrics=InboundMetrics(registry), mesh_key=None)

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


def test_refusals_map_to_grpc_statuses() -> None:
    from mesh.admission import RejectReason
    from sidecar.errors import ErrorReason
    from sidecar.h2_inbound import grpc_status_of
    from sidecar.inbound_policing import Refusal

    def status(code: int, reason: str) -> int:
        return grpc_status_of(Refusal(code, reason, "m"))

    assert status(429, RejectReason.PUNISHED) == 8  # RESOURCE_EXHAUSTED
    assert status(503, RejectReason.QUEUE_FULL) == 8
    assert status(503, RejectReason.QUEUE_TIMEOUT) == 8
    assert status(429, ErrorReason.LOCAL_RATE_LIMITED) == 8
    assert status(503, RejectReason.SHUTTING_DOWN) == 14  # UNAVAILABLE
    assert status(400, ErrorReason.BAD_BID) == 3  # INVALID_ARGUMENT
    assert status(502, ErrorReason.CONNECT_ERROR) == 14
    assert status(504, ErrorReason.UPSTREAM_TIMEOUT) == 4  # DEADLINE_EXCEEDED


def test_policing_binds_identities_to_the_request_and_signs_the_answer() -> None:
    """What an HTTP/2 stream goes through (sidecar.h2_inbound: method, ``:authority``,
    ``:path``): trusted once for its own request; the answer's signals signed over the
    caller's challenge, verifiable by the caller's sidecar."""
    import os

    from multidict import CIMultiDict

    from sidecar.inbound_policing import InboundPolicing
    from wire.headers import CHALLENGE, CONGESTION, IDENTITY, PRICE, REPUTATION, SIGNALS
    from wire.identity import BoundRequest, new_nonce, sign_identity
    from wire.signals import AnsweredRequest, SignedSignals, verify_signals

    key = b"inbound-policing-test-key-0123456789"
    policing = InboundPolicing(settings=parse_policing({}), metrics=InboundMetrics(
        CollectorRegistry()), mesh_key=key, clock=lambda: 5.0, wall_clock=lambda: 1.8e9)
    bound = BoundRequest("POST", "orders:8080", "/shop.Orders/Get")
    challenge = new_nonce(os.urandom(12))
    identity = sign_identity("checkout", key, 1.8e9, bound, challenge)
    headers = CIMultiDict({IDENTITY: identity, CHALLENGE: challenge})

    moved = BoundRequest("POST", "payments:8080", "/shop.Orders/Get")  # another :authority
    assert policing.identify(headers, moved) == (ANONYMOUS, False)
    verdict, _ = policing.police(headers, bound, 5.0)
    assert verdict.caller == "checkout"
    again, _ = policing.police(headers, bound, 5.0)  # the same identity a second time
    assert again.caller == ANONYMOUS

    signals = policing.signal_headers(verdict)
    answered = AnsweredRequest(challenge, bound.method, bound.target)
    signed = SignedSignals(signals.get(CONGESTION), signals.get(REPUTATION), signals.get(PRICE))
    checked = verify_signals(signals[SIGNALS], key, answered, signed)
    assert checked.reason is None and checked.caller == "checkout"
    other = AnsweredRequest(new_nonce(os.urandom(12)), bound.method, bound.target)
    assert verify_signals(signals[SIGNALS], key, other, signed).reason is not None


def test_a_declared_demand_is_believed_only_from_the_verified_caller_of_this_request() -> None:
    """``X-GT-Demand`` reaches the book only when signed with this request's identity nonce;
    a demand copied from another request, or sent by an anonymous caller, is ignored and
    counted."""
    import os

    from multidict import CIMultiDict

    from sidecar.inbound_policing import InboundPolicing
    from wire.demand import sign_demand
    from wire.headers import CHALLENGE, DEMAND, IDENTITY
    from wire.identity import BoundRequest, new_nonce, sign_identity

    key = b"inbound-policing-test-key-0123456789"
    registry = CollectorRegistry()
    policing = InboundPolicing(settings=parse_policing({}), metrics=InboundMetrics(registry),
                               mesh_key=key, clock=lambda: 5.0, wall_clock=lambda: 1.8e9)
    bound = BoundRequest("GET", "orders:8080", "/items")

    def request(demand_nonce: str | None = None, signed: bool = True) -> CIMultiDict[str]:
        nonce = new_nonce(os.urandom(12))
        headers = CIMultiDict({CHALLENGE: nonce})
        if signed:
            headers[IDENTITY] = sign_identity("checkout", key, 1.8e9, bound, nonce)
        demand = sign_demand(90.0, 3, key, demand_nonce or nonce)
        assert demand is not None
        headers[DEMAND] = demand
        return headers

    def judged(headers: CIMultiDict[str]) -> float | None:
        verdict, _ = policing.police(headers, bound, 5.0)
        book = policing.gate.book
        standing = book.standing(verdict.caller, 5.0)
        assert standing is not None
        return standing.demand

    def count(result: str) -> float:
        value = registry.get_sample_value("equilibrium_inbound_demands_total",
                                          {"result": result})
        return value or 0.0

    assert judged(request()) == pytest.approx(30.0)
    assert count("trusted") == 1
    assert judged(request(new_nonce(os.urandom(12)))) is None  # moved from another request
    assert count("bad-signature") == 1
    assert judged(request(signed=False)) is None  # anonymous: not even read
    assert count("trusted") == 1 and count("bad-signature") == 1
