"""Redis key names of the signaling plane, the stream bounds, and the one check of a Redis URL.

Owns every key the sidecars and the signaler share (docs/protocol.md, "Keys"): one hash-tagged
family per upstream service, ``eq:{<upstream>}:...``, so a Redis Cluster keeps an upstream's
streams, lease and fence in one slot and the fenced publish script touches them atomically.
Pure: builds strings, talks to nobody. A name that could not be a key raises
:class:`~wire.errors.WireError` (``malformed``).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, unquote, urlsplit

from wire.entries import check_name

__all__ = [
    "RECOMMENDATION_MAXLEN",
    "RECOMMENDATION_TTL_MS",
    "REDIS_URL_SCHEMES",
    "SIGNALER_GROUP",
    "SUMMARY_MAXLEN",
    "check_redis_url",
    "fence_key",
    "key_role",
    "leader_key",
    "recommendation_stream",
    "summary_stream",
    "unverified_tls",
]

SIGNALER_GROUP = "eq-signalers"
"""The consumer group of ``eq:{u}:summaries`` that all signaler replicas share."""
SUMMARY_MAXLEN = 10_000
"""``XADD ... MAXLEN ~`` bound of a summary stream (a few minutes of a large fleet)."""
RECOMMENDATION_MAXLEN = 16
"""``XADD ... MAXLEN ~`` bound of one sidecar's recommendation stream (only the last matters)."""

RECOMMENDATION_TTL_MS = 600_000
"""The time to live of a sidecar's recommendation stream, renewed by each recommendation: the
stream of a sidecar that is gone (a pod of a rollout) expires 10 minutes after its last one
(each stayed for good, and the signaler's SCAN walked them all: a stranger's finding)."""

REDIS_URL_SCHEMES = ("redis://", "rediss://", "unix://")


def check_redis_url(value: object) -> str:
    """``value`` stripped, if it is a ``redis://[user:password@]host:port[/db]``, ``rediss://``
    (TLS) or ``unix://`` URL that redis-py will read as written; ``ValueError`` otherwise.
    The message never quotes the URL, which may carry the Redis password: it names the
    scheme, or the part that is wrong. A port that is not a number, a database (the path)
    that is not one (redis-py reads it as database 0), a query parameter redis-py refuses,
    or TLS settings on a plain ``redis://`` URL were found only at the first connection,
    then logged with a traceback at every retry, the password in it when a ``/`` in the
    password made it read as the port (a stranger's finding)."""
    text = str(value).strip()
    scheme = next((s for s in REDIS_URL_SCHEMES if text.startswith(s)), None)
    if scheme is None or len(text) <= len(scheme):
        got = text.partition("://")[0] if "://" in text else "no scheme"
        raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {got}")
    try:
        parts = urlsplit(text)
        port, host = parts.port, parts.hostname
    except ValueError:
        raise ValueError(
            "the Redis URL's host or port cannot be read: the port must be a number from 1 "
            "to 65535, and a '/', '?', '#' or '@' in the user name or password must be "
            "percent-encoded (%2F, %3F, %23, %40)") from None
    if scheme != "unix://":
        if not host:
            raise ValueError("the Redis URL names no host")
        path = unquote(parts.path)
        if path not in ("", "/") and not (path[1:].isdigit() and path[1:].isascii()):
            raise ValueError("the Redis URL's path must be a database number (/0, /1, ...)")
        if port == 0:
            raise ValueError("the Redis URL's port must be a number from 1 to 65535")
    query = parse_qs(parts.query)
    if scheme != "rediss://" and any(name.startswith("ssl") for name in query):
        raise ValueError("TLS settings (ssl_*) in the Redis URL need a rediss:// URL")
    from redis.connection import parse_url  # (the sidecar's init container never gets here)

    try:
        parse_url(text)  # type: ignore[no-untyped-call]
    except ValueError as exc:  # its messages name a query parameter, never the URL
        raise ValueError(f"the Redis URL: {exc}") from None
    return text


def unverified_tls(url: str) -> str | None:
    """Why a ``rediss://`` URL (checked by :func:`check_redis_url`) does not verify the
    server it talks to, else None: ``ssl_cert_reqs=none`` or ``optional`` (any certificate,
    or none, is taken), ``ssl_check_hostname=false`` (any name is). TLS that verifies nothing
    stops a passive eavesdropper only; it was accepted without a word (a stranger's
    finding). The text names the parameter, never the URL."""
    if not url.startswith("rediss://"):
        return None
    query = {name.lower(): values[-1].strip().lower()
             for name, values in parse_qs(urlsplit(url).query).items() if values}
    reqs = query.get("ssl_cert_reqs")
    if reqs in ("none", "optional", "cert_none", "cert_optional"):
        return (f"ssl_cert_reqs={reqs}: the Redis server's certificate is not verified, so "
                "anyone on the path can pose as Redis")
    if query.get("ssl_check_hostname") in ("false", "0", "no", "off"):
        return ("ssl_check_hostname=false: any certificate the CA signed passes for the "
                "Redis server")
    return None


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
