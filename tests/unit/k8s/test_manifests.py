"""k8s/: install.yaml is the rendering of k8s/base, and every manifest is valid and safe.

Needs kubectl (it embeds kustomize): on these machines it is /usr/bin/kubectl.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from injector.config import InjectorConfig
from injector.review import review
from tests.injector_support import KUBERNETES_VERSIONS, apply_patch, decode_patch, make_review
from tests.integration.procs import REPO_ROOT

INSTALL = REPO_ROOT / "k8s" / "install.yaml"
EXAMPLE = REPO_ROOT / "k8s" / "examples" / "my-legacy-java-app.yaml"


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


INSTALL_DOCS = load(INSTALL)
EXAMPLE_DOCS = load(EXAMPLE)


def test_install_yaml_is_up_to_date_with_kustomize_sources(tmp_path: Path) -> None:
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is not on PATH: install it (it embeds kustomize) to check that "
                    "k8s/install.yaml matches k8s/base, e.g. apt-get install kubectl")
    out = tmp_path / "install.yaml"
    subprocess.run([str(REPO_ROOT / "scripts/image/render-install.sh"), str(out)],
                   check=True, capture_output=True, timeout=60)
    assert out.read_text() == INSTALL.read_text(), (
        "k8s/install.yaml is stale: run scripts/image/render-install.sh and commit the result")


def doc_id(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("doc", INSTALL_DOCS + EXAMPLE_DOCS, ids=doc_id)
def test_every_manifest_validates_strictly(doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def test_the_example_pod_after_injection_validates() -> None:
    deployment = by_kind(EXAMPLE_DOCS, "Deployment")
    template = deployment["spec"]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {**template["metadata"], "namespace": "legacy-apps",
                        "generateName": "my-legacy-java-app-"},
           "spec": template["spec"]}
    patched = apply_patch(pod, decode_patch(review(make_review(pod), InjectorConfig())))
    names = [c["name"] for c in patched["spec"]["containers"]]
    assert names == ["equilibrium-sidecar", "app"]
    sidecar = patched["spec"]["containers"][0]
    assert sidecar["args"][sidecar["args"].index("--strategy") + 1] == "aggressive-learning"
    init = patched["spec"]["initContainers"][0]
    assert init["args"][init["args"].index("--exclude-outbound-ports") + 1] == "5432"
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(patched, version, strict=True)


def test_webhook_configuration() -> None:
    mwc = by_kind(INSTALL_DOCS, "MutatingWebhookConfiguration", "equilibrium-injector")
    service = by_kind(INSTALL_DOCS, "Service", "equilibrium-injector")
    paths = set()
    for hook in mwc["webhooks"]:
        assert hook["admissionReviewVersions"] == ["v1"]
        assert hook["failurePolicy"] == "Ignore"
        assert hook["sideEffects"] == "None"
        assert hook["timeoutSeconds"] == 5
        assert hook["rules"] == [{"apiGroups": [""], "apiVersions": ["v1"],
                                  "operations": ["CREATE"], "resources": ["pods"],
                                  "scope": "Namespaced"}]
        ref = hook["clientConfig"]["service"]
        assert (ref["name"], ref["namespace"]) == ("equilibrium-injector", "equilibrium-system")
        assert ref["port"] == service["spec"]["ports"][0]["port"]
        paths.add(ref["path"])
        keys = {e["key"] for e in hook["namespaceSelector"]["matchExpressions"]}
        assert "equilibrium.io/injection" in keys
        assert hook["objectSelector"]["matchExpressions"] == [
            {"key": "app.kubernetes.io/name", "operator": "NotIn",
             "values": ["equilibrium-injector"]}]
    assert paths == {"/mutate", "/mutate/namespace"}
    enabled = next(h for h in mwc["webhooks"] if h["clientConfig"]["service"]["path"]
                   == "/mutate/namespace")
    assert enabled["namespaceSelector"]["matchExpressions"] == [
        {"key": "equilibrium.io/injection", "operator": "In", "values": ["enabled"]}]
    namespace = by_kind(INSTALL_DOCS, "Namespace", "equilibrium-system")
    assert namespace["metadata"]["labels"]["equilibrium.io/injection"] == "disabled"


def pod_spec(kind: str, name: str) -> dict[str, Any]:
    return by_kind(INSTALL_DOCS, kind, name)["spec"]["template"]["spec"]


@pytest.mark.parametrize(("kind", "name"), [("Deployment", "equilibrium-signaler"),
                                            ("Deployment", "equilibrium-injector"),
                                            ("StatefulSet", "equilibrium-redis")])
def test_workloads_are_non_root_hardened_and_probed(kind: str, name: str) -> None:
    spec = pod_spec(kind, name)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert "readinessProbe" in c and "livenessProbe" in c
        assert "limits" in c["resources"]


def test_redis_statefulset() -> None:
    sts = by_kind(INSTALL_DOCS, "StatefulSet", "equilibrium-redis")
    svc = by_kind(INSTALL_DOCS, "Service", "equilibrium-redis")
    assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == "equilibrium-redis"
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    (redis,) = sts["spec"]["template"]["spec"]["containers"]
    assert redis["args"][:2] == ["--requirepass", "$(REDIS_PASSWORD)"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in redis["env"]}
    assert refs["REDIS_PASSWORD"] == {"name": "equilibrium-redis-auth", "key": "password"}
    assert refs["REDISCLI_AUTH"] == refs["REDIS_PASSWORD"]  # the probes authenticate
    for probe in ("readinessProbe", "livenessProbe"):
        assert "redis-cli -h 127.0.0.1 ping" in " ".join(redis[probe]["exec"]["command"])


def test_signaler_runs_two_replicas_and_pdbs_cover_the_control_plane() -> None:
    assert by_kind(INSTALL_DOCS, "Deployment", "equilibrium-signaler")["spec"]["replicas"] == 2
    for name in ("equilibrium-signaler", "equilibrium-injector"):
        deployment = by_kind(INSTALL_DOCS, "Deployment", name)
        pdb = by_kind(INSTALL_DOCS, "PodDisruptionBudget", name)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]


def test_no_secret_values_are_committed() -> None:
    assert not [d for d in INSTALL_DOCS + EXAMPLE_DOCS if d["kind"] == "Secret"]


def test_rbac_is_least_privilege() -> None:
    roles = [d for d in INSTALL_DOCS if d["kind"] in ("Role", "ClusterRole")]
    assert sorted(doc_id(r) for r in roles) == [
        "ClusterRole/equilibrium-controller", "ClusterRole/equilibrium-sidecar",
        "Role/equilibrium-controller"]
    assert by_kind(INSTALL_DOCS, "ClusterRole", "equilibrium-sidecar")["rules"] == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
         "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch"]},
    ]
    # The controller: cluster-wide it may read namespaces and create; everything it reads or
    # updates is named. No delete, no list of secrets, no wildcard.
    for role in roles:
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
            assert "delete" not in rule["verbs"]
            if rule["resources"] == ["secrets"] or set(rule["verbs"]) & {"update", "patch"}:
                assert rule.get("resourceNames") or rule["verbs"] == ["create"], rule
    controller = by_kind(INSTALL_DOCS, "ClusterRole", "equilibrium-controller")["rules"]
    assert {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"],
            "resourceNames": ["equilibrium-sidecar"], "verbs": ["bind"]} in controller
    assert {"apiGroups": ["admissionregistration.k8s.io"],
            "resources": ["mutatingwebhookconfigurations"],
            "resourceNames": ["equilibrium-injector"], "verbs": ["get", "patch"]} in controller
    system = by_kind(INSTALL_DOCS, "Role", "equilibrium-controller")
    assert system["metadata"]["namespace"] == "equilibrium-system"
    assert system["rules"][0]["resourceNames"] == ["equilibrium-redis-auth",
                                                   "equilibrium-injector-tls"]
    # it watches its three Secrets to pass rotations on: by name (fieldSelector), nothing else
    assert system["rules"][1] == {
        "apiGroups": [""], "resources": ["secrets"], "verbs": ["list", "watch"],
        "resourceNames": ["equilibrium-redis-auth", "equilibrium-mesh",
                          "equilibrium-injector-tls"]}
    assert not [rule for role in roles for rule in role["rules"]
                if {"list", "watch"} & set(rule["verbs"]) and "secrets" in rule["resources"]
                and (role["kind"] == "ClusterRole" or not rule.get("resourceNames"))]
    # Only the controller is bound; the injector and the signaler get no API access at all.
    bindings = [d for d in INSTALL_DOCS if d["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    assert sorted(doc_id(b) for b in bindings) == ["ClusterRoleBinding/equilibrium-controller",
                                                   "RoleBinding/equilibrium-controller"]
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount",
                                        "name": "equilibrium-controller",
                                        "namespace": "equilibrium-system"}]
    for name in ("equilibrium-injector", "equilibrium-signaler", "equilibrium-controller"):
        assert by_kind(INSTALL_DOCS, "ServiceAccount", name)["automountServiceAccountToken"] \
            is False
    assert pod_spec("Deployment", "equilibrium-controller")["automountServiceAccountToken"]
    # The example namespace opts in by label; the controller makes its RoleBinding.
    assert not [d for d in EXAMPLE_DOCS if d["kind"] == "RoleBinding"]
    labels = by_kind(EXAMPLE_DOCS, "Namespace")["metadata"]["labels"]
    assert labels == {"equilibrium.io/mesh": "enabled"}


def test_the_controller_serves_what_the_workloads_mount() -> None:
    """The Secrets and keys Redis, the signaler and the injector read are the ones the
    controller generates, under the names its RBAC allows."""
    from injector import mesh_objects
    from injector.certs import TLS_SECRET

    refs = set()
    for kind, name in (("StatefulSet", "equilibrium-redis"),
                       ("Deployment", "equilibrium-signaler")):
        for container in pod_spec(kind, name)["containers"]:
            for env in container.get("env", []):
                ref = env["valueFrom"]["secretKeyRef"]
                refs.add((ref["name"], ref["key"]))
    generated = {(mesh_objects.REDIS_AUTH_SECRET, k) for k in mesh_objects.REDIS_AUTH_KEYS}
    generated |= {(mesh_objects.MESH_SECRET, "mesh-hmac-key"),
                  (mesh_objects.MESH_SECRET, "redis-url")}
    assert refs == generated
    assert pod_spec("Deployment", "equilibrium-injector")["volumes"][0]["secret"][
        "secretName"] == TLS_SECRET
    (container,) = pod_spec("Deployment", "equilibrium-controller")["containers"]
    args = container["args"]
    assert args[:2] == ["injector", "controller"]
    assert args[args.index("--redis-host") + 1] == mesh_objects.DEFAULT_REDIS_HOST
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"] == {"drop": ["ALL"]}
    assert "limits" in container["resources"]
    # its metrics: the port it binds is declared, probed and scraped
    port = int(args[args.index("--metrics") + 1].rpartition(":")[2])
    assert container["ports"] == [{"name": "metrics", "containerPort": port}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    annotations = by_kind(INSTALL_DOCS, "Deployment", "equilibrium-controller")["spec"][
        "template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_injector_serves_the_mounted_secret() -> None:
    spec = pod_spec("Deployment", "equilibrium-injector")
    (injector,) = spec["containers"]
    args = injector["args"]
    mount = injector["volumeMounts"][0]["mountPath"]
    assert args[args.index("--tls-cert") + 1] == f"{mount}/tls.crt"
    assert args[args.index("--tls-key") + 1] == f"{mount}/tls.key"
    assert spec["volumes"][0]["secret"]["secretName"] == "equilibrium-injector-tls"
    assert injector["image"] == args[args.index("--sidecar-image") + 1] == "equilibrium:local"


def parse_with_the_real_cli(args: list[str]) -> None:
    """The flags we put in manifests and patches must exist in the CLIs they call."""
    from equilibrium.cli import build_parser

    expanded = [a.replace("$(POD_NAME)", "pod-0") for a in args]
    try:
        build_parser(expanded).parse_args(expanded)
    except SystemExit as exc:
        pytest.fail(f"`equilibrium {' '.join(expanded)}` is rejected by its parser ({exc})")


def test_container_args_are_accepted_by_the_equilibrium_cli() -> None:
    for kind, name in (("Deployment", "equilibrium-signaler"),
                       ("Deployment", "equilibrium-injector"),
                       ("Deployment", "equilibrium-controller")):
        (container,) = pod_spec(kind, name)["containers"]
        parse_with_the_real_cli(container["args"])
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"annotations": {
        "equilibrium.io/inject": "true", "equilibrium.io/exclude-outbound-ports": "5432"}},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]}}
    patched = apply_patch(pod, decode_patch(review(make_review(pod), InjectorConfig())))
    parse_with_the_real_cli(patched["spec"]["containers"][0]["args"])
    parse_with_the_real_cli(patched["spec"]["initContainers"][0]["args"])


def test_redis_has_the_least_privilege_users_of_wire_acl() -> None:
    from wire.acl import ROLES, acl_rules

    sts = by_kind(INSTALL_DOCS, "StatefulSet", "equilibrium-redis")
    (redis,) = sts["spec"]["template"]["spec"]["containers"]
    args = redis["args"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in redis["env"]}
    users = {}
    for i, token in enumerate(args):
        if token == "--user":
            end = next((j for j in range(i + 1, len(args)) if args[j].startswith("--")),
                       len(args))
            users[args[i + 1]] = args[i + 2:end]
    assert set(users) == {user for user, _ in ROLES.values()}
    for role, (user, _) in ROLES.items():
        env = users[user][2].removeprefix(">$(").removesuffix(")")
        assert refs[env] == {"name": "equilibrium-redis-auth", "key": f"{role}-password"}
        rules = acl_rules(role, "x" * 16)
        assert users[user] == [*rules[:2], users[user][2], *rules[3:]]
