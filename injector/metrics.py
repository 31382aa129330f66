"""The injector's Prometheus metrics, in one registry per webhook app (never the global one).

Owns the metric's name, label and help text (docs/kubernetes.md and the alert on a silent
injector use them as spelled here). The ``result`` label's values are
:class:`injector.review.Outcome`, every one exported from the start at 0 so that a rate over
any of them is defined before the first review. Nothing here serves HTTP: the webhook's server
(:mod:`injector.server`) renders :meth:`InjectorMetrics.render` on ``GET /metrics``.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

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
