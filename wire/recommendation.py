"""The signed recommendation: what the leading signaler appends to ``eq:{u}:recs:<sidecar>``.

Owns :class:`Recommendation` (version 1; constructing one validates it), its stream-entry
codec, the canonical bytes its HMAC covers, and the reader's verification with the order of
its rejection reasons (docs/protocol.md, "Recommendation", "Signature and canonical encoding",
"Verification order and rejection reasons"). Pure: no Redis client, no clock (``now`` is
passed in); :func:`verify_recommendation` raises only :class:`~wire.errors.WireError`.

A recommendation is the mediator's private signal of a correlated equilibrium (Aumann 1974,
"Subjectivity and correlation in randomized strategies"): each sidecar reads only its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from wire.entries import (
    MAX_EPOCH,
    MAX_OBJECTIVE,
    PROTOCOL_VERSION,
    TOKEN_RE,
    check_endpoints,
    check_float,
    check_int,
    check_name,
    check_timestamp,
    check_version,
    check_weights,
    compact_json,
    fail,
    json_list,
    number_text,
    parse_float,
    parse_int,
    short,
    text_fields,
    unexpected,
)
from wire.errors import Reason, WireError
from wire.signing import SIGNATURE_RE, accepted_keys, mac, verify_mac

__all__ = [
    "RECOMMENDATION_FIELDS",
    "Recommendation",
    "canonical_recommendation_bytes",
    "encode_recommendation",
    "sign_recommendation",
    "sign_recommendations",
    "verify_recommendation",
]

SIGNATURE_CONTEXT = b"equilibrium/recommendation/v1\n"
"""First line of the signed bytes: a MAC made for anything else never verifies here."""
UNSIGNED_FIELDS = (
    "v", "type", "upstream", "sidecar", "epoch", "issued_at", "expires_at", "endpoints",
    "weights", "status", "objective", "ce_gap", "signer", "fence",
)
RECOMMENDATION_FIELDS = (*UNSIGNED_FIELDS, "sig")
"""All fields of a signed recommendation entry, in canonical order (``sig`` last)."""


@dataclass(frozen=True, slots=True)
class Recommendation:
    """The signaler's private routing signal for one sidecar on one upstream for one epoch.

    ``weights`` (aligned with ``endpoints``, summing to 1) is the sidecar's share of the sampled
    configuration of the correlated-equilibrium plan. ``status`` is the solver's outcome
    (``optimal``, ``system-optimum``, ...), ``objective`` the plan's expected total latency in
    seconds per unit time, ``ce_gap`` the largest gain (seconds) any token could get by
    deviating from its recommendation. ``signer`` is the leading signaler's id and ``fence`` its
    fencing token (from ``INCR eq:{u}:fence`` when it took the lease).
    """

    upstream: str
    sidecar: str
    epoch: int
    issued_at: float
    expires_at: float
    endpoints: tuple[str, ...]
    weights: tuple[float, ...]
    status: str
    objective: float
    ce_gap: float
    signer: str
    fence: int
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        check_version(self.version, "recommendation")
        check_name(self.upstream, "upstream")
        check_name(self.sidecar, "sidecar")
        check_name(self.signer, "signer")
        set_ = object.__setattr__
        set_(self, "epoch", check_int(self.epoch, "epoch", 0, MAX_EPOCH))
        set_(self, "fence", check_int(self.fence, "fence", 1, MAX_EPOCH))
        issued = check_timestamp(self.issued_at, "issued_at")
        expires = check_timestamp(self.expires_at, "expires_at")
        if expires <= issued:
            raise fail(f"expires_at {expires!r} is not after issued_at {issued!r}")
        set_(self, "issued_at", issued)
        set_(self, "expires_at", expires)
        endpoints = check_endpoints(self.endpoints)
        set_(self, "endpoints", endpoints)
        set_(self, "weights", check_weights(self.weights, len(endpoints)))
        if not isinstance(self.status, str) or not TOKEN_RE.fullmatch(self.status):
            raise fail(f"status must match {TOKEN_RE.pattern}, got {short(self.status)}")
        set_(self, "objective",
             check_float(self.objective, "objective", -MAX_OBJECTIVE, MAX_OBJECTIVE))
        set_(self, "ce_gap", check_float(self.ce_gap, "ce_gap", 0.0, MAX_OBJECTIVE))

    def weight_map(self) -> dict[str, float]:
        """``{endpoint: weight}``."""
        return dict(zip(self.endpoints, self.weights, strict=True))


def canonical_recommendation_bytes(fields_: Mapping[str, str]) -> bytes:
    """What the signature covers: a context line, then ``name=<len>:<value>\\n`` per field.

    Fields are taken in the fixed order of the protocol (every field but ``sig``), with the
    exact strings that travel in the entry, length-prefixed in UTF-8 bytes so that no two
    different entries share an encoding and no float is re-formatted on the way.
    """
    parts = [SIGNATURE_CONTEXT]
    for name in UNSIGNED_FIELDS:
        value = fields_[name].encode("utf-8")
        parts.append(b"%s=%d:%s\n" % (name.encode("ascii"), len(value), value))
    return b"".join(parts)


def encode_recommendation(rec: Recommendation) -> dict[str, str]:
    """The unsigned fields of ``rec`` (use :func:`sign_recommendation` to publish)."""
    return {
        "v": str(rec.version),
        "type": "recommendation",
        "upstream": rec.upstream,
        "sidecar": rec.sidecar,
        "epoch": str(rec.epoch),
        "issued_at": number_text(rec.issued_at),
        "expires_at": number_text(rec.expires_at),
        "endpoints": compact_json(list(rec.endpoints)),
        "weights": compact_json(list(rec.weights)),
        "status": rec.status,
        "objective": number_text(rec.objective),
        "ce_gap": number_text(rec.ce_gap),
        "signer": rec.signer,
        "fence": str(rec.fence),
    }


def sign_recommendation(rec: Recommendation, key: bytes | Sequence[bytes]) -> dict[str, str]:
    """XADD fields of ``rec`` with ``sig`` = unpadded base64url HMAC-SHA256 under ``key``.

    With several keys (rotation) the first one signs. Raises :class:`WireError` for a short key.
    """
    signing_key = accepted_keys(key)[0]
    out = encode_recommendation(rec)
    out["sig"] = mac(signing_key, canonical_recommendation_bytes(out))
    return out


_SIGNED_FORMAT = SIGNATURE_CONTEXT + b"".join(
    name.encode("ascii") + b"=%d:%s\n" for name in UNSIGNED_FIELDS)
"""canonical_recommendation_bytes as one format: each field's length and value in turn."""


def sign_recommendations(
    common: Recommendation,
    own: Sequence[tuple[str, tuple[str, ...], tuple[float, ...]]],
    key: bytes | Sequence[bytes],
) -> list[dict[str, str]]:
    """``sign_recommendation(replace(common, sidecar=s, endpoints=e, weights=w), key)`` for
    each ``(s, e, w)`` of ``own``, equal field for field, with each check and encoding done
    once per distinct value (a signaler signs one recommendation per sidecar per epoch, and
    with many sidecars they share a handful of endpoint lists and weight vectors).

    Raises :class:`WireError` as :class:`Recommendation` would for a bad sidecar id, endpoint
    list or weight vector.
    """
    signing_key = accepted_keys(key)[0]
    template = encode_recommendation(common)
    checked: dict[tuple[tuple[str, ...], tuple[float, ...]], tuple[str, str]] = {}
    sidecar_at = UNSIGNED_FIELDS.index("sidecar")
    endpoints_at = UNSIGNED_FIELDS.index("endpoints")
    weights_at = UNSIGNED_FIELDS.index("weights")
    values = [template[name].encode("utf-8") for name in UNSIGNED_FIELDS]
    out: list[dict[str, str]] = []
    for sidecar, endpoints, weights in own:
        check_name(sidecar, "sidecar")
        texts = checked.get((endpoints, weights))
        if texts is None:  # validated and encoded as the Recommendation would be
            rec = replace(common, endpoints=endpoints, weights=weights)
            texts = checked[(endpoints, weights)] = (compact_json(list(rec.endpoints)),
                                                     compact_json(list(rec.weights)))
        fields = dict(template)
        fields["sidecar"], fields["endpoints"], fields["weights"] = sidecar, *texts
        values[sidecar_at] = sidecar.encode("utf-8")
        values[endpoints_at] = texts[0].encode("utf-8")
        values[weights_at] = texts[1].encode("utf-8")
        args: list[object] = []
        for value in values:
            args += (len(value), value)
        fields["sig"] = mac(signing_key, _SIGNED_FORMAT % tuple(args))
        out.append(fields)
    return out


def _decode_fields(raw: Mapping[str, str]) -> Recommendation:
    return Recommendation(
        upstream=raw["upstream"],
        sidecar=raw["sidecar"],
        epoch=parse_int(raw["epoch"], "epoch"),
        issued_at=parse_float(raw["issued_at"], "issued_at"),
        expires_at=parse_float(raw["expires_at"], "expires_at"),
        endpoints=tuple(json_list(raw["endpoints"], "endpoints")),
        weights=tuple(json_list(raw["weights"], "weights")),
        status=raw["status"],
        objective=parse_float(raw["objective"], "objective"),
        ce_gap=parse_float(raw["ce_gap"], "ce_gap"),
        signer=raw["signer"],
        fence=parse_int(raw["fence"], "fence"),
    )


def verify_recommendation(
    entry: Mapping[bytes | str, bytes | str],
    key: bytes | Sequence[bytes],
    now: float,
    expected_upstream: str,
    expected_sidecar: str,
    *,
    min_epoch: int | None = None,
    min_fence: int | None = None,
    max_skew: float = 5.0,
    expected_endpoints: Sequence[str] | None = None,
) -> Recommendation:
    """Check a recommendation entry and return it, or raise :class:`WireError`.

    Order of the checks (the first failure is the reason): sizes (``oversized``), field set and
    version (``malformed``/``version``), presence of ``sig`` (``unsigned``), the MAC in constant
    time against each accepted key (``bad-signature``), the values (``malformed``), then
    ``wrong-upstream``, ``wrong-sidecar``, ``endpoint-mismatch`` (only with
    ``expected_endpoints``: the recommendation must name exactly that set), ``stale`` (epoch
    below ``min_epoch``), ``fenced`` (fence below ``min_fence``), ``not-yet-valid`` (issued more
    than ``max_skew`` s after ``now``) and ``expired`` (``now >= expires_at``). Values are only
    interpreted after the MAC verified, so unauthenticated senders learn little.
    """
    keys = accepted_keys(key)
    try:
        raw = text_fields(entry, RECOMMENDATION_FIELDS, "recommendation")
        if "sig" not in raw or raw["sig"] == "":
            raise fail("recommendation carries no signature", Reason.UNSIGNED)
        if not SIGNATURE_RE.fullmatch(raw["sig"]):
            raise fail("signature is not 43 base64url characters", Reason.BAD_SIGNATURE)
        if not verify_mac(keys, canonical_recommendation_bytes(raw), raw["sig"]):
            raise fail("signature does not verify under the mesh key", Reason.BAD_SIGNATURE)
        rec = _decode_fields(raw)
    except WireError:
        raise
    except Exception as exc:  # a decoder never lets anything else escape
        raise unexpected(exc) from exc

    if rec.upstream != expected_upstream:
        raise fail(f"for upstream {rec.upstream!r}, not {expected_upstream!r}",
                   Reason.WRONG_UPSTREAM)
    if rec.sidecar != expected_sidecar:
        raise fail(f"for sidecar {rec.sidecar!r}, not {expected_sidecar!r}", Reason.WRONG_SIDECAR)
    if expected_endpoints is not None and set(rec.endpoints) != set(expected_endpoints):
        raise fail(
            f"endpoints {sorted(rec.endpoints)} differ from the known {sorted(expected_endpoints)}",
            Reason.ENDPOINT_MISMATCH,
        )
    if min_epoch is not None and rec.epoch < min_epoch:
        raise fail(f"epoch {rec.epoch} is older than {min_epoch}", Reason.STALE)
    if min_fence is not None and rec.fence < min_fence:
        raise fail(f"fence {rec.fence} from {rec.signer!r} was superseded by {min_fence}",
                   Reason.FENCED)
    if rec.issued_at > now + max_skew:
        raise fail(f"issued {rec.issued_at - now:.3f}s in the future (skew {max_skew:g}s)",
                   Reason.NOT_YET_VALID)
    if now >= rec.expires_at:
        raise fail(f"expired {now - rec.expires_at:.3f}s ago", Reason.EXPIRED)
    return rec
