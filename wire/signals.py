"""Signed response signals: the ``X-GT-Signals`` header that makes an answer's game headers
believable.

Owns the version-1 format of the MAC an inbound sidecar puts on its answers, over the signals
it sends (``X-GT-Congestion``, ``X-GT-Reputation``, ``X-GT-Price``, and on a refusal
``X-GT-Refused``) and the request they answer, and its check on the caller's side. Pure: keys,
values and the request are passed in.

Wire format (version 2; version 1 is still read)::

    X-GT-Challenge: <nonce>                       (request; fresh per attempt, wire.identity)
    X-GT-Signals: v=2;caller=<caller>;at=<ip>;sig=<mac>   (response)
    <mac> = base64url(HMAC-SHA256(key, "X-GT-Signals|v=2|<challenge>|<caller>|<METHOD>|"
            "<target>|<congestion>|<reputation>|<price>[|refused=<reason>]|at=<ip>")),
            unpadded

``<ip>`` is the address the answering sidecar was reached at (its socket's local address, in
the canonical text of :func:`normal_ip`). The caller's sidecar compares it with the address
it sent the request to: a server outside the mesh that passes a caller's challenge on to a
meshed pod and relays the pod's signed answer back (a stranger's finding) gets an answer
signed with the *pod's* address, so its refusal does not make the caller send a POST again
elsewhere, and it does not become a member of the mesh by it. Version 1 (no ``at``; what
older sidecars write) verifies as before, but is bound to no address: no refusal in it is
acted on, nor does it prove membership.

``X-GT-Refused: <reason>`` (``queue-full``, ``queue-timeout``, ``shutting-down``,
``app-unreachable``) is on an answer only when the callee's sidecar sent the request away
*before the app saw it*, and ``X-GT-Refused: app-reset`` on its 502 when the app's connection
broke before any answer (:data:`wire.headers.APP_RESET`); its ``|refused=<reason>`` is in the
MAC input only then, so answers without it sign exactly as before. Signed, it tells the
caller's sidecar that the request may be sent to another endpoint (:mod:`sidecar.outbound`;
after ``app-reset`` only an idempotent one without a body); an app's own 503 or 502, or a
refusal from outside the mesh, never carries a valid one.

``<caller>`` is who the callee's sidecar took the caller for (a verified id, or
``anonymous``); an absent signal is written ``-`` in the MAC input; values are the header
values exactly as sent. The caller's sidecar believes the signals only if the MAC verifies for
the challenge *it* sent on that attempt and the request it made; it acts on a standing or a
price only when ``<caller>`` is itself (a signed answer about ``anonymous``, relayed by a
third party, punishes nobody). Without a valid ``X-GT-Signals`` every game header of the answer
is dropped and counted: a server outside the mesh (which never has the key) cannot make a
caller back off, and cannot pass for a member of the mesh.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from wire.errors import Reason
from wire.identity import CALLER_ID_PATTERN, NONCE_PATTERN
from wire.signing import SIGNATURE_RE, mac, verify_mac

SIGNALS_VERSION = "v=2"
UNBOUND_VERSION = "v=1"
"""The format without the answering sidecar's address (read, never written by a sidecar
that knows its address)."""
MAX_SIGNALS_CHARS = 220
ABSENT = "-"
MAX_IP_CHARS = 45


def normal_ip(text: object) -> str:
    """``text`` (a socket address's host: ``"10.0.0.5"``, ``"::ffff:10.0.0.5"``,
    ``"fe80::1%eth0"``) as the canonical text of its IP address, an IPv4-mapped IPv6 address
    as its IPv4 one (a dual-stack socket's view of an IPv4 peer); ``""`` if it is none."""
    if not isinstance(text, str) or not text or len(text) > MAX_IP_CHARS + 16:
        return ""
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return ""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


@dataclass(frozen=True, slots=True)
class AnsweredRequest:
    """What the signals answer: the caller's challenge and its request (method, target);
    ``at``: where the answering sidecar was reached (:func:`normal_ip`; "" unknown). The
    caller's own copy, for checking, leaves ``at`` empty: the answer says it."""

    challenge: str
    method: str
    target: str
    at: str = ""


@dataclass(frozen=True, slots=True)
class SignedSignals:
    """The game headers of one answer, as sent (None: absent)."""

    congestion: str | None = None
    reputation: str | None = None
    price: str | None = None
    refused: str | None = None


@dataclass(frozen=True, slots=True)
class SignalsVerdict:
    """The check's result: ``reason`` None when the MAC verified; ``caller`` as signed;
    ``at`` the address the answering sidecar signed it was reached at ("" in version 1)."""

    reason: Reason | None
    caller: str = ""
    at: str = ""

    @property
    def authentic(self) -> bool:
        return self.reason is None


def _message(answered: AnsweredRequest, caller: str, signals: SignedSignals) -> bytes:
    values = (signals.congestion, signals.reputation, signals.price)
    text = "|".join(ABSENT if v is None else v for v in values)
    if signals.refused is not None:
        text += f"|refused={signals.refused}"
    version = UNBOUND_VERSION
    if answered.at:
        text += f"|at={answered.at}"
        version = SIGNALS_VERSION
    return (f"X-GT-Signals|{version}|{answered.challenge}|{caller}|"
            f"{answered.method.upper()}|{answered.target}|{text}").encode(
                "utf-8", "surrogateescape")


def sign_signals(key: bytes, answered: AnsweredRequest, caller: str,
                 signals: SignedSignals) -> str | None:
    """The ``X-GT-Signals`` value for ``signals`` answering ``answered`` as seen for
    ``caller`` (version 2 with ``answered.at``, else version 1); None when the request
    carried no usable challenge (nothing to bind to)."""
    if not NONCE_PATTERN.fullmatch(answered.challenge) or not CALLER_ID_PATTERN.fullmatch(caller):
        return None
    if answered.at and normal_ip(answered.at) != answered.at:  # (not an address: unbound)
        answered = AnsweredRequest(answered.challenge, answered.method, answered.target)
    sig = mac(key, _message(answered, caller, signals))
    if answered.at:
        return f"{SIGNALS_VERSION};caller={caller};at={answered.at};sig={sig}"
    return f"{UNBOUND_VERSION};caller={caller};sig={sig}"


def verify_signals(header: str | None, keys: bytes | Sequence[bytes], answered: AnsweredRequest,
                   signals: SignedSignals) -> SignalsVerdict:
    """Check an answer's ``X-GT-Signals`` against the challenge and request this sidecar
    sent (``answered.at`` is not used: the header says where it was signed, and the verdict
    tells, for the caller to compare with where it sent the request); never raises."""
    if not header:
        return SignalsVerdict(Reason.UNSIGNED)
    if len(header) > MAX_SIGNALS_CHARS:
        return SignalsVerdict(Reason.MALFORMED)
    parts = header.strip().split(";")
    version = parts[0]
    if version not in (SIGNALS_VERSION, UNBOUND_VERSION):
        return SignalsVerdict(Reason.MALFORMED if not version.startswith("v=")
                              else Reason.UNSUPPORTED_VERSION)
    if len(parts) != (4 if version == SIGNALS_VERSION else 3):
        return SignalsVerdict(Reason.MALFORMED)
    at = ""
    if version == SIGNALS_VERSION:
        at_field = parts[2].partition("=")
        at = at_field[2]
        if at_field[:2] != ("at", "=") or not at or normal_ip(at) != at:
            return SignalsVerdict(Reason.MALFORMED)
    caller_field, sig_field = parts[1].partition("="), parts[-1].partition("=")
    if caller_field[:2] != ("caller", "=") or sig_field[:2] != ("sig", "="):
        return SignalsVerdict(Reason.MALFORMED)
    caller, sig = caller_field[2], sig_field[2]
    if not CALLER_ID_PATTERN.fullmatch(caller) or not SIGNATURE_RE.fullmatch(sig):
        return SignalsVerdict(Reason.MALFORMED)
    key_list = [keys] if isinstance(keys, bytes | bytearray) else list(keys)
    signed = AnsweredRequest(answered.challenge, answered.method, answered.target, at)
    if not verify_mac(key_list, _message(signed, caller, signals), sig):
        return SignalsVerdict(Reason.BAD_SIGNATURE)
    return SignalsVerdict(None, caller, at)
