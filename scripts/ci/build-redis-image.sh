#!/usr/bin/env bash
# Build the local Redis image `equilibrium-redis:local` FROM scratch (idempotent, never pulls).
#
# No registry is reachable on these machines, so the image is assembled from the host's
# Debian redis-server and redis-cli binaries and the shared libraries `ldd` lists for them
# (redis-cli because compose.yaml's healthcheck runs `redis-cli ping` in the container, as with
# the official image). The image is labelled with a sha256 of the binaries and this script; it
# is rebuilt only when one of them changed.
#
# Environment:
#   REDIS_IMAGE   tag to build (default equilibrium-redis:local)
#   FORCE=1       rebuild even if an up-to-date image exists
set -euo pipefail

IMAGE="${REDIS_IMAGE:-equilibrium-redis:local}"
BIN=/usr/bin/redis-server
CLI=/usr/bin/redis-cli
export DOCKER_HOST="${DOCKER_HOST:-unix:///run/docker.sock}"
# The classic builder honours --network none and --pull=false and needs no buildx plugin.
export DOCKER_BUILDKIT=0

log() { echo "build-redis-image: $*" >&2; }

if [ ! -x "${BIN}" ] || [ ! -x "${CLI}" ]; then
    log "installing redis-server and redis-tools (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q redis-server redis-tools >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q redis-server redis-tools >/dev/null; }
fi
# Debian ships redis-server as a symlink to redis-check-rdb; the real file decides the hash.
REAL_BIN="$(readlink -f "${BIN}")"
# The label covers the binary and this recipe, so a changed recipe also rebuilds.
SHA="$(cat "${REAL_BIN}" "${CLI}" "$0" | sha256sum | cut -d' ' -f1)"

if [ "${FORCE:-0}" != "1" ]; then
    have="$(docker image inspect "${IMAGE}" \
        --format '{{ index .Config.Labels "org.equilibrium.redis-sha256" }}' 2>/dev/null || true)"
    if [ "${have}" = "${SHA}" ]; then
        log "${IMAGE} is up to date (recipe sha256 ${SHA:0:12})"
        exit 0
    fi
fi

CTX="$(mktemp -d /tmp/equilibrium-redis-image.XXXXXX)"
trap 'rm -rf "${CTX}"' EXIT
ROOT="${CTX}/rootfs"
mkdir -p "${ROOT}/usr/bin" "${ROOT}/data" "${ROOT}/tmp"
# Copy under the name redis-server: the binary picks its mode from argv[0].
cp -L "${BIN}" "${ROOT}/usr/bin/redis-server"
cp -L "${CLI}" "${ROOT}/usr/bin/redis-cli"

# Every library ldd resolves (the "=> /path" form and the bare loader path).
{ ldd "${BIN}"; ldd "${CLI}"; } | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u | while read -r lib; do
    mkdir -p "${ROOT}$(dirname "${lib}")"
    cp -L "${lib}" "${ROOT}${lib}"
done

cat > "${CTX}/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/bin
WORKDIR /data
EXPOSE 6379
CMD ["/usr/bin/redis-server", "--protected-mode", "no", "--save", "", "--appendonly", "no"]
DOCKERFILE

log "building ${IMAGE} from ${REAL_BIN} ($(du -sh "${ROOT}" | cut -f1))"
if ! docker build --network none --pull=false -q \
    --label "org.equilibrium.redis-sha256=${SHA}" \
    --label "org.opencontainers.image.title=equilibrium-redis" \
    -t "${IMAGE}" "${CTX}" >"${CTX}/build.log" 2>&1; then
    log "docker build failed:"
    cat "${CTX}/build.log" >&2
    exit 1
fi
# The image this one replaced (same label, now untagged) is ours to remove.
docker image prune -f --filter "label=org.opencontainers.image.title=equilibrium-redis" >/dev/null
log "built ${IMAGE}: $(docker image inspect "${IMAGE}" --format '{{.Id}}' | cut -c1-19)"
