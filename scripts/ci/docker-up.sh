#!/usr/bin/env bash
# Bring up a local Docker engine for the integration tests (idempotent).
#
# Installs docker.io if missing, starts dockerd with published ports on loopback only
# (--ip 127.0.0.1) on unix:///run/docker.sock, and waits (bounded) until `docker info` answers.
# It never pulls anything; see /work/shared/INFRA.md and docs/protocol.md.
#
# Environment:
#   DOCKER_UP_TIMEOUT  seconds to wait for the engine (default 30)
#   DOCKERD_LOG        where dockerd logs (default /tmp/dockerd.log)
set -euo pipefail

SOCK=/run/docker.sock
TIMEOUT="${DOCKER_UP_TIMEOUT:-30}"
LOG="${DOCKERD_LOG:-/tmp/dockerd.log}"
export DOCKER_HOST="unix://${SOCK}"

log() { echo "docker-up: $*" >&2; }

engine_answers() { docker info >/dev/null 2>&1; }

if ! command -v dockerd >/dev/null 2>&1; then
    log "installing docker.io (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q docker.io >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q docker.io >/dev/null; }
fi

if engine_answers; then
    log "engine already answering on ${DOCKER_HOST}"
    exit 0
fi

if [ -S "${SOCK}" ] && ! pgrep -x dockerd >/dev/null 2>&1; then
    log "removing stale socket ${SOCK}"
    rm -f "${SOCK}"
fi

if ! pgrep -x dockerd >/dev/null 2>&1; then
    log "starting dockerd (log: ${LOG})"
    mkdir -p /var/lib/docker
    nohup dockerd --ip 127.0.0.1 -H "unix://${SOCK}" --data-root /var/lib/docker \
        >"${LOG}" 2>&1 </dev/null &
    disown || true
fi

deadline=$(( $(date +%s) + TIMEOUT ))
until engine_answers; do
    if [ "$(date +%s)" -ge "${deadline}" ]; then
        log "engine did not answer within ${TIMEOUT}s; last lines of ${LOG}:"
        tail -n 20 "${LOG}" >&2 || true
        exit 1
    fi
    sleep 0.2
done
log "engine up: $(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?')"
