"""Settings of the sidecar's inbound side and of its caller identity: parsing and validation.

Owns the ``policing:`` section of the config file and the ``--app`` URL check. Nothing here
opens a socket: :mod:`sidecar.config` calls :func:`parse_policing` and :func:`parse_app_url`
while it validates a layer (so a bad value is a ``ConfigError`` naming its source), and
:mod:`sidecar.inbound` / :mod:`sidecar.identity_phase` read the resulting
:class:`PolicingSettings`.

Config file shape (every key optional; the numbers shown are the defaults)::

    inbound: 0.0.0.0:15006          # the listener in front of the app (flag --inbound)
    app: http://127.0.0.1:8080      # the local app (flag --app)
    mesh_secret_file: /etc/equilibrium/mesh.key   # or env EQUILIBRIUM_MESH_SECRET
    policing:
      mode: equilibrium             # equilibrium | token-bucket | off (the bench baselines)
      capacity: auto                # app capacity in requests/s; auto = learned (see below)
      max_wait: 2                   # seconds a request may wait in the bid queue, then 503
      identity_max_skew: 30         # seconds an X-GT-Identity stays valid
      max_caller_labels: 20         # callers with their own metric label; the rest "other"
      debug_callers: 20             # busiest callers shown in the admin /debug/state
      default_bid: 1                # bid this sidecar sends when its app sets none
      upload_timeout: 30            # seconds for a request body to arrive in full (else 408)
      upload_buffer: 262144         # bytes of a body received before it asks for an app slot
      upload_memory: 33554432       # bytes all such buffers hold together (then: streamed)
      header_timeout: 10            # seconds for a request head (from connect, or the 1st byte)
      keepalive_timeout: 60         # seconds an idle keep-alive connection stays open
      max_connections: 4096         # open on the inbound listener (at most half the file limit)
      max_connections_per_source: 512   # open from one peer address
      websocket_max_message: 1048576    # bytes of one WebSocket message (larger: close 1009)
      websocket_max_per_caller: 64      # WebSockets open per caller (more: 429)
      app_check_path: null          # e.g. /healthz: GET it when the app is idle, for probes
      long_paths: []                # path prefixes of long requests (watches, long polls,
                                    # gRPC streams: /pkg.Svc/Watch): admitted outside the limit
      long_event_stream: false      # so are GETs that accept text/event-stream (SSE)
      token_bucket: {rate: 100, burst: 100}      # mode token-bucket (Envoy local rate limit)
      reputation: {rate_tolerance: 1.5, ...}     # mesh.reputation.PolicingParams fields
      ladder: {base_punishment: 10, ...}         # mesh.reputation.LadderRules fields
      concurrency: {initial_limit: 20, ...}      # mesh.concurrency.ConcurrencyParams fields
      auction: {budget_rate: 10, ...}            # mesh.auction.AuctionParams fields

``capacity: auto`` estimates the app's throughput by Little's law from the adaptive
concurrency limit and the RTT measured under load (``limit / meanRTT``,
:meth:`mesh.concurrency.AdaptiveConcurrencyLimit.capacity_estimate`); a number fixes it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from mesh.auction import AuctionParams
from mesh.concurrency import ConcurrencyParams
from mesh.reputation import LadderRules, PolicingParams
from sidecar.inbound_site import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_PER_SOURCE,
)
from sidecar.upload import DEFAULT_UPLOAD_BUFFER, DEFAULT_UPLOAD_MEMORY, DEFAULT_UPLOAD_TIMEOUT
from sidecar.websocket import DEFAULT_MAX_MESSAGE, DEFAULT_MAX_PER_CALLER
from wire.bid import MAX_BID
from wire.long_paths import is_path, parse_long_paths
from wire.numerals import ascii_decimal

MODES = ("equilibrium", "token-bucket", "off")


@dataclass(frozen=True, slots=True)
class PolicingSettings:
    """Everything the inbound listener and the caller phases are tuned by."""

    mode: str = "equilibrium"
    capacity: float | None = None  # None: auto
    max_wait: float = 2.0
    identity_max_skew: float = 30.0
    max_caller_labels: int = 20
    debug_callers: int = 20
    default_bid: float = 1.0
    upload_timeout: float = DEFAULT_UPLOAD_TIMEOUT
    upload_buffer: int = DEFAULT_UPLOAD_BUFFER
    upload_memory: int = DEFAULT_UPLOAD_MEMORY
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    keepalive_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_source: int = DEFAULT_MAX_PER_SOURCE
    websocket_max_message: int = DEFAULT_MAX_MESSAGE
    websocket_max_per_caller: int = DEFAULT_MAX_PER_CALLER
    app_check_path: str | None = None  # sidecar.probe_answer's idle check (None: off)
    long_paths: tuple[str, ...] = ()  # declared long requests (docs/policing.md, "Congestion")
    long_event_stream: bool = False
    token_bucket_rate: float = 100.0
    token_bucket_burst: float = 100.0
    reputation: PolicingParams = field(default_factory=PolicingParams)
    concurrency: ConcurrencyParams = field(default_factory=ConcurrencyParams)
    auction: AuctionParams = field(default_factory=AuctionParams)


_SECTIONS = ("reputation", "ladder", "concurrency", "auction", "token_bucket")
_TOP_KEYS = frozenset(
    {"mode", "capacity", "max_wait", "identity_max_skew", "max_caller_labels", "debug_callers",
     "default_bid", "upload_timeout", "upload_buffer", "upload_memory", "header_timeout",
     "keepalive_timeout", "max_connections", "max_connections_per_source", "websocket_max_message",
     "websocket_max_per_caller", "app_check_path", "long_paths", "long_event_stream",
     *_SECTIONS}
)


def parse_app_url(value: Any) -> str:
    """``http://host:port`` of the local app, normalised; ValueError says what is wrong."""
    text = str(value).strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"app: bad URL {text!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"app: expected http://HOST:PORT, got {text!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"app: {text!r} must be scheme://host[:port] only")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default_port = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{host}:{port if port is not None else default_port}"


def _number(value: Any, what: str, *, integer: bool = False, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{what}: expected a number, got {value!r}")
    try:  # a string must be a plain ASCII decimal; a huge int overflows float()
        number = float(value) if not isinstance(value, str) else ascii_decimal(value.strip())
    except OverflowError:
        number = math.inf
    if number is None:
        raise ValueError(f"{what}: expected a finite decimal number, got {value!r:.32}")
    if not math.isfinite(number) or number < low:
        raise ValueError(f"{what}: must be a finite number >= {low:g}, got {number:g}")
    if integer and number != int(number):
        raise ValueError(f"{what}: expected an integer, got {value!r}")
    return number


def _section(cls: type, defaults: Any, raw: Any, what: str, skip: frozenset[str]) -> Any:
    """A copy of the dataclass ``defaults`` with the numeric fields given in ``raw``."""
    if raw is None:
        return defaults
    if not isinstance(raw, Mapping):
        raise ValueError(f"{what}: expected a mapping of settings")
    names = {f.name for f in dataclasses.fields(cls)} - skip
    changes: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise ValueError(f"{what}: unknown key {key!r}; known: {', '.join(sorted(names))}")
        current = getattr(defaults, name)
        integer = isinstance(current, int) and not isinstance(current, bool)
        number = _number(value, f"{what}.{name}", integer=integer)
        changes[name] = int(number) if integer else number
    try:
        return dataclasses.replace(defaults, **changes)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


def parse_policing(raw: Any) -> PolicingSettings:
    """The ``policing:`` mapping -> :class:`PolicingSettings`; ValueError names the bad key."""
    if raw is None:
        return PolicingSettings()
    if not isinstance(raw, Mapping):
        raise ValueError("policing: expected a mapping of settings")
    for key in raw:
        if str(key).replace("-", "_") not in _TOP_KEYS:
            raise ValueError(
                f"policing: unknown key {key!r}; known: {', '.join(sorted(_TOP_KEYS))}"
            )
    get = {str(k).replace("-", "_"): v for k, v in raw.items()}.get
    given = get("mode", "equilibrium")
    # YAML 1.1 reads an unquoted `off` (and `no`, `false`) as false: the mode the docs write
    # as `mode: off` arrives as a boolean
    mode = "off" if given is False else str(given).strip()
    if mode not in MODES:
        hint = (" (an unquoted on/yes/true reads as a YAML boolean)" if given is True else "")
        raise ValueError(f"policing.mode: unknown {mode!r}{hint}; choose one of "
                         f"{', '.join(MODES)}")
    capacity_raw = get("capacity", "auto")
    capacity = (None if str(capacity_raw).strip() == "auto"
                else _number(capacity_raw, "policing.capacity", low=1e-9))
    bucket = get("token_bucket") or {}
    if not isinstance(bucket, Mapping):
        raise ValueError("policing.token_bucket: expected {rate: N, burst: N}")
    unknown = set(map(str, bucket)) - {"rate", "burst"}
    if unknown:
        raise ValueError(f"policing.token_bucket: unknown key(s) {sorted(unknown)}; "
                         "known: burst, rate")
    ladder = _section(LadderRules, LadderRules(), get("ladder"), "policing.ladder", frozenset())
    reputation = _section(
        PolicingParams, PolicingParams(ladder=ladder), get("reputation"),
        "policing.reputation", frozenset({"ladder", "capacity"}),
    )
    default_bid = _number(get("default_bid", 1.0), "policing.default_bid")
    if default_bid > MAX_BID:
        raise ValueError(f"policing.default_bid: must be at most {MAX_BID:g}")
    check = get("app_check_path")
    if check is not None and not is_path(check):
        raise ValueError("policing.app_check_path: expected a path such as /healthz")
    long_paths = parse_long_paths(get("long_paths", []), "policing.long_paths")
    event_stream = get("long_event_stream", False)
    if not isinstance(event_stream, bool):
        raise ValueError("policing.long_event_stream: expected true or false")
    settings = PolicingSettings(
        mode=mode,
        app_check_path=check,
        long_paths=long_paths,
        long_event_stream=event_stream,
        capacity=capacity,
        max_wait=_number(get("max_wait", 2.0), "policing.max_wait", low=0.001),
        identity_max_skew=_number(get("identity_max_skew", 30.0), "policing.identity_max_skew",
                                  low=1.0),
        max_caller_labels=int(_number(get("max_caller_labels", 20), "policing.max_caller_labels",
                                      integer=True, low=1)),
        debug_callers=int(_number(get("debug_callers", 20), "policing.debug_callers",
                                  integer=True, low=1)),
        default_bid=default_bid,
        upload_timeout=_number(get("upload_timeout", DEFAULT_UPLOAD_TIMEOUT),
                               "policing.upload_timeout", low=0.01),
        upload_buffer=int(_number(get("upload_buffer", DEFAULT_UPLOAD_BUFFER),
                                  "policing.upload_buffer", integer=True, low=0)),
        upload_memory=int(_number(get("upload_memory", DEFAULT_UPLOAD_MEMORY),
                                  "policing.upload_memory", integer=True, low=0)),
        header_timeout=_number(get("header_timeout", DEFAULT_HEADER_TIMEOUT),
                               "policing.header_timeout", low=0.01),
        keepalive_timeout=_number(get("keepalive_timeout", DEFAULT_IDLE_TIMEOUT),
                                  "policing.keepalive_timeout", low=0.0),
        max_connections=int(_number(get("max_connections", DEFAULT_MAX_CONNECTIONS),
                                    "policing.max_connections", integer=True, low=1)),
        max_connections_per_source=int(_number(
            get("max_connections_per_source", DEFAULT_MAX_PER_SOURCE),
            "policing.max_connections_per_source", integer=True, low=1)),
        websocket_max_message=int(_number(get("websocket_max_message", DEFAULT_MAX_MESSAGE),
                                          "policing.websocket_max_message", integer=True,
                                          low=1)),
        websocket_max_per_caller=int(_number(
            get("websocket_max_per_caller", DEFAULT_MAX_PER_CALLER),
            "policing.websocket_max_per_caller", integer=True, low=1)),
        token_bucket_rate=_number(bucket.get("rate", 100.0), "policing.token_bucket.rate",
                                  low=1e-9),
        token_bucket_burst=_number(bucket.get("burst", 100.0), "policing.token_bucket.burst",
                                   low=1.0),
        reputation=reputation,
        concurrency=_section(ConcurrencyParams, ConcurrencyParams(), get("concurrency"),
                             "policing.concurrency", frozenset()),
        auction=_section(AuctionParams, AuctionParams(), get("auction"), "policing.auction",
                         frozenset()),
    )
    return settings
