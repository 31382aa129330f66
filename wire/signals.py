"""Signed response signals: the ``X-GT-Signals`` header that makes an answer's game headers
believable.

Owns the version-1 format of the MAC an inbound sidecar puts on its answers, over the signals
it sends (``X-GT-Congestion``, ``X-GT-Reputation``, ``X-GT-Price``, and on a refusal
``X-GT-Refused``) and the request they answer, and its check on the caller's side. Pure: keys,
values and the request are passed in.

Wire format (version 1)::

    X-GT-Challenge: <nonce>                       (request; fresh per attempt, wire.identity)
    X-GT-Signals: v=1;caller=<caller>;sig=<mac>   (response)
    <mac> = base64url(HMAC-SHA256(key, "X-GT-Signals|v=1|<challenge>|<caller>|<METHOD>|"
            "<target>|<congestion>|<reputation>|<price>[|refused=<reason>]")), unpadded

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

from collections.abc import Sequence
from dataclasses import dataclass

from wire.errors import Reason
from wire.identity import CALLER_ID_PATTERN, NONCE_PATTERN
from wire.signing import SIGNATURE_RE, mac, verify_mac

SIGNALS_VERSION = "v=1"
MAX_SIGNALS_CHARS = 160
ABSENT = "-"


@dataclass(frozen=True, slots=True)
class AnsweredRequest:
    """What the signals answer: the caller's challenge and its request (method, target)."""

    challenge: str
    method: str
    target: str


@dataclass(frozen=True, slots=True)
class SignedSignals:
    """The game headers of one answer, as sent (None: absent)."""

    congestion: str | None = None
    reputation: str | None = None
    price: str | None = None
    refused: str | None = None


@dataclass(frozen=True, slots=True)
class SignalsVerdict:
    """The check's result: ``reason`` None when the MAC verified; ``caller`` as signed."""

    reason: Reason | None
    caller: str = ""

    @property
    def authentic(self) -> bool:
        return self.reason is None


def _message(answered: AnsweredRequest, caller: str, signals: SignedSignals) -> bytes:
    values = (signals.congestion, signals.reputation, signals.price)
    text = "|".join(ABSENT if v is None else v for v in values)
    if signals.refused is not None:
        text += f"|refused={signals.refused}"
    return (f"X-GT-Signals|{SIGNALS_VERSION}|{answered.challenge}|{caller}|"
            f"{answered.method.upper()}|{answered.target}|{text}").encode(
                "utf-8", "surrogateescape")


def sign_signals(key: bytes, answered: AnsweredRequest, caller: str,
                 signals: SignedSignals) -> str | None:
    """The ``X-GT-Signals`` value for ``signals`` answering ``answered`` as seen for
    ``caller``; None when the request carried no usable challenge (nothing to bind to)."""
    if not NONCE_PATTERN.fullmatch(answered.challenge) or not CALLER_ID_PATTERN.fullmatch(caller):
        return None
    return f"{SIGNALS_VERSION};caller={caller};sig={mac(key, _message(answered, caller, signals))}"


def verify_signals(header: str | None, keys: bytes | Sequence[bytes], answered: AnsweredRequest,
                   signals: SignedSignals) -> SignalsVerdict:
    """Check an answer's ``X-GT-Signals`` against the challenge and request this sidecar
    sent; never raises."""
    if not header:
        return SignalsVerdict(Reason.UNSIGNED)
    if len(header) > MAX_SIGNALS_CHARS:
        return SignalsVerdict(Reason.MALFORMED)
    parts = header.strip().split(";")
    if len(parts) != 3 or parts[0] != SIGNALS_VERSION:
        return SignalsVerdict(Reason.MALFORMED if parts[0] == SIGNALS_VERSION or
                              not parts[0].startswith("v=") else Reason.UNSUPPORTED_VERSION)
    caller_field, sig_field = parts[1].partition("="), parts[2].partition("=")
    if caller_field[:2] != ("caller", "=") or sig_field[:2] != ("sig", "="):
        return SignalsVerdict(Reason.MALFORMED)
    caller, sig = caller_field[2], sig_field[2]
    if not CALLER_ID_PATTERN.fullmatch(caller) or not SIGNATURE_RE.fullmatch(sig):
        return SignalsVerdict(Reason.MALFORMED)
    key_list = [keys] if isinstance(keys, bytes | bytearray) else list(keys)
    if not verify_mac(key_list, _message(answered, caller, signals), sig):
        return SignalsVerdict(Reason.BAD_SIGNATURE)
    return SignalsVerdict(None, caller)
