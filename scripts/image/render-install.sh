#!/usr/bin/env bash
# Regenerate k8s/install.yaml from the kustomize sources in k8s/base (needs kubectl >= 1.14,
# which embeds kustomize). tests/unit/k8s/test_manifests.py runs the same rendering and fails when
# the committed file differs.
set -euo pipefail
ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${1:-${ROOT_DIR}/k8s/install.yaml}"
{
    echo "# GENERATED from k8s/base by scripts/image/render-install.sh; do not edit by hand."
    echo "# Install: kubectl apply -f k8s/install.yaml, then label namespaces (docs/kubernetes.md)."
    kubectl kustomize "${ROOT_DIR}/k8s/base"
} > "${OUT}.tmp"
mv "${OUT}.tmp" "${OUT}"
echo "wrote ${OUT}" >&2
