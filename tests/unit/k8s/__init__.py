"""Unit tests of the shipped Kubernetes files in ``k8s/`` (manifests, alerts, dashboard)."""
