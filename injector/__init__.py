"""Kubernetes integration: the mutating admission webhook that injects the sidecar, and the
init step that installs the transparent-interception rules."""
