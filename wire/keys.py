"""Redis key names of the signaling plane, the stream bounds, and the one check of a Redis URL.

Owns every key the sidecars and the signaler share (docs/protocol.md, "Keys"): one hash-tagged
family per upstream service, ``eq:{<upstream>}:...``, so a Redis Cluster keeps an upstream's
streams, lease and fence in one slot and the fenced publish script touches them atomically.
Pure: builds strings, talks to nobody. A name that could not be a key raises
:class:`~wire.errors.WireError` (``malformed``).
"""

from __future__ import annotations

import re

from wire.entries import check_name

__all__ = [
    "RECOMMENDATION_MAXLEN",
    "REDIS_URL_SCHEMES",
    "SIGNALER_GROUP",
    "SUMMARY_MAXLEN",
    "check_redis_url",
    "fence_key",
    "key_role",
    "leader_key",
    "recommendation_stream",
    "summary_stream",
]

SIGNALER_GROUP = "eq-signalers"
"""The consumer group of ``eq:{u}:summaries`` that all signaler replicas share."""
SUMMARY_MAXLEN = 10_000
"""``XADD ... MAXLEN ~`` bound of a summary stream (a few minutes of a large fleet)."""
RECOMMENDATION_MAXLEN = 16
"""``XADD ... MAXLEN ~`` bound of one sidecar's recommendation stream (only the last matters)."""

REDIS_URL_SCHEMES = ("redis://", "rediss://", "unix://")


def check_redis_url(value: object) -> str:
    """``value`` stripped, if it is a ``redis://[user:password@]host:port[/db]``, ``rediss://``
    (TLS) or ``unix://`` URL; ``ValueError`` otherwise. The message names only the scheme:
    the URL may carry the Redis password."""
    text = str(value).strip()
    scheme = next((s for s in REDIS_URL_SCHEMES if text.startswith(s)), None)
    if scheme is None or len(text) <= len(scheme):
        got = text.partition("://")[0] if "://" in text else "no scheme"
        raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {got}")
    return text


def summary_stream(upstream: str) -> str:
    """The stream every sidecar appends its summaries for ``upstream`` to."""
    return f"eq:{{{check_name(upstream, 'upstream')}}}:summaries"


def recommendation_stream(upstream: str, sidecar: str) -> str:
    """The private stream the signaler writes ``sidecar``'s recommendations for ``upstream`` to."""
    return f"eq:{{{check_name(upstream, 'upstream')}}}:recs:{check_name(sidecar, 'sidecar')}"


def leader_key(upstream: str) -> str:
    """The lease key (``SET ... NX PX``) naming the signaler that leads ``upstream``."""
    return f"eq:{{{check_name(upstream, 'upstream')}}}:leader"


def fence_key(upstream: str) -> str:
    """The counter (``INCR``) handing out fencing tokens for ``upstream``'s leadership."""
    return f"eq:{{{check_name(upstream, 'upstream')}}}:fence"


_KEY_RE = re.compile(r"^eq:\{([^{}]{1,128})\}:(summaries|recs|leader|fence)(?::.*)?$", re.DOTALL)


def key_role(key: str) -> tuple[str, str]:
    """``(upstream, role)`` of a key of the plane, ``role`` one of ``summaries``, ``recs``,
    ``leader``, ``fence``; ``("", "other")`` for anything else (a bounded metric label)."""
    match = _KEY_RE.match(key)
    return (match.group(1), match.group(2)) if match else ("", "other")
