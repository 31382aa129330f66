"""A caller's signed demand on a service: the ``X-GT-Demand`` header, its format and its checks.

Each inbound sidecar polices its callers by what they send to *its* pod (:mod:`mesh.reputation`).
A pod alone cannot tell a caller that floods the service from a cooperative caller whose
sidecar has concentrated its traffic on this pod (the learner's cap allows up to 80 % on one
endpoint, and without the signaler's plan it may go there): both send the pod more than its
share. The caller's own sidecar knows the difference: it counts every attempt it sends to the
service and knows how many of the service's endpoints it may send to (not ejected, not
draining). It says so on each request it signs, and the callee's book judges the caller by
the smaller of its rate at the pod and its *even-spread demand* ``rate / endpoints``
(:meth:`mesh.reputation.ReputationBook.admit`).

Wire format (version 1)::

    X-GT-Demand: v=1;rate=<requests/s>;endpoints=<n>;sig=<mac>
    <mac> = base64url(HMAC-SHA256(key, "X-GT-Demand|v=1|<rate>|<n>|<nonce>")), unpadded

``<nonce>`` is the nonce of the request's ``X-GT-Identity`` (:mod:`wire.identity`), so a
demand is bound to one verified, single-use identity and therefore to one request: it cannot
be moved to another request or replayed. ``<rate>`` is a plain decimal with at most three
fractional digits (0 to :data:`MAX_RATE`), ``<n>`` 1 to :data:`MAX_ENDPOINTS` ASCII digits'
worth; the four fields appear in this order, exactly once. The header is read only when the
identity verified; anything that does not verify is ignored (the caller is then judged by its
rate at the pod alone, as before this header existed) and counted.

Trust: the mesh key holder is trusted to tell the truth. The sidecar, not the app, writes the
header (an app's ``X-GT-*`` headers never leave its sidecar), so a flooding app cannot lower
its declared demand; a forged key is the same compromise as a forged identity
(docs/operations.md, threat model).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from wire.errors import Reason
from wire.identity import NONCE_PATTERN
from wire.numerals import ascii_uint
from wire.signing import SIGNATURE_RE, mac, verify_mac

__all__ = ["DEMAND_VERSION", "Demand", "DemandRejection", "sign_demand", "verify_demand"]

DEMAND_VERSION = "v=1"
MAX_DEMAND_CHARS = 128
MAX_RATE = 1_000_000.0
MAX_ENDPOINTS = 100_000
_RATE = re.compile(r"[0-9]{1,7}(?:\.[0-9]{1,3})?", re.ASCII)


@dataclass(frozen=True, slots=True)
class Demand:
    """A verified demand: the caller's requests/s to the service and its endpoint count."""

    rate: float
    endpoints: int

    @property
    def per_endpoint(self) -> float:
        """The even-spread demand: what the caller would send each endpoint if it spread."""
        return self.rate / self.endpoints


@dataclass(frozen=True, slots=True)
class DemandRejection:
    """Why a demand was not believed."""

    reason: Reason
    detail: str


def _message(rate: str, endpoints: str, nonce: str) -> bytes:
    return f"X-GT-Demand|{DEMAND_VERSION}|{rate}|{endpoints}|{nonce}".encode("ascii")


def sign_demand(rate: float, endpoints: int, key: bytes, nonce: str) -> str | None:
    """The ``X-GT-Demand`` value for ``rate`` requests/s over ``endpoints`` endpoints, bound
    to the identity ``nonce``; None when there is nothing sound to say (no endpoint, a rate
    that is not finite, or a nonce that is not one)."""
    if not (1 <= endpoints <= MAX_ENDPOINTS and 0.0 <= rate < float("inf")):
        return None
    if not NONCE_PATTERN.fullmatch(nonce):
        return None
    text = f"{min(rate, MAX_RATE):.3f}".rstrip("0").rstrip(".")
    count = str(endpoints)
    sig = mac(key, _message(text, count, nonce))
    return f"{DEMAND_VERSION};rate={text};endpoints={count};sig={sig}"


def verify_demand(header: str, keys: bytes | Sequence[bytes],
                  nonce: str) -> Demand | DemandRejection:
    """Check an ``X-GT-Demand`` value against the verified identity's ``nonce``; never raises."""
    if len(header) > MAX_DEMAND_CHARS:
        return DemandRejection(Reason.TOO_LONG, f"longer than {MAX_DEMAND_CHARS} characters")
    parts = header.strip(" \t").split(";")  # optional whitespace only, as HTTP trims it
    if parts[0] != DEMAND_VERSION:
        reason = Reason.UNSUPPORTED_VERSION if parts[0].startswith("v=") else Reason.MALFORMED
        return DemandRejection(reason, f"expected {DEMAND_VERSION} first")
    fields = [part.partition("=") for part in parts[1:]]
    if [(name, eq) for name, eq, _ in fields] != [("rate", "="), ("endpoints", "="), ("sig", "=")]:
        return DemandRejection(Reason.MALFORMED, "expected rate=, endpoints= and sig=, in order")
    rate_text, count_text, sig = (value for _, _, value in fields)
    count = ascii_uint(count_text, 6)
    if not _RATE.fullmatch(rate_text) or count is None or not SIGNATURE_RE.fullmatch(sig):
        return DemandRejection(Reason.MALFORMED, "rate, endpoints or sig is not well formed")
    rate = float(rate_text)
    if not (1 <= count <= MAX_ENDPOINTS and rate <= MAX_RATE):
        return DemandRejection(Reason.OUT_OF_RANGE,
                               f"need 1 <= endpoints <= {MAX_ENDPOINTS} and rate <= {MAX_RATE:g}")
    key_list = [keys] if isinstance(keys, bytes | bytearray) else list(keys)
    if not NONCE_PATTERN.fullmatch(nonce) or not verify_mac(
            key_list, _message(rate_text, count_text, nonce), sig):
        return DemandRejection(Reason.BAD_SIGNATURE, "the MAC does not match this request")
    return Demand(rate, count)
