"""The signaler's Prometheus metrics: every family the signaler exports.

Owns metric names, labels, help texts and buckets (``k8s/observability/`` and the docs use them
as spelled here; ``tests/unit/test_metric_families.py`` holds the list a rename must change
too). One registry per process (never the global one), label values bounded by the upstreams
the signaler serves and by the stable rejection reasons of :class:`wire.errors.Reason`. Nothing
here talks to Redis, solves anything or serves HTTP (:mod:`signaler.admin` renders it).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics import MetricWrapperBase

CONTENT_TYPE = CONTENT_TYPE_LATEST

# 1 ms .. 30 s: 64 tokens x 4 endpoints solves in about 0.3 s, 16 x 8 in about 12 s.
SOLVE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class SignalerMetrics:
    """All metrics of one signaler process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.summaries_consumed = Counter(
            "equilibrium_signaler_summaries_consumed",
            "Regret summaries read from the stream, validated and applied",
            ["upstream"], registry=r,
        )
        self.consume_deferred = Counter(
            "equilibrium_signaler_consume_deferred",
            "Epochs that left summaries unread to plan on time (more arrive than one epoch's "
            "reading share can take)", ["upstream"], registry=r,
        )
        self.entries_rejected = Counter(
            "equilibrium_signaler_entries_rejected",
            "Stream entries rejected (acknowledged, not applied), by protocol reason",
            ["upstream", "reason"], registry=r,
        )
        self.streams_repaired = Counter(
            "equilibrium_signaler_streams_repaired",
            "Summary streams deleted because their last id lay in the future (planted by an "
            "append with an id of its own; at the largest id every sidecar's append fails), "
            "started again by the sidecars' next summaries (no upstream label: anyone who may "
            "append summaries can make up upstreams)", registry=r,
        )
        self.probes_rejected = Counter(
            "equilibrium_signaler_probes_rejected",
            "Discovery probes that found summaries on an upstream's stream, none valid (so the "
            "upstream is not served), by the newest rejected entry's protocol reason (no "
            "upstream label: anyone who may append summaries can make up upstreams)",
            ["reason"], registry=r,
        )
        self.entries_reclaimed = Counter(
            "equilibrium_signaler_entries_reclaimed",
            "Pending summary entries taken over with XAUTOCLAIM (left by a crashed consumer)",
            ["upstream"], registry=r,
        )
        self.recommendations_published = Counter(
            "equilibrium_signaler_recommendations_published",
            "Signed recommendations appended to sidecars' streams",
            ["upstream"], registry=r,
        )
        self.publish_fenced = Counter(
            "equilibrium_signaler_publish_fenced",
            "Publications refused because this replica no longer held the lease",
            ["upstream"], registry=r,
        )
        self.solve_seconds = Histogram(
            "equilibrium_signaler_solve_seconds",
            "Time to fit the latency models and solve the routing program",
            ["upstream"], buckets=SOLVE_BUCKETS, registry=r,
        )
        self.cpu_seconds = Counter(
            "equilibrium_signaler_cpu_seconds",
            "CPU seconds of each part of the work (thread time): verify (checking and keeping "
            "summaries), plan (fitting and solving, in the planning thread), sign (signing "
            "recommendations), dashboard (building frames); the rest of "
            "process_cpu_seconds_total is Redis I/O, the event loop and the admin listener",
            ["phase"], registry=r,
        )
        self.solver_failures = Counter(
            "equilibrium_signaler_solver_failures",
            "Epochs whose program could not be solved (the previous plan was kept)",
            ["upstream", "error"], registry=r,
        )
        self.lp_variables = Gauge(
            "equilibrium_signaler_lp_variables", "Variables of the last program solved",
            ["upstream"], registry=r,
        )
        self.lp_constraints = Gauge(
            "equilibrium_signaler_lp_constraints", "Constraints of the last program solved",
            ["upstream"], registry=r,
        )
        self.lp_tokens = Gauge(
            "equilibrium_signaler_lp_tokens", "Tokens (symmetric players) of the last program",
            ["upstream"], registry=r,
        )
        self.objective = Gauge(
            "equilibrium_signaler_objective",
            "Expected total latency of the last plan (token-seconds)",
            ["upstream"], registry=r,
        )
        self.ce_gap = Gauge(
            "equilibrium_signaler_ce_gap_seconds",
            "Correlated-equilibrium gap: source=plan is the largest gain a token gets by "
            "deviating from the plan; source=sidecars the largest positive conditional regret "
            "D(j,k) the sidecars report (the same constraint at their empirical play)",
            ["upstream", "source"], registry=r,
        )
        self.sidecars = Gauge(
            "equilibrium_signaler_sidecars", "Sidecars with a fresh summary", ["upstream"],
            registry=r,
        )
        self.shared_sidecar_ids = Gauge(
            "equilibrium_signaler_shared_sidecar_ids",
            "Sidecar ids under which two processes publish summaries (two sidecars started "
            "with one --id: their traffic is planned as one caller's)", ["upstream"],
            registry=r,
        )
        self.leader = Gauge(
            "equilibrium_signaler_leader", "1 while this replica leads the upstream",
            ["upstream"], registry=r,
        )
        self.fence = Gauge(
            "equilibrium_signaler_fence", "Fencing token this replica leads the upstream under",
            ["upstream"], registry=r,
        )
        self.redis_up = Gauge(
            "equilibrium_signaler_redis_up", "1 when the last Redis round trip succeeded",
            registry=r,
        )
        self.redis_errors = Counter(
            "equilibrium_signaler_redis_errors", "Failed Redis round trips, by kind",
            ["kind"], registry=r,
        )
        self.epoch_errors = Counter(
            "equilibrium_signaler_epoch_errors",
            "Epochs cut short by an unexpected error (logged with its traceback)", ["kind"],
            registry=r,
        )
        self.key_errors = Counter(
            "equilibrium_signaler_key_errors",
            "Operations that met a key holding the wrong type of value, by upstream and key "
            "role (summaries, recs, leader, fence); only that upstream is affected",
            ["upstream", "key"], registry=r,
        )
        self.id_conflicts = Gauge(
            "equilibrium_signaler_id_conflicts",
            "Upstreams whose lease another live replica holds under this replica's id "
            "(two replicas started with the same --id; this one refuses to lead them)",
            registry=r,
        )
        self.upstreams = Gauge(
            "equilibrium_signaler_upstreams",
            "Upstreams served: configured, or discovered with a valid fresh summary "
            "(forged or silent streams are not served, and forgotten ones lose their series)",
            registry=r,
        )
        self.epochs = Counter(
            "equilibrium_signaler_epochs", "Epochs run by this replica", registry=r
        )

    def forget_upstream(self, upstream: str) -> int:
        """Remove every series labelled with ``upstream``; how many were removed."""
        removed = 0
        for collector in list(self.registry._collector_to_names):
            if not isinstance(collector, MetricWrapperBase):
                continue
            names = collector._labelnames
            if "upstream" not in names:
                continue
            at = names.index("upstream")
            for values in list(collector._metrics):  # prometheus_client's children by labels
                if values[at] == upstream:
                    collector.remove(*values)
                    removed += 1
        return removed

    def render(self) -> bytes:
        return generate_latest(self.registry)
