"""The injector's Prometheus metrics, in one registry per app (never the global one).

Owns the metrics' names, labels and help texts, the webhook's and the install controller's
(docs/kubernetes.md and the alert on a silent injector use them as spelled here). The
webhook's ``result`` label's values are :class:`injector.review.Outcome`, every one exported
from the start at 0 so that a rate over any of them is defined before the first review.
Nothing here serves HTTP: the webhook's server (:mod:`injector.server`) renders
:meth:`InjectorMetrics.render` on ``GET /metrics``, the controller's metrics listener
(:mod:`injector.controller_admin`) :meth:`ControllerMetrics.render`.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from injector.review import Outcome

CONTENT_TYPE = CONTENT_TYPE_LATEST


class InjectorMetrics:
    """All metrics of one webhook app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reviews = Counter("equilibrium_injector_reviews",
                               "AdmissionReviews answered, by result", ["result"],
                               registry=self.registry)
        for outcome in Outcome:
            self.reviews.labels(result=outcome.value)

    def reviewed(self, outcome: Outcome) -> None:
        """One review answered (or refused) with ``outcome``."""
        self.reviews.labels(result=outcome.value).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ControllerMetrics:
    """The install controller's metrics (``equilibrium injector controller --metrics``):
    what it reconciled, what failed, how many namespaces it keeps, and rotations it passed on.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter(
            "equilibrium_controller_reconciles",
            "Namespaces reconciled (their equilibrium-mesh Secret and RoleBinding), by result "
            "(ok; error: the API refused, retried)", ["result"], registry=self.registry)
        self.errors = Counter(
            "equilibrium_controller_errors",
            "Failures of the controller's loops (each retried after a backoff), by loop "
            "(control_plane, namespaces, pods, secrets)", ["loop"], registry=self.registry)
        self.rotations = Counter(
            "equilibrium_controller_rotations",
            "Changes of a control-plane Secret (a rotated key, password or certificate) "
            "passed on to every managed namespace, by Secret", ["secret"],
            registry=self.registry)
        self.managed = Gauge(
            "equilibrium_controller_managed_namespaces",
            "Namespaces the controller keeps an equilibrium-mesh Secret in", registry=self.registry)
        self.ready = Gauge(
            "equilibrium_controller_control_plane_ready",
            "1 once the control plane's Secrets are in place", registry=self.registry)
        for result in ("ok", "error"):
            self.reconciles.labels(result=result)
        for loop in ("control_plane", "namespaces", "pods", "secrets"):
            self.errors.labels(loop=loop)

    def render(self) -> bytes:
        return generate_latest(self.registry)
