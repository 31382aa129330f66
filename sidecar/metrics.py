"""The sidecar's Prometheus metrics, in one registry per process (never the global one).

Owns metric names, labels and buckets. The request path only increments counters and observes
the histogram; the routing gauges (weights, regrets, Nash gap, flapping, converged) are set
off the request path, from the snapshot rebuilt at each policy tick.
"""

from __future__ import annotations

import contextlib
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from mesh.estimators import LATENCY_BUCKETS  # the buckets of the signaling epoch windows too
from mesh.policy import PolicySnapshot

CONTENT_TYPE = CONTENT_TYPE_LATEST


class SidecarMetrics:
    """All metrics of one sidecar process; label values are bounded by the config."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
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
        self.retry_budget_exhausted = Counter(
            "equilibrium_retry_budget_exhausted",
            "Retries not sent because the retry budget was empty",
            ["upstream"],
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
        self.config_reloads = Counter(
            "equilibrium_config_reloads",
            "Config reloads, by result (applied, rejected)",
            ["result"],
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
        self.draining = Gauge("equilibrium_draining", "1 while draining on shutdown", registry=r)
        self._endpoint_labels: dict[str, set[str]] = {}
        # labelled children of the request-path metrics, looked up once (labels() takes a lock)
        self._children: dict[tuple[str, ...], Any] = {}

    # ---------------------------------------------------------------- request path

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric._name, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request_in_flight(self, upstream: str, delta: int) -> None:
        self._child(self.in_flight, upstream).inc(delta)

    def forwarded(self, upstream: str, endpoint: str, code: str, latency: float | None) -> None:
        """One attempt got an answer (``code``) or failed (``code`` = the error reason)."""
        self._child(self.requests, upstream, endpoint, code).inc()
        if latency is not None:
            self._child(self.latency, upstream, endpoint).observe(latency)

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

    def render(self) -> bytes:
        return generate_latest(self.registry)


# ---------------------------------------------------------------- HTTP/2 and gRPC
# The HTTP/2 path's own families (sidecar.h2_site, sidecar.h2_proxy); its requests are also
# counted by SidecarMetrics.forwarded like HTTP/1.1 ones.


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
