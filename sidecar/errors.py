"""The sidecar's reason vocabularies: why it answered a request itself, why it dropped a header.

Owns :class:`ErrorReason` and :class:`HeaderDrop`. Their values are stable: they are metric
label values (``equilibrium_errors{reason}``, ``equilibrium_requests{code}`` for an attempt
that got no response, ``equilibrium_rejected_headers{reason}``,
``equilibrium_inbound_stripped_headers{source}``) and the ``reason`` of the JSON error bodies
both listeners answer with, which apps, docs and dashboards read. docs/operations.md, "Error
reasons", lists them with the other vocabularies (:class:`wire.errors.Reason` for refused wire
values, :class:`mesh.admission.RejectReason` for the admission gate's refusals,
:class:`sidecar.inbound_policing.InboundOutcome`, :class:`sidecar.transparent.PassthroughFailure`).
Values only: nothing here answers a request or counts anything.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorReason(StrEnum):
    """Why the sidecar answered a request with an error instead of the upstream's (or the
    app's) answer; the HTTP status goes with it where the reason is used."""

    # the request cannot be routed (outbound)
    CONNECT_NOT_SUPPORTED = "connect-not-supported"
    """501: a CONNECT tunnel."""
    NO_HOST = "no-host"
    """400: neither ``Host`` nor an absolute URL."""
    LOOP_DETECTED = "loop-detected"
    """508: the request already passed this sidecar (its ``Via``)."""
    UNKNOWN_UPSTREAM = "unknown-upstream"
    """404: no upstream of that name."""
    NO_ENDPOINT = "no-endpoint"
    """503: the upstream has no endpoint to use."""
    # an attempt failed (both listeners; sidecar.transport.classify)
    CONNECT_TIMEOUT = "connect-timeout"
    """502: no connection within the connect timeout (nothing sent)."""
    CONNECT_ERROR = "connect-error"
    """502: the connection was refused or unreachable (nothing sent)."""
    UPSTREAM_TIMEOUT = "upstream-timeout"
    """504: no response head within the request timeout."""
    UPSTREAM_RESET = "upstream-reset"
    """502: the connection closed before any of the answer came back."""
    UPSTREAM_REFUSED = "upstream-refused"
    """503: the endpoint's sidecar sent the request away before its app saw it (a signed
    ``X-GT-Refused``: queue full, no slot in time, shutting down), and no other endpoint
    could take it (none left untried, the attempts or the retry budget spent)."""
    UPSTREAM_PROTOCOL_ERROR = "upstream-protocol-error"
    """502: any other failure of the attempt (an answer that is not valid HTTP/1.1, ...)."""
    DEADLINE_EXCEEDED = "deadline-exceeded"
    """504 (gRPC ``DEADLINE_EXCEEDED``): the call's ``grpc-timeout`` passed before it ended
    (HTTP/2; charged to the endpoint when its attempt was out then)."""
    BAD_GRPC_TIMEOUT = "bad-grpc-timeout"
    """400 (gRPC ``INTERNAL``): a ``grpc-timeout`` that is not one (HTTP/2)."""
    REFUSED_STREAM = "refused-stream"
    """The endpoint refused the stream unprocessed (HTTP/2 ``REFUSED_STREAM``, or a GOAWAY
    that left it out) and no attempt was left: relayed as such (HTTP/2)."""
    BODY_RELAY_FAILED = "body-relay-failed"
    """The response head was sent but its body broke off: the connection is cut (metric
    only: no body can be sent any more). A body that breaks or stalls before its first byte
    was relayed (the head waits to share a write with it) is answered instead: 502
    ``upstream-protocol-error`` or 504 ``upstream-timeout``."""
    RESCUED = "rescued"
    """An attempt given up at an endpoint ejected while it held it, and sent to another
    (``--rescue``, :mod:`sidecar.rescue`): counted in ``equilibrium_requests{code}`` of the
    endpoint it was given up at, where nothing else would show what that endpoint held
    (metric only: the request goes on elsewhere)."""
    APP_HUNG_UP = "app-hung-up"
    """The app closed its connection while the response body was being relayed: the app's
    doing, not the endpoint's (metric only; the upstream connection is kept if the rest of the
    body can be drained within a small budget). Also, 400 when the app can still read it:
    its upload ended short of its ``Content-Length`` (a half-close) or broke its chunked
    framing (the listener cut it); the attempt is observed unanswered but not failed."""
    APP_STALLED = "app-stalled"
    """The answer did not move for the request timeout because the app was not taking it
    (what the sidecar wrote stayed queued): it stopped reading, or reads more slowly than
    the socket's buffers let the relay see progress. The app's doing, not the endpoint's;
    both connections are cut (metric only)."""
    BAD_TARGET = "bad-target"
    """400: a request target that is not a path (``/...``). On the inbound listener an
    absolute URL, ``*`` or ``host:port`` means the caller took the app for a proxy; on the
    outbound listener (which takes absolute URLs) ``*`` or ``host:port`` cannot be routed."""
    WEBSOCKET_NOT_SUPPORTED = "websocket-not-supported"
    """501: the transport cannot carry WebSockets."""
    WEBSOCKET_HANDSHAKE_FAILED = "websocket-handshake-failed"
    """502: the upstream (or the app) refused the upgrade."""
    # the caller's own conduct (inbound; issue 14)
    UPLOAD_TIMEOUT = "upload-timeout"
    """408: the request body did not arrive within the upload deadline (the inbound listener,
    :mod:`sidecar.upload`), or stalled for ``request_timeout`` on its way out (the outbound
    listener; the app's doing: not charged to the endpoint)."""
    UPLOAD_ABANDONED = "upload-abandoned"
    """400: the client went away before its request body was complete (seen only in metrics)."""
    WEBSOCKET_LIMIT = "websocket-limit"
    """429: the caller already has its maximum of open WebSockets through the inbound listener."""
    FOREIGN_CALLER = "foreign-caller"
    """The outbound listener refused a connection from outside the pod (closed, metric only)."""
    # policing (JSON bodies only; counted by the policing metrics)
    BAD_BID = "bad-bid"
    """400: a malformed ``X-Equilibrium-Bid`` from the app, or ``X-GT-Bid`` from a caller."""
    PUNISHED_BACKOFF = "punished-backoff"
    """429: an upstream punishes this caller; its own sidecar backs off."""
    PUNISHED_PROBATION = "punished-probation"
    """429: an upstream's punishment of this caller ended; its own sidecar paces the return
    (:mod:`mesh.probation`)."""
    LOCAL_RATE_LIMITED = "local-rate-limited"
    """429: the ``token-bucket`` baseline's bucket is empty (inbound)."""


class HeaderDrop(StrEnum):
    """Why a game header (``X-GT-*``) was dropped before it could be acted on."""

    FROM_APP = "from-app"
    """Sent by an app (on its request, or on its response): only sidecars speak the game."""
    MALFORMED = "malformed"
    """An upstream's value that failed validation."""
    UNTRUSTED = "untrusted"
    """Sent by a caller whose identity did not verify (ignored)."""
    IN_TRAILERS = "in-trailers"
    """In a body's trailer section, where no game signal rides (dropped, never believed)."""


UNREACHED = frozenset({ErrorReason.CONNECT_ERROR, ErrorReason.CONNECT_TIMEOUT})
"""Failures to reach an upstream (or the app) after which it cannot have seen the request.
The inbound listener answers them with a signed refusal (``app-unreachable``), which the
caller's sidecar may send to another endpoint."""


class BrokenBody(ConnectionError):
    """A request body that broke its framing mid-way (a bad chunk size, endless chunk
    extensions or trailers): to its reader, the app gave up on it (a ConnectionError, as
    when it hangs up), though it may still read an answer. (Here, not in the compiled
    :mod:`sidecar.http1.server` that raises it: mypyc cannot compile a subclass of a
    built-in exception other than ``Exception``.)"""
