"""``equilibrium injector controller`` as a real subprocess against the Kubernetes API stand-in.

The API server is ``tests.integration.kube_api`` on loopback (the same list/watch stand-in the
discovery tests use, with Secrets, Namespaces, RoleBindings and the webhook configuration).
Covered: the first start creates the Redis passwords, the mesh key, the webhook certificate
and the caBundle; a second start writes nothing and keeps every value; a namespace labelled
later gets its Secret and RoleBinding within a bound; the caBundle is the CA that signed the
serving certificate; a namespace's Redis URL is eq-sidecar's and never carries the admin or
signaler password; no secret value is logged; a stale copy is repaired; a namespace with an
injected pod is served; a server ending every watch at once is paced; and a real redis-server
started with install.yaml's arguments and the generated Secret takes the generated users.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import socket
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from redis.exceptions import NoPermissionError

from equilibrium.lab.embedded_redis import find_redis_server
from injector import certs
from injector.controller import RETRY_S
from tests.integration.kube_api import KubeApiServer, namespace, pod
from tests.integration.procs import REPO_ROOT
from tests.support import child_env, metric_value
from wire.keys import leader_key, recommendation_stream, summary_stream

SYSTEM = "equilibrium-system"
WEBHOOKS = "mutatingwebhookconfigurations"
BOUND_S = 10.0  # a namespace labelled at runtime is served within this


def webhook_configuration() -> dict[str, object]:
    hook = {"admissionReviewVersions": ["v1"], "sideEffects": "None",
            "clientConfig": {"service": {"name": "equilibrium-injector", "namespace": SYSTEM,
                                         "path": "/mutate", "port": 443}}}
    return {"metadata": {"name": "equilibrium-injector"},
            "webhooks": [{**hook, "name": "namespace.inject.equilibrium.io"},
                         {**hook, "name": "pod.inject.equilibrium.io"}]}


@pytest.fixture
async def api() -> AsyncIterator[KubeApiServer]:
    server = await KubeApiServer().start()
    server.put("namespaces", namespace(SYSTEM, {"equilibrium.io/injection": "disabled"}))
    server.put("namespaces", namespace("default"))
    server.put("namespaces", namespace("shop", {"equilibrium.io/injection": "enabled"}))
    server.put(WEBHOOKS, webhook_configuration())
    yield server
    await server.stop()


class Controller:
    def __init__(self, api: KubeApiServer, tmp_path: Path) -> None:
        token = tmp_path / "token"
        token.write_text(api.token + "\n")
        self.log = tmp_path / "controller.log"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.metrics_port = s.getsockname()[1]
        self.args = [sys.executable, "-m", "equilibrium", "injector", "controller",
                     "--kube-api", api.url, "--kube-token-file", str(token),
                     "--metrics", f"127.0.0.1:{self.metrics_port}"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, cwd=REPO_ROOT, env=child_env(),
                                     stdout=self.log.open("ab"), stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


    def metrics(self) -> str:
        """GET /metrics of the running controller ("" while it does not answer yet)."""
        try:
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as resp:
                return str(resp.read().decode())
        except OSError:
            return ""

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(self.metrics(), name, **labels)


@pytest.fixture
def controller(api: KubeApiServer, tmp_path: Path) -> AsyncIterator[Controller]:
    ctl = Controller(api, tmp_path)
    yield ctl
    ctl.stop()


async def until(check: Callable[[], bool], what: str, timeout: float = BOUND_S) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not check():
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"not within {timeout} s: {what}")


def served(api: KubeApiServer, ns: str) -> bool:
    return (api.object("secrets", ns, "equilibrium-mesh") is not None
            and api.object("rolebindings", ns, "equilibrium-sidecar") is not None)


def everything(api: KubeApiServer) -> dict[str, object]:
    return {f"{r}/{ns}/{name}": obj for r in ("secrets", "rolebindings", WEBHOOKS)
            for (ns, name), obj in api.collections[r].objects.items()}


async def test_first_start_creates_everything_and_a_second_changes_nothing(
        api: KubeApiServer, controller: Controller) -> None:
    controller.start()
    await until(lambda: served(api, "shop"), "the labelled namespace is served")
    auth = api.secret_values(SYSTEM, "equilibrium-redis-auth")
    assert auth is not None and set(auth) == {"password", "signaler-password",
                                              "sidecar-password"}
    assert len(set(auth.values())) == 3 and all(len(v) == 64 for v in auth.values())
    mesh = api.secret_values(SYSTEM, "equilibrium-mesh")
    assert mesh is not None and len(mesh["mesh-hmac-key"]) == 64
    host = "equilibrium-redis-0.equilibrium-redis.equilibrium-system.svc:6379"
    assert mesh["redis-url"] == f"redis://eq-signaler:{auth['signaler-password']}@{host}/0"
    copy = api.secret_values("shop", "equilibrium-mesh")
    assert copy == {"mesh-hmac-key": mesh["mesh-hmac-key"],
                    "redis-url": f"redis://eq-sidecar:{auth['sidecar-password']}@{host}/0"}
    assert auth["password"] not in copy["redis-url"]
    assert auth["signaler-password"] not in copy["redis-url"]
    binding = api.object("rolebindings", "shop", "equilibrium-sidecar")
    assert binding is not None
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": "equilibrium-sidecar"}
    assert binding["subjects"] == [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group",
                                    "name": "system:serviceaccounts:shop"}]
    # not opted in, or the control plane itself: nothing there
    assert not served(api, "default")
    assert api.object("rolebindings", SYSTEM, "equilibrium-sidecar") is None

    # caBundle = the CA that signed the serving certificate, on every webhook
    tls = api.secret_values(SYSTEM, "equilibrium-injector-tls")
    assert tls is not None
    ca = x509.load_pem_x509_certificate(tls["ca.crt"].encode())
    leaf = x509.load_pem_x509_certificate(tls["tls.crt"].encode())
    public_key = ca.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    leaf.verify_directly_issued_by(ca)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "equilibrium-injector.equilibrium-system.svc" in names.get_values_for_type(
        x509.DNSName)
    hooks = api.object(WEBHOOKS, "", "equilibrium-injector")
    assert hooks is not None
    bundles = {base64.b64decode(h["clientConfig"]["caBundle"]).decode()
               for h in hooks["webhooks"]}
    assert bundles == {tls["ca.crt"]}
    assert api.object("secrets", SYSTEM, "equilibrium-injector-tls")["type"] \
        == "kubernetes.io/tls"  # type: ignore[index]

    # a second start (a restart, or a second replica) writes nothing and keeps every value
    controller.stop()
    before = everything(api)
    writes = [r for r in api.requests if r[1] in ("create", "update", "patch")]
    reads = api.count("namespaces", "list")
    controller.start()
    await until(lambda: api.count("namespaces", "list") > reads, "the restart relists")
    await until(lambda: api.count("namespaces", "watch") >= 2, "the restart watches")
    assert everything(api) == before
    assert [r for r in api.requests if r[1] in ("create", "update", "patch")] == writes

    # no secret value in the log
    controller.stop()
    log = controller.log.read_text()
    assert "created Secret equilibrium-system/equilibrium-redis-auth" in log
    for value in [*auth.values(), mesh["mesh-hmac-key"], tls["tls.key"].splitlines()[1]]:
        assert value not in log


async def test_a_namespace_labelled_later_is_served_within_a_bound(
        api: KubeApiServer, controller: Controller) -> None:
    controller.start()
    await until(lambda: served(api, "shop"), "the labelled namespace is served")
    await until(lambda: api.count("namespaces", "watch") >= 1, "the controller watches")
    api.put("namespaces", namespace("payments"))
    await asyncio.sleep(0.5)
    assert not served(api, "payments")  # not opted in yet
    api.put("namespaces", namespace("payments", {"equilibrium.io/injection": "enabled"}))
    api.put("namespaces", namespace("legacy", {"equilibrium.io/mesh": "enabled"}))
    await until(lambda: served(api, "payments") and served(api, "legacy"),
                "namespaces labelled at runtime are served")
    auth = api.secret_values(SYSTEM, "equilibrium-redis-auth")
    assert auth is not None
    for ns in ("payments", "legacy"):
        url = api.secret_values(ns, "equilibrium-mesh")["redis-url"]  # type: ignore[index]
        assert url.startswith("redis://eq-sidecar:")
        assert auth["password"] not in url and auth["signaler-password"] not in url

    # a copy tampered with (an admin URL pasted in) is put back at the next event for it
    secret = api.object("secrets", "payments", "equilibrium-mesh")
    assert secret is not None
    admin = f"redis://default:{auth['password']}@x:6379/0"
    secret = {**secret, "data": {**secret["data"],
                                 "redis-url": base64.b64encode(admin.encode()).decode()}}
    api.put("secrets", secret)
    api.put("namespaces", namespace("payments", {"equilibrium.io/injection": "enabled",
                                                 "team": "payments"}))
    await until(lambda: auth["password"] not in  # type: ignore[index]
                api.secret_values("payments", "equilibrium-mesh")["redis-url"],
                "the tampered copy is repaired")

    # opting out leaves the objects (already-injected pods must still be able to restart)
    api.put("namespaces", namespace("payments"))
    await asyncio.sleep(0.3)
    assert served(api, "payments")


async def test_existing_secrets_are_kept_and_only_missing_keys_added(
        api: KubeApiServer, controller: Controller) -> None:
    """Bring-your-own: values already there are never replaced (no accidental rotation)."""
    mine = {"password": "a" * 40, "signaler-password": "b" * 40}
    api.put("secrets", {"metadata": {"name": "equilibrium-redis-auth", "namespace": SYSTEM},
                        "type": "Opaque",
                        "data": {k: base64.b64encode(v.encode()).decode()
                                 for k, v in mine.items()}})
    controller.start()
    await until(lambda: served(api, "shop"), "the labelled namespace is served")
    auth = api.secret_values(SYSTEM, "equilibrium-redis-auth")
    assert auth is not None and {k: auth[k] for k in mine} == mine
    assert len(auth["sidecar-password"]) == 64


async def test_a_bad_token_is_retried_not_fatal(api: KubeApiServer,
                                               controller: Controller) -> None:
    api.token = "rotated"
    controller.start()
    await until(lambda: api.count("secrets", "get") >= 2, "the controller retries")
    assert controller.proc is not None and controller.proc.poll() is None
    assert api.object("secrets", SYSTEM, "equilibrium-redis-auth") is None
    api.token = "test-token"
    await until(lambda: served(api, "shop"), "served once the token is accepted", 40.0)
    assert "HTTP 401" in controller.log.read_text()


async def test_a_namespace_with_an_injected_pod_is_served(api: KubeApiServer,
                                                          controller: Controller) -> None:
    """The per-pod opt-in: no namespace label, only a pod the webhook injected."""
    api.put("namespaces", namespace("legacy-apps"))
    api.put("pods", pod("plain", "default", {}))
    api.put("pods", pod("asked", "default", {"equilibrium.io/inject": "true"}))  # not injected
    controller.start()
    await until(lambda: served(api, "shop"), "the labelled namespace is served")
    await until(lambda: api.count("pods", "watch") >= 1, "the controller watches pods")
    assert not served(api, "legacy-apps") and not served(api, "default")
    api.put("pods", pod("app-1", "legacy-apps", {"equilibrium.io/inject": "true",
                                                  "equilibrium.io/status": "injected"}))
    await until(lambda: served(api, "legacy-apps"), "the injected pod's namespace is served")
    assert not served(api, "default")
    # it asked for the pods' metadata only, never their specs
    pod_reads = [p for p in api.requests if p[0] == "pods"]
    assert pod_reads and api.pod_accepts and all(
        "as=PartialObjectMetadata" in a for a in api.pod_accepts)


async def test_watches_that_end_at_once_are_paced(api: KubeApiServer,
                                                  controller: Controller) -> None:
    """A misbehaving API server ending every watch at once: relists back off, never spin."""
    api.empty_watches = True
    controller.start()
    await until(lambda: served(api, "shop"), "the labelled namespace is served")
    await asyncio.sleep(3.0)
    lists = api.count("namespaces", "list")
    assert 2 <= lists <= 12, lists  # unpaced, this would be hundreds
    assert controller.proc is not None and controller.proc.poll() is None


async def test_redis_started_as_installed_takes_the_generated_users(
        api: KubeApiServer, controller: Controller, tmp_path: Path) -> None:
    """k8s/install.yaml's Redis, with its $(VARS) filled from the Secret the controller made:
    the signaler's URL may lead and publish, a namespace's (eq-sidecar) URL only appends
    summaries and cannot write a recommendation."""
    controller.start()
    await until(lambda: served(api, "shop"), "the labelled namespace is served")
    docs = [d for d in yaml.safe_load_all((REPO_ROOT / "k8s/install.yaml").read_text()) if d]
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    env = {}
    for var in container["env"]:
        ref = var["valueFrom"]["secretKeyRef"]
        values = api.secret_values(SYSTEM, ref["name"])
        assert values is not None, ref
        env[var["name"]] = values[ref["key"]]
    args = list(container["args"])
    for name, value in env.items():
        args = [a.replace(f"$({name})", value) for a in args]
    assert not [a for a in args if "$(" in a]
    args[args.index("--dir") + 1] = str(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([find_redis_server().path, *args, "--port", str(port),
                             "--bind", "127.0.0.1", "--save", ""],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clients: list[redis.Redis] = []
    try:
        host = "equilibrium-redis-0.equilibrium-redis.equilibrium-system.svc:6379"

        def connect(url: str) -> redis.Redis:
            client = redis.Redis.from_url(url.replace(host, f"127.0.0.1:{port}"))
            clients.append(client)
            return client

        admin = connect(f"redis://:{env['REDIS_PASSWORD']}@{host}/0")
        await until(lambda: _pings(admin), "redis-server answers", 10.0)
        signaler_values = api.secret_values(SYSTEM, "equilibrium-mesh")
        sidecar_values = api.secret_values("shop", "equilibrium-mesh")
        assert signaler_values is not None and sidecar_values is not None
        signaler = connect(signaler_values["redis-url"])
        sidecar = connect(sidecar_values["redis-url"])
        assert signaler.set(leader_key("orders"), "me 1")
        assert sidecar.xadd(summary_stream("orders"), {"v": "1"})
        with pytest.raises(NoPermissionError):
            sidecar.xadd(recommendation_stream("orders", "sc-1"), {"v": "1"})
        with pytest.raises(NoPermissionError):
            sidecar.delete(summary_stream("orders"))
        with pytest.raises(NoPermissionError):
            signaler.flushall()
    finally:
        for client in clients:
            client.close()
        proc.terminate()
        proc.wait(timeout=10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


async def test_a_certificate_already_there_is_kept_and_a_stale_ca_bundle_corrected(
        api: KubeApiServer, controller: Controller) -> None:
    """cert-manager or `bootstrap-certs` made the certificate: the controller keeps it and
    points caBundle at its CA (a caBundle left from an older install is replaced)."""
    bundle = certs.bootstrap("equilibrium-injector", SYSTEM, dt.datetime.now(dt.UTC))
    api.put("secrets", certs.tls_secret(bundle, SYSTEM))
    hooks = webhook_configuration()
    for hook in hooks["webhooks"]:  # type: ignore[attr-defined]
        hook["clientConfig"]["caBundle"] = base64.b64encode(b"stale").decode()
    api.put(WEBHOOKS, hooks)
    controller.start()
    await until(lambda: served(api, "shop"), "the labelled namespace is served")
    tls = api.secret_values(SYSTEM, "equilibrium-injector-tls")
    assert tls is not None and tls["tls.crt"] == bundle.cert_pem.decode()
    config = api.object(WEBHOOKS, "", "equilibrium-injector")
    assert config is not None
    assert {h["clientConfig"]["caBundle"] for h in config["webhooks"]} == {bundle.ca_bundle}


@pytest.mark.slow
async def test_a_namespace_the_api_refuses_does_not_hold_up_the_others(
        api: KubeApiServer, controller: Controller) -> None:
    """A namespace where writes are forbidden (a policy, a quota) is skipped and retried;
    the namespaces listed after it and labelled later are served meanwhile."""
    api.put("namespaces", namespace("aaa-locked", {"equilibrium.io/injection": "enabled"}))
    api.forbidden_writes.add("aaa-locked")
    controller.start()
    await until(lambda: served(api, "shop"), "a namespace after the refused one is served")
    api.put("namespaces", namespace("later", {"equilibrium.io/injection": "enabled"}))
    await until(lambda: served(api, "later"), "a namespace labelled later is served")
    assert not served(api, "aaa-locked")
    assert controller.proc is not None and controller.proc.poll() is None
    api.forbidden_writes.clear()
    await until(lambda: served(api, "aaa-locked"), "the refused namespace, once allowed",
                RETRY_S + BOUND_S)
    assert "HTTP 403" in controller.log.read_text()


async def test_a_certificate_without_its_ca_is_kept_and_the_ca_bundle_left_alone(
        api: KubeApiServer, controller: Controller) -> None:
    bundle = certs.bootstrap("equilibrium-injector", SYSTEM, dt.datetime.now(dt.UTC))
    secret = certs.tls_secret(bundle, SYSTEM)
    del secret["data"]["ca.crt"]
    api.put("secrets", secret)
    controller.start()
    await until(lambda: served(api, "shop"), "the labelled namespace is served")
    assert api.secret_values(SYSTEM, "equilibrium-injector-tls") == {
        "tls.crt": bundle.cert_pem.decode(), "tls.key": bundle.key_pem.decode()}
    config = api.object(WEBHOOKS, "", "equilibrium-injector")
    assert config is not None
    assert all("caBundle" not in h["clientConfig"] for h in config["webhooks"])
    assert api.count(WEBHOOKS, "patch") == 0
    controller.stop()
    assert "has no ca.crt" in controller.log.read_text()


def _replace_values(api: KubeApiServer, name: str, **values: str) -> None:
    """An operator rotating a control-plane Secret by hand (``kubectl edit``)."""
    secret = api.object("secrets", SYSTEM, name)
    assert secret is not None
    data = {**secret["data"], **{k.replace("_", "-"): base64.b64encode(v.encode()).decode()
                                 for k, v in values.items()}}
    api.put("secrets", {**secret, "data": data})


async def test_rotated_secrets_reach_the_namespaces_without_a_restart(
        api: KubeApiServer, controller: Controller) -> None:
    """The mesh key, a Redis password and the webhook certificate rotated while the
    controller runs: every managed namespace's copy (and the signaler's URL, and the
    caBundle) follows within a bound, by the same process."""
    api.put("namespaces", namespace("legacy-apps"))
    api.put("pods", pod("app-1", "legacy-apps", {"equilibrium.io/status": "injected"}))
    controller.start()
    await until(lambda: controller.metrics() != "", "the controller is up", 60.0)
    await until(lambda: served(api, "shop") and served(api, "legacy-apps"),
                "both namespaces are served")
    await until(lambda: api.count("secrets", "watch") >= 3, "the controller watches its Secrets")
    assert controller.proc is not None
    pid = controller.proc.pid
    writes = len([r for r in api.requests if r[1] in ("create", "update", "patch")])
    await asyncio.sleep(0.5)  # its own writes came back as events: nothing more written
    assert len([r for r in api.requests if r[1] in ("create", "update", "patch")]) == writes

    def copy(ns: str) -> dict[str, str]:
        values = api.secret_values(ns, "equilibrium-mesh")
        assert values is not None
        return values

    # the mesh key
    _replace_values(api, "equilibrium-mesh", mesh_hmac_key="k" * 64)
    await until(lambda: copy("shop")["mesh-hmac-key"] == "k" * 64
                and copy("legacy-apps")["mesh-hmac-key"] == "k" * 64,
                "the new mesh key reaches every managed namespace")
    # the sidecars' and the signaler's Redis passwords
    _replace_values(api, "equilibrium-redis-auth", sidecar_password="s" * 64,
                    signaler_password="g" * 64)
    await until(lambda: ":" + "s" * 64 + "@" in copy("shop")["redis-url"]
                and ":" + "s" * 64 + "@" in copy("legacy-apps")["redis-url"],
                "the new sidecar password reaches every managed namespace")
    await until(lambda: ":" + "g" * 64 + "@" in copy(SYSTEM)["redis-url"],
                "the signaler's URL follows its new password")
    assert copy("shop")["mesh-hmac-key"] == "k" * 64
    # the webhook certificate: deleted, so generated anew; the caBundle follows its CA
    old_ca = api.secret_values(SYSTEM, "equilibrium-injector-tls")["ca.crt"]  # type: ignore[index]
    api.delete("secrets", SYSTEM, "equilibrium-injector-tls")

    def ca_bundles() -> set[str]:
        hooks = api.object(WEBHOOKS, "", "equilibrium-injector")
        assert hooks is not None
        return {base64.b64decode(h["clientConfig"].get("caBundle", "")).decode()
                for h in hooks["webhooks"]}

    await until(lambda: (tls := api.secret_values(SYSTEM, "equilibrium-injector-tls"))
                is not None and tls["ca.crt"] != old_ca and ca_bundles() == {tls["ca.crt"]},
                "a new certificate, and the caBundle set to its CA")
    assert controller.proc.poll() is None and controller.proc.pid == pid  # no restart
    assert controller.metric("equilibrium_controller_rotations_total",
                             secret="equilibrium-mesh") >= 1
    assert controller.metric("equilibrium_controller_rotations_total",
                             secret="equilibrium-redis-auth") >= 1
    assert controller.metric("equilibrium_controller_rotations_total",
                             secret="equilibrium-injector-tls") >= 1
    # watched by name only: the controller never listed or watched other Secrets
    secret_reads = [params for r, verb, params in api.requests
                    if r == "secrets" and verb in ("list", "watch")]
    assert secret_reads and all(p.get("fieldSelector", "").startswith("metadata.name=")
                                for p in secret_reads)
    controller.stop()
    log = controller.log.read_text()
    assert "k" * 64 not in log and "s" * 64 not in log and "g" * 64 not in log


async def test_metrics_count_reconciles_errors_and_managed_namespaces(
        api: KubeApiServer, controller: Controller) -> None:
    api.put("namespaces", namespace("aaa-locked", {"equilibrium.io/injection": "enabled"}))
    api.forbidden_writes.add("aaa-locked")
    controller.start()
    await until(lambda: controller.metrics() != "", "the controller is up", 60.0)
    await until(lambda: served(api, "shop"), "the labelled namespace is served")
    await until(lambda: controller.metric("equilibrium_controller_reconciles_total",
                                          result="error") >= 1, "the refusal is counted")
    text = controller.metrics()
    assert metric_value(text, "equilibrium_controller_reconciles_total", result="ok") >= 1
    assert metric_value(text, "equilibrium_controller_managed_namespaces") == 1
    assert metric_value(text, "equilibrium_controller_control_plane_ready") == 1
    api.put("namespaces", namespace("payments", {"equilibrium.io/injection": "enabled"}))
    await until(lambda: controller.metric("equilibrium_controller_managed_namespaces") == 2,
                "a namespace labelled later is counted")
    assert controller.metric("equilibrium_controller_errors_total", loop="namespaces") == 0
    api.token = "rotated"  # the token stops working: every loop fails, and says so
    api.cut_watches()
    await until(lambda: controller.metric("equilibrium_controller_errors_total",
                                          loop="namespaces") >= 1, "the loop errors are counted")
    with urllib.request.urlopen(
            f"http://127.0.0.1:{controller.metrics_port}/healthz", timeout=2) as resp:
        assert resp.status == 200
