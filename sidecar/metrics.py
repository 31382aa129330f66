"""The sidecar's Prometheus metrics: every family the sidecar exports, by part, in one
registry per process (never the global one).

Owns metric names, labels, help texts and buckets; ``k8s/observability/`` (alert rules and the
Grafana dashboard) and the docs use them as they are spelled here, and
``tests/unit/test_metric_families.py`` holds the list a rename must change too. One holder per
part of the sidecar, each built on the process's registry and handed to its part's constructor:

- :class:`SidecarMetrics`: the process (the registry, reloads, draining) and the parts that are
  always on: ``outbound`` (:class:`OutboundMetrics`: requests, errors, retries, routing gauges)
  and ``caller`` (:class:`CallerMetrics`: the outbound identity phase, self-enforced back-off);
- :class:`InboundMetrics`: the inbound listener and its policing (``--inbound``);
- :class:`SignalingMetrics`: the signaling plane (``redis``);
- :class:`DiscoveryMetrics`: Kubernetes discovery (``discovery``);
- :class:`TransparentMetrics`: transparent interception (``transparent``).

The parts that are off register nothing, so ``/metrics`` shows only what runs. The request
path only increments counters and observes histograms; the gauges are set off it (routing
gauges from the snapshot rebuilt at each policy tick, the inbound gauges by a refresh task).
Label values are bounded by the config, by the bounded caller labels of the inbound side, and
by the reason vocabularies (documented in docs/operations.md, "Error reasons").
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Callable
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from mesh.estimators import LATENCY_BUCKETS  # the buckets of the signaling epoch windows too
from mesh.policy import PolicySnapshot
from wire.bid import APP_BID_HEADER

CONTENT_TYPE = CONTENT_TYPE_LATEST


# ---------------------------------------------------------------------- outbound



def _value_inc(child: Any) -> Callable[[float], None]:
    """The increment of one labelled counter or gauge child, without prometheus_client's
    per-call checks (a non-negative amount is the caller's to pass); the child's own
    ``inc`` when the library's internals are not the ones this was written against."""
    value = getattr(child, "_value", None)
    inc = getattr(value, "inc", None)
    if callable(inc) and not getattr(child, "_is_most_recent", False):
        return cast("Callable[[float], None]", inc)
    return cast("Callable[[float], None]", child.inc)


class FastObserver:
    """``observe()`` of one labelled histogram child without prometheus_client's per-call
    checks and linear bucket walk: the bucket found by bisection, then the same two
    increments (the bucket's and the sum's). Falls back to the child's own ``observe`` when
    the library's internals are not the ones this was written against."""

    __slots__ = ("_bounds", "_buckets", "_child", "_sum")

    def __init__(self, child: Any) -> None:
        self._child = child
        bounds = getattr(child, "_upper_bounds", None)
        buckets = getattr(child, "_buckets", None)
        total = getattr(child, "_sum", None)
        ok = (isinstance(bounds, list) and isinstance(buckets, list)
              and len(bounds) == len(buckets) and total is not None)
        self._bounds: list[float] | None = bounds if ok else None
        self._buckets: list[Any] = buckets if ok and buckets is not None else []
        self._sum: Any = total

    def observe(self, amount: float) -> None:
        bounds = self._bounds
        if bounds is None or amount != amount:  # NaN: the library's own handling
            self._child.observe(amount)
            return
        self._sum.inc(amount)
        self._buckets[bisect.bisect_left(bounds, amount)].inc(1)

class OutboundMetrics:
    """The outbound listener: attempts, errors, retries and the routing gauges."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = r = registry
        self.requests = Counter(
            "equilibrium_requests",
            "Attempts forwarded, by upstream, endpoint and response code (or, for an attempt "
            "that got no response, the error reason: connect-error, upstream-reset, ...)",
            ["upstream", "endpoint", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "equilibrium_request_duration_seconds",
            "Time from forwarding a request to the upstream's response head",
            ["upstream", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "equilibrium_errors",
            "Requests answered by the sidecar itself with an error, by reason",
            ["upstream", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "equilibrium_retries", "Retries sent to another endpoint", ["upstream"], registry=r
        )
        self.refused = Counter(
            "equilibrium_upstream_refused",
            "Attempts an endpoint's sidecar refused before its app saw them (signed "
            "X-GT-Refused: queue-full, queue-timeout, shutting-down, app-unreachable), or "
            "whose app's connection broke before an answer (app-reset), by reason; the request "
            "may go to another endpoint (after app-reset, only an idempotent one without a "
            "body)",
            ["upstream", "reason"],
            registry=r,
        )
        self.retry_budget_exhausted = Counter(
            "equilibrium_retry_budget_exhausted",
            "Retries not sent because the retry budget was empty",
            ["upstream"],
            registry=r,
        )
        self.rescues = Counter(
            "equilibrium_rescued",
            "Bodiless idempotent requests given up at an endpoint that was ejected while it "
            "held them (hung, or failing in a row) and sent to another endpoint "
            "(sidecar/rescue.py); each is counted as a retry too",
            ["upstream"],
            registry=r,
        )
        self.hedges = Counter(
            "equilibrium_hedges",
            "Hedged exploration (mesh.hedging): sent = a request to an explored endpoint also "
            "sent to the best one, won = the backup answered first, cancelled = a racer "
            "cancelled because the other answered first, ran-on = an explored endpoint that "
            "lost left to run on (up to 2 s) so that its latency is learned, "
            "budget-exhausted = a hedge not sent "
            "because the retry budget was empty",
            ["upstream", "result"],
            registry=r,
        )
        self.in_flight = Gauge(
            "equilibrium_in_flight", "Requests in flight through the outbound listener",
            ["upstream"], registry=r,
        )
        self.rejected_headers = Counter(
            "equilibrium_rejected_headers",
            "Game headers dropped: from-app = X-GT-* sent by the app (stripped), "
            "malformed = an upstream's X-GT-* value that failed validation",
            ["header", "reason"],
            registry=r,
        )
        self.route_weight = Gauge(
            "equilibrium_route_weight", "Share of traffic the policy routes to each endpoint",
            ["upstream", "endpoint"], registry=r,
        )
        self.regret = Gauge(
            "equilibrium_regret", "Regret toward each endpoint (seconds of latency)",
            ["upstream", "endpoint"], registry=r,
        )
        self.latency_estimate = Gauge(
            "equilibrium_latency_estimate_seconds", "The policy's latency estimate per endpoint",
            ["upstream", "endpoint"], registry=r,
        )
        self.ejections = Counter(
            "equilibrium_endpoint_ejections",
            "Endpoints taken out of use by the policy, by reason (failures: its requests "
            "failed in a row, out for 10 s doubling; hung: it left requests unanswered, out "
            "for 5 s, longer when its re-checks time out again and again); counted at the "
            "policy's tick",
            ["upstream", "endpoint", "reason"], registry=r,
        )
        self._ejected: dict[tuple[str, str], tuple[int, int]] = {}
        self.nash_gap = Gauge(
            "equilibrium_nash_gap", "Wardrop/Nash gap of the current routing", ["upstream"],
            registry=r,
        )
        self.flapping = Gauge(
            "equilibrium_flapping", "Window-to-window change of the traffic shares", ["upstream"],
            registry=r,
        )
        self.converged = Gauge(
            "equilibrium_converged", "1 when the routing has settled", ["upstream"], registry=r
        )
        self._endpoint_labels: dict[str, set[str]] = {}
        # labelled children of the request-path metrics, looked up once (labels() takes a lock)
        self._children: dict[tuple[str, ...], Any] = {}
        self._in_flight: dict[str, Callable[[float], None]] = {}
        self._forwarded: dict[tuple[str, str, str],
                              tuple[Callable[[float], None], FastObserver]] = {}

    # ---------------------------------------------------------------- request path

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric._name, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request_in_flight(self, upstream: str, delta: int) -> None:
        inc = self._in_flight.get(upstream)
        if inc is None:
            inc = self._in_flight[upstream] = _value_inc(self._child(self.in_flight, upstream))
        inc(delta)

    def forwarded(self, upstream: str, endpoint: str, code: str, latency: float | None) -> None:
        """One attempt got an answer (``code``) or failed (``code`` = the error reason)."""
        key = (upstream, endpoint, code)
        pair = self._forwarded.get(key)
        if pair is None:
            pair = self._forwarded[key] = (
                _value_inc(self._child(self.requests, upstream, endpoint, code)),
                FastObserver(self._child(self.latency, upstream, endpoint)))
        pair[0](1)
        if latency is not None:
            pair[1].observe(latency)

    # ---------------------------------------------------------------- off the request path

    def observe_snapshot(self, upstream: str, snapshot: PolicySnapshot) -> None:
        """Set the routing gauges from a fresh snapshot (off the request path)."""
        self.nash_gap.labels(upstream).set(snapshot.nash_gap)
        self.flapping.labels(upstream).set(snapshot.flapping)
        self.converged.labels(upstream).set(1.0 if snapshot.converged else 0.0)
        seen: set[str] = set()
        for view in snapshot.endpoints:
            seen.add(view.endpoint)
            self.route_weight.labels(upstream, view.endpoint).set(view.weight)
            self.regret.labels(upstream, view.endpoint).set(view.regret)
            self.latency_estimate.labels(upstream, view.endpoint).set(view.latency_estimate)
            key = (upstream, view.endpoint)
            before = self._ejected.setdefault(key, view.ejected)  # first seen: the baseline
            if view.ejected != before:
                for reason, now_, then in zip(("failures", "hung"), view.ejected, before,
                                              strict=True):
                    if now_ > then:
                        self.ejections.labels(upstream, view.endpoint, reason).inc(now_ - then)
                self._ejected[key] = view.ejected
        for gone in self._endpoint_labels.get(upstream, set()) - seen:
            self._remove_endpoint(upstream, gone)
        self._endpoint_labels[upstream] = seen

    def forget_upstream(self, upstream: str) -> None:
        for gone in self._endpoint_labels.pop(upstream, set()):
            self._remove_endpoint(upstream, gone)
        for gauge in (self.nash_gap, self.flapping, self.converged):
            with contextlib.suppress(KeyError):
                gauge.remove(upstream)

    def _remove_endpoint(self, upstream: str, endpoint: str) -> None:
        for gauge in (self.route_weight, self.regret, self.latency_estimate):
            with contextlib.suppress(KeyError):
                gauge.remove(upstream, endpoint)
        self._ejected.pop((upstream, endpoint), None)
        for reason in ("failures", "hung"):
            with contextlib.suppress(KeyError):
                self.ejections.remove(upstream, endpoint, reason)


class CallerMetrics:
    """The outbound identity phase (:mod:`sidecar.identity_phase`): this sidecar as a caller."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.backoff = Counter(
            "equilibrium_caller_backoff",
            "Requests answered 429 locally because an upstream punishes this caller",
            ["upstream"], registry=registry,
        )
        self.probation = Counter(
            "equilibrium_caller_probation",
            "Requests answered 429 locally while this caller ramps back up after a punishment",
            ["upstream"], registry=registry,
        )
        self.punished = Gauge(
            "equilibrium_caller_punished",
            "1 while this caller backs off from an upstream that punishes it",
            ["upstream"], registry=registry,
        )
        self.bad_app_bids = Counter(
            "equilibrium_caller_bad_app_bids",
            f"Malformed {APP_BID_HEADER} values from the app, answered 400", ["reason"],
            registry=registry,
        )
        self.bad_signals = Counter(
            "equilibrium_caller_bad_signals",
            "X-GT-Reputation/X-GT-Price values from an upstream that failed validation "
            "(ignored)", ["header", "reason"], registry=registry,
        )


# ---------------------------------------------------------------------- the process


class SidecarMetrics:
    """The process's registry, its own families, and the parts that are always on.

    The optional parts (:class:`InboundMetrics`, :class:`SignalingMetrics`,
    :class:`DiscoveryMetrics`, :class:`TransparentMetrics`) are built on :attr:`registry` by
    whoever builds the part (:class:`sidecar.runner.SidecarRunner`)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.outbound = OutboundMetrics(r)
        self.caller = CallerMetrics(r)
        self.config_reloads = Counter(
            "equilibrium_config_reloads",
            "Config reloads, by result (applied; rejected: a bad config; failed: an error)",
            ["result"],
            registry=r,
        )
        self.draining = Gauge("equilibrium_draining", "1 while draining on shutdown", registry=r)
        self.h2_engine = Gauge(
            "equilibrium_h2_engine",
            "1 for the HTTP/2 engine of this sidecar's connections: nghttp2 (libnghttp2, the "
            "default where it loads) or h2 (pure Python); EQUILIBRIUM_H2_ENGINE chooses",
            ["engine", "version"], registry=r,
        )
        self.malformed_requests = Counter(
            "equilibrium_malformed_requests",
            "HTTP/1.1 requests a listener on aiohttp (the admin listener) refused as "
            "unparseable (answered 400 and closed), by kind (sidecar.log_guard); the outbound "
            "and inbound listeners count theirs in *http1_rejected_requests", ["kind"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


# ---------------------------------------------------------------------- inbound


class InboundMetrics:
    """The inbound listener and its policing; every name is ``equilibrium_inbound_<name>``
    (counters end in ``_total``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        scope: dict[str, Any] = {"namespace": "equilibrium", "subsystem": "inbound",
                                 "registry": registry}

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, labels, **scope)

        def gauge(name: str, doc: str, *labels: str) -> Gauge:
            return Gauge(name, doc, labels, **scope)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, buckets=LATENCY_BUCKETS, **scope)

        # what happened to requests, and to the headers they carried
        self.requests = counter(
            "requests", "Requests to the inbound listener by caller and outcome (admitted, "
            "throttled, rate-limited, bad-bid, queue-full, queue-timeout, app-error)",
            "caller", "outcome")
        self.identity = counter(
            "identity", "Identity checks by result (trusted, or why the caller was treated as "
            "anonymous)", "result")
        self.bad_bids = counter("bad_bids", "Malformed X-GT-Bid values rejected with 400",
                                "reason")
        self.stripped = counter(
            "stripped_headers", "X-GT-* headers removed: untrusted = sent by a caller that did "
            "not verify (ignored); from-app = set by the app on its response", "source")
        self.voided_bids = counter(
            "voided_bids", "Bids set to 0 because the request took its caller over its fair "
            "share of a congested app")
        self.bad_headers = counter("bad_headers", "Malformed game headers from trusted callers",
                                   "header")
        self.demands = counter(
            "demands", "Declared demands (X-GT-Demand) of trusted callers by result (believed, "
            "or why it was ignored and the caller judged by its rate here alone)", "result")
        self.slow_uploads = counter(
            "slow_uploads", "Request bodies that missed the upload deadline (timeout, 408) or "
            "were abandoned half-way, by caller (each counts against the caller's reputation)",
            "caller", "outcome")
        # the callers' standing (refreshed off the request path)
        self.reputation = gauge(
            "caller_reputation",
            "Caller reputation in [0, 1] (other = the lowest among untracked callers)", "caller")
        self.level = gauge(
            "caller_punishment_level",
            "Caller punishment level, 0 = good standing (other = the highest among the rest)",
            "caller")
        self.punished = gauge("punished_callers", "Callers currently being punished")
        # the auction
        self.price = gauge("clearing_price", "Price of the last admission (0 uncongested)")
        self.paid = counter("price_paid", "Sum of prices charged, by caller", "caller")
        self.queue_length = gauge("queue_length", "Requests waiting in the bid queue")
        # the app's load
        self.limit = gauge("concurrency_limit", "Adaptive concurrency limit of the app")
        self.in_flight = gauge("in_flight", "Requests at the app through this listener")
        self.long_running = gauge(
            "long_running", "Admitted requests parked as long (a long poll, a watch, a stream: "
            "older than the limiter's long_after and overtaken by a later one), outside the "
            "concurrency limit")
        self.parked = counter("long_requests", "Requests parked as long since the start")
        self.congestion = gauge("congestion", "Congestion level sent as X-GT-Congestion")
        self.capacity = gauge("capacity_estimate",
                              "App capacity in requests/s used for fair shares")
        self.mesh_key = gauge("mesh_key_configured",
                              "1 if a mesh key is configured (0: every caller is anonymous)")
        self.app_latency = histogram(
            "app_duration_seconds", "Time from forwarding to the app until its response finished")
        self.wait = histogram("queue_wait_seconds", "Time admitted requests waited in the queue")


# ---------------------------------------------------------------------- signaling


class SignalingMetrics:
    """The sidecar's side of the signaling plane (:mod:`sidecar.signaling`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = r = registry
        self.connected = Gauge(
            "equilibrium_signaling_connected", "1 while the last Redis round trip succeeded",
            registry=r,
        )
        self.following = Gauge(
            "equilibrium_signaling_following",
            "1 while the upstream's routing follows a signaler recommendation, 0 while it "
            "falls back to local regret matching", ["upstream"], registry=r,
        )
        self.unplanned = Gauge(
            "equilibrium_signaling_unplanned",
            "1 while the upstream has no fresh recommendation although this sidecar's "
            "summaries have reported demand long enough to get one (the first "
            "recommendation's wait and two epochs); 0 while it follows one, is idle, or sends "
            "too rarely to be planned for", ["upstream"], registry=r,
        )
        self.summaries = Counter(
            "equilibrium_signaling_summaries_published", "Regret summaries appended",
            ["upstream"], registry=r,
        )
        self.accepted = Counter(
            "equilibrium_signaling_recommendations_accepted",
            "Recommendations that verified and are followed", ["upstream"], registry=r,
        )
        self.rejected = Counter(
            "equilibrium_signaling_recommendations_rejected",
            "Recommendations ignored, by reason (stale, expired, bad-signature, unsigned, "
            "malformed, fenced, ...)", ["upstream", "reason"], registry=r,
        )
        self.summaries_invalid = Counter(
            "equilibrium_signaling_summaries_invalid",
            "Summaries not sent because they failed the protocol's validation, by reason",
            ["upstream", "reason"], registry=r,
        )
        self.key_errors = Counter(
            "equilibrium_signaling_key_errors",
            "Appends or reads that met a key holding the wrong type of value, by upstream and "
            "key role (summaries, recs); only that upstream falls back", ["upstream", "key"],
            registry=r,
        )
        self.fallbacks = Counter(
            "equilibrium_signaling_fallbacks",
            "Times routing fell back to local regret matching because Redis failed",
            registry=r,
        )
        self.redis_errors = Counter(
            "equilibrium_signaling_redis_errors", "Failed Redis round trips, by kind", ["kind"],
            registry=r,
        )


# ---------------------------------------------------------------------- discovery


class DiscoveryMetrics:
    """Kubernetes discovery (:mod:`sidecar.discovery`): its watches and table updates."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.events = Counter(
            "equilibrium_discovery_events", "Watch events received, by resource and type",
            ["resource", "type"], registry=registry,
        )
        self.relists = Counter(
            "equilibrium_discovery_relists",
            "Full lists of a resource, by reason (start, gone = 410, error = after a failure)",
            ["resource", "reason"], registry=registry,
        )
        self.errors = Counter(
            "equilibrium_discovery_errors",
            "List/watch failures that led to a reconnect, by resource and kind",
            ["resource", "kind"], registry=registry,
        )
        self.rejected = Counter(
            "equilibrium_discovery_rejected_objects",
            "API objects skipped because they were malformed", ["resource"], registry=registry,
        )
        self.rejected_annotations = Counter(
            "equilibrium_discovery_rejected_annotations",
            "Services whose equilibrium.io/long-paths annotation was ignored as malformed "
            "(their routes stand)", registry=registry,
        )
        self.applied = Counter(
            "equilibrium_discovery_updates", "Routing table updates applied from discovery",
            registry=registry,
        )
        self.services = Gauge(
            "equilibrium_discovery_services", "Services currently known", registry=registry,
        )
        self.synced = Gauge(
            "equilibrium_discovery_synced", "1 once the first list of a resource was applied",
            ["resource"], registry=registry,
        )


# ---------------------------------------------------------------------- interception


class TransparentMetrics:
    """Transparent interception (:mod:`sidecar.transparent`): the outbound listener's routes
    and its pass-through relays."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.connections = Counter(
            "equilibrium_transparent_connections",
            "Connections accepted on the outbound listener, by route "
            "(direct, service, passthrough)",
            ["route"], registry=registry,
        )
        self.passthrough_failures = Counter(
            "equilibrium_passthrough_failures",
            "Pass-through connections that could not reach their original destination",
            ["reason"], registry=registry,
        )
        self.relays_open = Gauge(
            "equilibrium_passthrough_open", "Pass-through TCP relays currently open",
            registry=registry,
        )
        self.relayed_bytes = Counter(
            "equilibrium_passthrough_bytes", "Bytes relayed by pass-through connections",
            ["direction"], registry=registry,
        )


# ---------------------------------------------------------------- HTTP/2 and gRPC
# The HTTP/2 path's own families (sidecar.h2_site, sidecar.h2_proxy); its requests are also
# counted by OutboundMetrics.forwarded like HTTP/1.1 ones.


class H2Metrics:
    """Counters of the outbound listener's HTTP/2 and gRPC traffic, in the sidecar's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.connections = Counter(
            "equilibrium_outbound_connections",
            "Connections accepted on the outbound listener, by protocol (http1, h2c)",
            ["protocol"], registry=registry,
        )
        self.grpc_calls = Counter(
            "equilibrium_grpc_calls",
            "gRPC calls forwarded over HTTP/2, by upstream, endpoint and grpc-status "
            "(the sidecar's own answers under endpoint \"\")",
            ["upstream", "endpoint", "grpc_status"], registry=registry,
        )
        self.streams_cancelled = Counter(
            "equilibrium_h2_streams_cancelled",
            "HTTP/2 requests the app reset or abandoned before the answer ended (not counted "
            "against the endpoint)",
            ["upstream"], registry=registry,
        )
        # The listener's defences (sidecar.h2_site, sidecar.h2_server; docs/grpc.md).
        self.listener_timeouts = Counter(
            "equilibrium_listener_timeouts",
            "Outbound-listener connections closed by a timeout, by phase (first_bytes: no "
            "request and no complete HTTP/2 preface in time; h2_idle: an HTTP/2 connection "
            "with no request in flight; http1_header: an HTTP/1.1 request head not complete "
            "in time, answered 408; http1_idle: an idle HTTP/1.1 keep-alive connection)",
            ["phase"], registry=registry,
        )
        self.http1_phases = ("http1_header", "http1_idle")  # the HTTP/1.1 timeouts' labels
        self.http1_rejected = Counter(
            "equilibrium_http1_rejected_requests",
            "HTTP/1.1 requests the outbound listener refused before routing, closing the "
            "connection, by reason (malformed: 400; head-too-large, trailers-too-large: 431; "
            "connect-not-supported, transfer-coding-not-supported: 501; "
            "version-not-supported: 505)",
            ["reason"], registry=registry,
        )
        self.flood_goaways = Counter(
            "equilibrium_h2_flood_goaways",
            "HTTP/2 app connections ended with GOAWAY(ENHANCE_YOUR_CALM), by the budget they "
            "ran out of (rapid_reset, ping, settings, empty_data, unknown_frame, priority, "
            "window_update); rapid_reset also counts libnghttp2's own limit on resets "
            "(a graceful GOAWAY)",
            ["kind"], registry=registry,
        )
        self.refused_streams = Counter(
            "equilibrium_h2_refused_streams",
            "HTTP/2 streams refused (REFUSED_STREAM) for exceeding the announced "
            "SETTINGS_MAX_CONCURRENT_STREAMS",
            registry=registry,
        )
        self.oversized_headers = Counter(
            "equilibrium_h2_oversized_header_blocks",
            "HTTP/2 requests refused (431, or RESOURCE_EXHAUSTED for gRPC) for a header block "
            "over the announced SETTINGS_MAX_HEADER_LIST_SIZE",
            registry=registry,
        )
        self.connections_open = Gauge(
            "equilibrium_outbound_connections_open",
            "Connections open on the outbound listener (HTTP/1.1, h2c, still sniffing)",
            registry=registry,
        )
        self.connections_rejected = Counter(
            "equilibrium_outbound_connections_rejected",
            "Connections the outbound listener closed at once: its connection cap was reached",
            registry=registry,
        )


class InboundListenerMetrics(H2Metrics):
    """The inbound listener's connections and HTTP/2 defences: the listener families of
    :class:`H2Metrics` under ``equilibrium_inbound_*`` (the same site and connection code
    serves both listeners); the call counters are the outbound ones, shared."""

    def __init__(self, registry: CollectorRegistry, shared: H2Metrics) -> None:
        scope: dict[str, Any] = {"namespace": "equilibrium", "subsystem": "inbound",
                                 "registry": registry}
        self.grpc_calls = shared.grpc_calls
        self.streams_cancelled = shared.streams_cancelled
        self.connections = Counter(
            "connections", "Connections accepted on the inbound listener, by protocol "
            "(http1, h2c)", ["protocol"], **scope)
        self.listener_timeouts = Counter(
            "listener_timeouts", "Inbound-listener connections closed by a timeout, by phase "
            "(first_bytes: no byte of a request; header: an HTTP/1.1 head not complete within "
            "header_timeout, answered 408; idle: an HTTP/1.1 keep-alive connection idle for "
            "keepalive_timeout; h2_idle)", ["phase"], **scope)
        self.http1_phases = ("header", "idle")
        self.http1_rejected = Counter(
            "http1_rejected_requests", "HTTP/1.1 requests the inbound listener refused before "
            "policing, closing the connection, by reason (malformed: 400; head-too-large, "
            "trailers-too-large: 431; connect-not-supported, transfer-coding-not-supported: 501; "
            "version-not-supported: 505)",
            ["reason"], **scope)
        self.accept_errors = Counter(
            "accept_errors", "accept() failures for lack of file descriptors or memory (any "
            "listener; logged once per interval)", **scope)
        self.flood_goaways = Counter(
            "h2_flood_goaways", "HTTP/2 caller connections ended with "
            "GOAWAY(ENHANCE_YOUR_CALM), by the budget they ran out of (rapid_reset also "
            "counts libnghttp2's own limit on resets, a graceful GOAWAY)", ["kind"], **scope)
        self.refused_streams = Counter(
            "h2_refused_streams", "HTTP/2 streams refused (REFUSED_STREAM) for exceeding the "
            "announced SETTINGS_MAX_CONCURRENT_STREAMS", **scope)
        self.oversized_headers = Counter(
            "h2_oversized_header_blocks", "HTTP/2 requests refused (431, or "
            "RESOURCE_EXHAUSTED for gRPC) for a header block over the announced "
            "SETTINGS_MAX_HEADER_LIST_SIZE", **scope)
        self.connections_open = Gauge(
            "connections_open", "Connections open on the inbound listener (HTTP/1.1, h2c, "
            "still sniffing)", **scope)
        self.rejected = Counter(
            "connections_rejected", "Connections the inbound listener closed at once: past "
            "its connection cap (cap) or its cap per peer address (per-source)", ["reason"],
            **scope)
        self.connections_rejected = self.rejected.labels("cap")


# ---------------------------------------------------------------------- probes


class ProbeAnswerMetrics:
    """The inbound side of probes (:mod:`sidecar.probe_answer`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.probes = Counter(
            "equilibrium_inbound_probes", "Probes received, by result (answered, untrusted, "
            "malformed, rate-limited, no-key)", ["result"], registry=registry)
        self.app_checks = Counter(
            "equilibrium_inbound_app_checks", "Idle checks of the app (policing.app_check_path)"
            ", by result (ok, failed)", ["result"], registry=registry)


class ProberMetrics:
    """The caller side of probes (:mod:`sidecar.prober`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.probes = Counter(
            "equilibrium_probes", "Probes sent, by upstream and result (ok, no-answer, "
            "not-meshed, busy: its sidecar is over its probe budget, or why the answer was "
            "refused: bad-signature, stale, malformed, ...)",
            ["upstream", "result"], registry=registry)
        self.duration = Histogram(
            "equilibrium_probe_duration_seconds", "Time from sending a probe to its answer",
            buckets=LATENCY_BUCKETS, registry=registry)
