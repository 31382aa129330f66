"""The one error type of every wire format and the one vocabulary of why a value was refused.

Owns :class:`WireError` and :class:`Reason`. Every decoder, parser and verifier in :mod:`wire`
raises only :class:`WireError` (or, for the identity header, returns a rejection carrying a
:class:`Reason`), whatever the input; its ``reason`` is a stable identifier used verbatim as a
metric label. Must not import anything above :mod:`mesh` and does no I/O.

The labels are the ones dashboards and alerts already use; a few formats kept their historical
spelling of the same idea (``version`` for stream entries and ``v=``-headers, but
``unsupported-version`` for ``X-GT-Identity``; ``not-yet-valid`` for recommendations, ``future``
for identities), so that no metric series changes name.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Reason", "WireError"]


class Reason(StrEnum):
    """Why a wire value was refused (a metric label; docs/protocol.md lists who uses which)."""

    # shape: any format
    MALFORMED = "malformed"
    """Missing, unknown or unparsable fields, values out of range, inconsistent shapes."""
    OVERSIZED = "oversized"
    """A stream entry with too many endpoints or too many bytes."""
    TOO_LONG = "too-long"
    """A header value longer than its format allows."""
    OUT_OF_RANGE = "out-of-range"
    """A header number outside its allowed interval."""
    VERSION = "version"
    """A stream entry or ``v=``-header of another version (or none)."""
    DELETED = "deleted"
    """A pending stream entry trimmed before it was read (Redis 6.2 reports it as nil)."""
    UNSUPPORTED_VERSION = "unsupported-version"
    """An ``X-GT-Identity`` of another version."""
    MISSING = "missing"
    """No ``X-GT-Identity`` header at all."""
    # bids
    NAN = "nan"
    INFINITE = "infinite"
    NEGATIVE = "negative"
    TOO_LARGE = "too-large"
    # signatures and freshness
    UNSIGNED = "unsigned"
    """A recommendation or a regret summary without a signature."""
    BAD_SIGNATURE = "bad-signature"
    """The HMAC does not verify under any accepted key (forged, corrupted or another mesh)."""
    EXPIRED = "expired"
    """A recommendation past its ``expires_at``, a summary sent longer ago than it is used."""
    NOT_YET_VALID = "not-yet-valid"
    """A recommendation issued, or a summary sent, further in the future than the allowed
    clock skew."""
    FUTURE = "future"
    """An identity signed further in the future than the allowed clock skew."""
    REPLAYED = "replayed"
    """An identity whose nonce was already used (a captured header sent again)."""
    WRONG_CALLER = "wrong-caller"
    """Signed response signals about another caller than the reader (relayed by a third
    party)."""
    ELSEWHERE = "elsewhere"
    """Signed response signals of a sidecar reached at another address than the one the
    reader sent to (relayed by a third party), or that do not say where (an older sidecar):
    a refusal among them is not acted on, nor is the answer a proof of mesh membership."""
    # recommendations against what the reader expects
    WRONG_UPSTREAM = "wrong-upstream"
    WRONG_SIDECAR = "wrong-sidecar"
    ENDPOINT_MISMATCH = "endpoint-mismatch"
    """A recommendation over another endpoint set than the reader routes to."""
    STALE = "stale"
    """Older than what the reader already follows (an earlier epoch)."""
    FENCED = "fenced"
    """Signed by a leader whose fencing token was superseded (a deposed signaler)."""
    # the mesh key
    NO_KEY = "no-key"
    """No mesh key where one is required."""
    WEAK_KEY = "weak-key"
    """A mesh key shorter than :data:`wire.signing.MIN_KEY_BYTES`."""
    UNREADABLE = "unreadable"
    """A key file that cannot be read or is empty."""


class WireError(ValueError):
    """A wire value that must not be used.

    ``reason`` is a :class:`Reason`, ``detail`` says why in words, ``subject`` names what was
    refused (a header name such as ``X-GT-Bid``, ``mesh key``) when the raiser knows it.
    ``str()`` is ``"<subject>: <detail>"``, or ``"<reason>: <detail>"`` without a subject.
    """

    def __init__(self, reason: Reason, detail: str, subject: str = "") -> None:
        super().__init__(f"{subject or reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.subject = subject
