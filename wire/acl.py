"""Least-privilege Redis users of the signaling plane: what each role may run, on which keys.

Owns the Redis ACL rules (Redis 7 ``ACL SETUSER`` / ``user`` directive syntax) of the two
roles that share the Redis of the mesh, derived from the key layout of :mod:`wire.keys` and
the commands of :mod:`wire.redis_store` (docs/protocol.md, "Keys"; docs/operations.md,
"Security"):

* **sidecar** (:data:`SIDECAR_USER`): append to ``eq:{*}:summaries`` (write-only: ``%W~``) and
  read ``eq:{*}:recs:*`` (read-only: ``%R~``), with ``XADD`` and ``XREVRANGE`` only. It cannot
  write a recommendation, take a lease, touch the fence, read the summaries of others, delete
  a key or flush the server. What stays possible, as the key grammar cannot express less: an
  ``XADD ... MAXLEN 0`` trims a summary stream (signaling for that upstream pauses until the
  next epoch's summaries), and every sidecar may read every recommendation stream (a
  per-sidecar user would be needed to hide them from each other).
* **signaler** (:data:`SIGNALER_USER`): everything :class:`wire.redis_store.RedisSignalStore`
  sends, on ``eq:*`` only: ``SCAN``, the consumer group commands, ``XADD`` (inside the fenced
  publish script), the lease scripts (``EVALSHA``/``EVAL``, ``SCRIPT LOAD``, and the commands
  they run: ``GET``, ``SET``, ``PEXPIRE``, ``INCR``, ``DEL``). No ``FLUSHALL``, ``CONFIG``,
  ``KEYS``, ``DEBUG``, ``ACL``.

The ``default`` user keeps an administrator's password (probes, operators) and is never given
to a pod. Pure: builds strings; the passwords are the caller's. Tests apply these exact rules
to a real Redis (``tests/integration/test_redis_acl.py``) and check that ``k8s/`` and
``compose.yaml`` use them.
"""

from __future__ import annotations

import re

__all__ = [
    "ROLES",
    "SIDECAR_RULES",
    "SIDECAR_USER",
    "SIGNALER_RULES",
    "SIGNALER_USER",
    "acl_rules",
    "acl_user_line",
]

SIDECAR_USER = "eq-sidecar"
SIGNALER_USER = "eq-signaler"

_CONNECT = ("+ping",)
"""What any client may send besides its work: ``PING``. (redis-py's ``CLIENT SETINFO`` at
connect is refused and ignored; naming it would fail on Redis 7.0, which lacks it.)"""

SIDECAR_RULES: tuple[str, ...] = (
    "resetkeys", "resetchannels", "-@all", *_CONNECT,
    "+xadd", "+xrevrange",
    "%W~eq:{*}:summaries", "%R~eq:{*}:recs:*",
)
"""The sidecar's rules: append summaries, read recommendations, nothing else."""

SIGNALER_RULES: tuple[str, ...] = (
    "resetkeys", "resetchannels", "-@all", *_CONNECT,
    "+scan", "+xgroup|create", "+xreadgroup", "+xautoclaim", "+xack", "+xrevrange", "+xadd",
    "+xinfo|stream", "+evalsha", "+eval", "+script|load", "+get", "+set", "+pexpire", "+incr",
    "+del",
    "~eq:*",
)
"""The signaler's rules: its commands on the plane's keys only."""

ROLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "sidecar": (SIDECAR_USER, SIDECAR_RULES),
    "signaler": (SIGNALER_USER, SIGNALER_RULES),
}
_PASSWORD_RE = re.compile(r"[A-Za-z0-9._~-]{16,256}")


def acl_rules(role: str, password: str) -> list[str]:
    """The ``ACL SETUSER <user>`` arguments of ``role``: enabled, exactly this password, the
    rules. ``ValueError`` for an unknown role or a password that is too short or would need
    quoting (use ``openssl rand -hex 32``)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    if not _PASSWORD_RE.fullmatch(password):
        raise ValueError("a Redis password must be 16-256 characters of [A-Za-z0-9._~-]")
    return ["reset", "on", f">{password}", *ROLES[role][1]]


def acl_user_line(role: str, password: str) -> str:
    """The ``user`` directive of ``role`` for an ACL file or ``redis-server --user ...``."""
    return " ".join(["user", ROLES[role][0], *acl_rules(role, password)])
