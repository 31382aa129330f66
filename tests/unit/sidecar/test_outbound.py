"""sidecar.outbound's rules: the upstream name an authority picks, and which requests may be
retried.

The process tests (test_sidecar_http, test_sidecar_retries) check the same rules end to end;
these pin the edge cases that are awkward to produce on the wire.
"""

from __future__ import annotations

import pytest

from sidecar.outbound import may_retry, upstream_name


@pytest.mark.parametrize(
    ("authority", "name"),
    [
        ("users", "users"),
        ("Users:8080", "users"),
        ("users.", "users"),
        ("[::1]:15001", "::1"),
        ("127.0.0.1:80", "127.0.0.1"),
    ],
)
def test_upstream_name_ignores_port_and_case(authority: str, name: str) -> None:
    assert upstream_name(authority) == name


@pytest.mark.parametrize(
    ("method", "has_body", "expected"),
    [
        ("GET", False, True),
        ("HEAD", False, True),
        ("OPTIONS", False, True),
        ("PUT", False, True),
        ("DELETE", False, True),
        ("PUT", True, False),
        ("GET", True, False),  # a streamed body cannot be replayed
        ("POST", False, False),
        ("PATCH", False, False),
    ],
)
def test_retry_rule(method: str, has_body: bool, expected: bool) -> None:
    assert may_retry(method, has_body) is expected
