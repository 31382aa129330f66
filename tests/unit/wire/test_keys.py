"""wire.keys: one hash slot per upstream; names that could not be keys are refused."""

from __future__ import annotations

import pytest

from wire.errors import Reason, WireError
from wire.keys import (
    check_redis_url,
    fence_key,
    leader_key,
    recommendation_stream,
    summary_stream,
    unverified_tls,
)


def test_keys_share_one_cluster_hash_slot_per_upstream() -> None:
    assert summary_stream("orders.shop") == "eq:{orders.shop}:summaries"
    assert recommendation_stream("orders.shop", "sc-1") == "eq:{orders.shop}:recs:sc-1"
    assert leader_key("orders.shop") == "eq:{orders.shop}:leader"
    assert fence_key("orders.shop") == "eq:{orders.shop}:fence"


@pytest.mark.parametrize("name", ["", "a}b", "a{b", "a b", "a:b", "-lead", "x" * 129, "é"])
def test_bad_names_never_become_keys(name: str) -> None:
    with pytest.raises(WireError) as err:
        summary_stream(name)
    assert err.value.reason is Reason.MALFORMED
    with pytest.raises(WireError):
        recommendation_stream("orders", name)


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379", "redis://127.0.0.1:6379/0", "redis://:p%2Fw@127.0.0.1:6379/3",
    "redis://user:pass@redis.mesh.svc:6379", "rediss://redis:6380?ssl_cert_reqs=required",
    "redis://[::1]:6379", "unix:///run/redis.sock", "redis://127.0.0.1?socket_timeout=2.5",
])
def test_a_redis_url_redis_py_reads_as_written_is_taken(url: str) -> None:
    assert check_redis_url(f"  {url} ") == url


@pytest.mark.parametrize(("url", "says"), [
    ("http://127.0.0.1:6379", "got http"),
    ("redis://127.0.0.1:notaport", "port"),
    ("redis://127.0.0.1:70000", "port"),
    ("redis://127.0.0.1:0", "port"),
    ("redis://[::1", "port"),
    ("redis://:S3cretPassw0rd/xyz@127.0.0.1:6379", "percent-encoded"),
    ("redis://127.0.0.1:6379/abc", "database number"),
    ("redis://127.0.0.1:6379?socket_timeout=abc", "socket_timeout"),
    ("redis://127.0.0.1:6379?ssl_ca_certs=/ca.pem", "rediss://"),
    ("redis://:6379", "no host"),
])
def test_a_redis_url_redis_py_would_misread_is_refused_without_quoting_it(
        url: str, says: str) -> None:
    """A stranger's finding: such URLs failed only at the first connection, with a
    traceback at every retry, and the password in it when a '/' in it made it the port."""
    with pytest.raises(ValueError) as caught:
        check_redis_url(url)
    message = str(caught.value)
    assert says in message, message
    assert "S3cret" not in message and "notaport" not in message and "abc" not in message


@pytest.mark.parametrize(("url", "said"), [
    ("rediss://eq-sidecar:pw@redis:6380/0", None),
    ("rediss://redis:6380?ssl_ca_certs=/etc/ca.pem", None),
    ("redis://redis:6379", None),
    ("rediss://redis:6380?ssl_cert_reqs=none", "ssl_cert_reqs=none"),
    ("rediss://redis:6380?ssl_cert_reqs=OPTIONAL", "ssl_cert_reqs=optional"),
    ("rediss://redis:6380?ssl_check_hostname=false", "ssl_check_hostname=false"),
])
def test_tls_that_verifies_nothing_is_named(url: str, said: str | None) -> None:
    """A stranger's finding: ``?ssl_cert_reqs=none`` was taken without a word."""
    assert check_redis_url(url) == url
    weak = unverified_tls(url)
    assert (weak is None) if said is None else (weak is not None and weak.startswith(said))
    assert weak is None or "pw" not in weak
