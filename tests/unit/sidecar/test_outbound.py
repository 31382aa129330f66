"""sidecar.outbound's rules: the upstream name an authority picks, and which requests may be
retried, and the bounded drain of a body the app hung up on.

The process tests (test_sidecar_http, test_sidecar_retries) check the same rules end to end;
these pin the edge cases that are awkward to produce on the wire.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from sidecar.outbound import drain, may_retry, shown, upstream_name
from sidecar.transport import MemoryBody, UpstreamReset


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


async def test_drain_reads_a_short_rest_to_its_end() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"r" * 1000

    assert await drain(MemoryBody(chunks()), limit=10_000) is True


async def test_drain_gives_up_past_its_limit_or_on_a_broken_body() -> None:
    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"r" * 1000

    async def broken() -> AsyncIterator[bytes]:
        yield b"r"
        raise UpstreamReset("gone")

    assert await drain(MemoryBody(endless()), limit=10_000) is False
    assert await drain(MemoryBody(broken())) is False


async def test_drain_gives_up_on_a_stalled_body_after_its_timeout() -> None:
    async def stalled() -> AsyncIterator[bytes]:
        yield b"r"
        await asyncio.sleep(10)
        yield b"never"

    assert await drain(MemoryBody(stalled()), timeout=0.05) is False


def test_an_error_answer_quotes_a_long_host_cut_short() -> None:
    """A stranger's finding: a 5 KB bogus Host was echoed twice in the 404's body."""
    assert shown("svc") == "svc" and shown(None) is None
    quoted = shown("h" * 5000)
    assert quoted is not None and len(quoted) < 160 and quoted.endswith("(5000 characters)")
