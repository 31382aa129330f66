"""wire against a real Redis: entries through streams and groups, the lease Lua and fencing."""

from __future__ import annotations

import uuid

from tests.redis_fixture import RedisHandle
from wire.errors import Reason, WireError
from wire.keys import (
    RECOMMENDATION_MAXLEN,
    RECOMMENDATION_TTL_MS,
    SIGNALER_GROUP,
    SUMMARY_MAXLEN,
    fence_key,
    leader_key,
    recommendation_stream,
    summary_stream,
)
from wire.lease import FENCED_XADD_LUA, LEASE_ACQUIRE_LUA, LEASE_RELEASE_LUA, Lease, decode_lease
from wire.recommendation import Recommendation, sign_recommendation, verify_recommendation
from wire.summary import RegretSummary, decode_summary, encode_summary

KEY = b"mesh-key-for-tests-0123456789abcdef"
NOW = 1_764_183_600.0


def _upstream() -> str:
    return f"svc-{uuid.uuid4().hex[:8]}"  # the session server is shared: unique keys per test


def _summary(upstream: str, sidecar: str, epoch: int) -> RegretSummary:
    return RegretSummary(
        sidecar=sidecar, upstream=upstream, epoch=epoch, sent_at=NOW + epoch,
        endpoints=("a:80", "b:80"), requests=(10, 5), failures=(0, 1),
        latency_mean=(0.01, 0.2), latency_p50=(0.01, 0.15), latency_p99=(0.02, 0.5),
        in_flight=(1, 2), demand=15.0, weights=(0.6, 0.4), regret=((0.0, -0.1), (0.19, 0.0)),
    )


def _rec(upstream: str, sidecar: str, fence: int, signer: str) -> Recommendation:
    return Recommendation(
        upstream=upstream, sidecar=sidecar, epoch=9, issued_at=NOW, expires_at=NOW + 3,
        endpoints=("a:80", "b:80"), weights=(0.8, 0.2), status="optimal", objective=0.5,
        ce_gap=0.0, signer=signer, fence=fence,
    )


def test_summaries_through_a_consumer_group(redis_server_session: RedisHandle) -> None:
    r = redis_server_session.client()  # bytes in, bytes out: what the signaler sees
    upstream = _upstream()
    stream = summary_stream(upstream)
    r.xgroup_create(stream, SIGNALER_GROUP, id="0", mkstream=True)
    sent = [_summary(upstream, f"sc-{i}", epoch=i) for i in range(3)]
    for s in sent:
        r.xadd(stream, encode_summary(s), maxlen=SUMMARY_MAXLEN, approximate=True)
    r.xadd(stream, {"v": "1", "type": "summary", "epoch": "NaN"})  # a bad producer
    got = r.xreadgroup(SIGNALER_GROUP, "signaler-0", {stream: ">"}, count=10)[0][1]
    decoded, rejected = [], []
    for _, fields in got:
        try:
            decoded.append(decode_summary(fields))
        except WireError as exc:
            rejected.append(exc.reason)
    assert decoded == sent
    assert rejected == [Reason.MALFORMED]


def test_lease_fencing_and_fenced_publish(redis_server_session: RedisHandle) -> None:
    r = redis_server_session.client()
    upstream = _upstream()
    leader, fence = leader_key(upstream), fence_key(upstream)
    acquire = r.register_script(LEASE_ACQUIRE_LUA)
    release = r.register_script(LEASE_RELEASE_LUA)
    publish = r.register_script(FENCED_XADD_LUA)
    stream = recommendation_stream(upstream, "sc-1")

    def fenced_xadd(holder: str, token: int, rec: Recommendation) -> bytes | None:
        flat = [x for kv in sign_recommendation(rec, KEY).items() for x in kv]
        return publish(keys=[leader, stream],
                       args=[holder, token, RECOMMENDATION_MAXLEN, RECOMMENDATION_TTL_MS, *flat])

    a_token = acquire(keys=[leader, fence], args=["signaler-a", 60_000])
    assert a_token == 1
    assert acquire(keys=[leader, fence], args=["signaler-b", 60_000]) == 0  # b stands by
    assert acquire(keys=[leader, fence], args=["signaler-a", 60_000]) == 1  # a renews
    assert decode_lease(r.get(leader)) == Lease("signaler-a", 1)
    assert 0 < r.pttl(leader) <= 60_000

    assert fenced_xadd("signaler-a", a_token, _rec(upstream, "sc-1", a_token, "signaler-a"))

    r.delete(leader)  # a's lease ran out (it paused or died)
    b_token = acquire(keys=[leader, fence], args=["signaler-b", 60_000])
    assert b_token == 2
    # a wakes up and tries to publish under its old token: refused atomically
    assert fenced_xadd("signaler-a", a_token, _rec(upstream, "sc-1", a_token, "signaler-a")) is None
    assert fenced_xadd("signaler-b", b_token, _rec(upstream, "sc-1", b_token, "signaler-b"))
    assert release(keys=[leader], args=["signaler-a", a_token]) == 0  # not a's to release

    entries = r.xrange(stream)
    assert [e[1][b"signer"] for e in entries] == [b"signaler-a", b"signaler-b"]
    # a sidecar that has seen fence 2 refuses anything signed under fence 1
    newest = verify_recommendation(entries[-1][1], KEY, NOW, upstream, "sc-1", min_fence=1)
    assert newest.fence == 2
    try:
        verify_recommendation(entries[0][1], KEY, NOW, upstream, "sc-1", min_fence=newest.fence)
    except WireError as exc:
        assert exc.reason is Reason.FENCED
    else:
        raise AssertionError("a deposed leader's recommendation was accepted")

    assert release(keys=[leader], args=["signaler-b", b_token]) == 1
    assert r.get(leader) is None
    assert acquire(keys=[leader, fence], args=["signaler-a", 60_000]) == 3  # always increasing


def test_recommendation_stream_is_trimmed(redis_server_session: RedisHandle) -> None:
    r = redis_server_session.client()
    upstream = _upstream()
    leader, fence = leader_key(upstream), fence_key(upstream)
    token = r.register_script(LEASE_ACQUIRE_LUA)(keys=[leader, fence], args=["s", 60_000])
    publish = r.register_script(FENCED_XADD_LUA)
    stream = recommendation_stream(upstream, "sc-1")
    flat = [x for kv in sign_recommendation(_rec(upstream, "sc-1", token, "s"), KEY).items()
            for x in kv]
    for _ in range(500):
        publish(keys=[leader, stream],
                args=["s", token, RECOMMENDATION_MAXLEN, RECOMMENDATION_TTL_MS, *flat])
    # MAXLEN ~ trims whole macro-nodes (stream-node-max-entries, 100 by default): a loose bound
    assert r.xlen(stream) <= RECOMMENDATION_MAXLEN + 100
    latest = r.xrevrange(stream, count=1)[0][1]
    assert verify_recommendation(latest, KEY, NOW, upstream, "sc-1").fence == token
