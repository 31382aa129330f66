"""The injector's pure core: AdmissionReview in, response + JSON Patch out (injector/review.py).

Each test builds a full AdmissionReview, calls the pure function, applies the returned patch
with an independent RFC 6902 applier and validates the patched pod strictly.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from equilibrium.cli import build_parser
from injector.config import IPV6_MODES, STRATEGY_PROFILES, InjectorConfig
from injector.podspec import IMAGE_ENTRYPOINT
from injector.review import MalformedReview, Outcome, decide, review
from mesh.profiles import PROFILES
from sidecar.cli import flags_from_args
from sidecar.config import ConfigSource
from tests.injector_support import (
    apply_patch,
    assert_valid,
    decode_patch,
    make_pod,
    make_review,
)

CONFIG = InjectorConfig(image="equilibrium:test")
INJECT = {"equilibrium.io/inject": "true"}


def inject(pod: dict[str, Any], **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Review ``pod``; return (response, patched pod). Fails if nothing was injected."""
    response = review(make_review(pod), CONFIG, **kwargs)
    assert response["response"]["allowed"] is True
    return response, apply_patch(pod, decode_patch(response))


def container(pod: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    key = "initContainers" if init else "containers"
    (found,) = [c for c in pod["spec"].get(key) or [] if c["name"] == name]
    return found


def arg_after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


# ---- the injected pod -------------------------------------------------------------------------
def test_annotated_pod_gets_sidecar_and_init_and_validates() -> None:
    review_in = make_review(make_pod(INJECT))
    response = review(review_in, CONFIG)
    assert response["apiVersion"] == "admission.k8s.io/v1"
    assert response["kind"] == "AdmissionReview"
    assert response["response"]["uid"] == review_in["request"]["uid"]
    patched = apply_patch(review_in["request"]["object"], decode_patch(response))
    assert_valid(patched)

    sidecar = container(patched, "equilibrium-sidecar")
    assert sidecar["image"] == "equilibrium:test"
    args = sidecar["args"]
    assert args[0] == "sidecar"
    assert arg_after(args, "--outbound") == "0.0.0.0:15001"
    assert arg_after(args, "--inbound") == "0.0.0.0:15006"
    assert arg_after(args, "--admin") == "0.0.0.0:15020"
    assert arg_after(args, "--app") == "http://127.0.0.1:8080"
    assert arg_after(args, "--strategy") == "balanced"
    assert arg_after(args, "--id") == "$(POD_NAME)"
    assert "--transparent" in args and "--discovery" in args
    env = {e["name"]: e["valueFrom"] for e in sidecar["env"]}
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["EQUILIBRIUM_MESH_SECRET"]["secretKeyRef"] == {"name": "equilibrium-mesh",
                                                              "key": "mesh-hmac-key"}
    assert env["EQUILIBRIUM_REDIS_URL"]["secretKeyRef"]["key"] == "redis-url"
    assert not any("secret" in a.lower() or "redis://" in a for a in args)
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 15020}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 15020}
    assert set(sidecar["resources"]) == {"requests", "limits"}
    sc = sidecar["securityContext"]
    assert sc["runAsUser"] == 1337 and sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}

    init = container(patched, "equilibrium-init", init=True)
    assert init["args"][0] == "init"
    assert arg_after(init["args"], "--outbound-port") == "15001"
    assert arg_after(init["args"], "--inbound-port") == "15006"
    assert arg_after(init["args"], "--proxy-uid") == "1337"
    assert arg_after(init["args"], "--exclude-inbound-ports") == "15020"
    isc = init["securityContext"]
    assert isc["runAsUser"] == 0 and isc["runAsNonRoot"] is False
    assert isc["allowPrivilegeEscalation"] is False and isc["privileged"] is False
    assert isc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}

    annotations = patched["metadata"]["annotations"]
    assert annotations["equilibrium.io/status"] == "injected"
    assert annotations["kubectl.kubernetes.io/default-container"] == "app"
    assert annotations["equilibrium.io/inject"] == "true"  # the user's annotations stay
    assert [c["name"] for c in patched["spec"]["containers"]] == ["equilibrium-sidecar", "app"]


def test_an_ordinary_sidecar_holds_the_apps_start_and_outlives_its_stop() -> None:
    # first among containers: the kubelet runs its postStart hook (wait for /readyz) to the
    # end before it starts the app; its preStop hook keeps it serving while the app stops
    pod = make_pod(INJECT)
    pod["spec"]["containers"].append({"name": "helper", "image": "helper:1"})
    patched = apply_patch(pod, decode_patch(review(make_review(pod), CONFIG)))
    assert_valid(patched)
    assert [c["name"] for c in patched["spec"]["containers"]] == [
        "equilibrium-sidecar", "app", "helper"]
    hooks = container(patched, "equilibrium-sidecar")["lifecycle"]
    start = hooks["postStart"]["exec"]["command"]
    assert start[:3] == [IMAGE_ENTRYPOINT, "sidecar-hook", "post-start"]
    assert arg_after(start, "--admin") == "127.0.0.1:15020"
    assert arg_after(start, "--timeout") == "60"
    stop = hooks["preStop"]["exec"]["command"]
    assert stop == [IMAGE_ENTRYPOINT, "sidecar-hook", "pre-stop", "--seconds", "5"]
    for command in (start, stop):  # what the image's own CLI accepts
        args = build_parser(command[1:]).parse_args(command[1:])
        assert args.func is not None
    assert patched["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "app"


def test_a_shutdown_delay_of_zero_leaves_out_the_prestop_hook() -> None:
    config = InjectorConfig(image="equilibrium:test", shutdown_delay=0)
    patched = apply_patch(make_pod(INJECT), decode_patch(review(make_review(make_pod(INJECT)),
                                                                config)))
    hooks = container(patched, "equilibrium-sidecar")["lifecycle"]
    assert set(hooks) == {"postStart"}
    for argv in (["injector", "--log-format", "json", "controller"],
                 ["injector", "controller", "--log-format", "json"]):
        assert build_parser(argv).parse_args(argv).log_format == "json"
    argv = ["injector", "controller"]
    assert build_parser(argv).parse_args(argv).log_format == "plain"
    delay = build_parser(["injector"]).parse_args(["injector", "--shutdown-delay", "12.5"])
    assert delay.shutdown_delay == 12.5
    assert build_parser(["injector"]).parse_args(["injector"]).shutdown_delay == 5.0


@pytest.mark.parametrize(("hook", "delay"), [
    ({"sleep": {"seconds": 15}}, "20"),
    ({"exec": {"command": ["sleep", "15"]}}, "20"),
    ({"exec": {"command": ["/bin/sh", "-c", "sleep 12.5"]}}, "17.5"),
])
def test_the_sidecar_outlasts_the_apps_own_prestop_wait(hook: dict[str, Any],
                                                        delay: str) -> None:
    # the kubelet runs every preStop hook at once: the sidecar's must end after the app's
    pod = make_pod(INJECT)
    pod["spec"]["containers"][0]["lifecycle"] = {"preStop": hook}
    verdict = decide(make_review(pod), CONFIG)
    assert verdict.outcome is Outcome.INJECTED
    patched = apply_patch(pod, [dict(op) for op in verdict.patch])
    stop = container(patched, "equilibrium-sidecar")["lifecycle"]["preStop"]["exec"]["command"]
    assert stop[-2:] == ["--seconds", delay]
    assert "warnings" not in verdict.response["response"]
    assert container(patched, "app")["lifecycle"] == {"preStop": hook}  # the app's untouched


@pytest.mark.parametrize(("grace", "app_wait", "delay", "drain", "warned"), [
    (None, None, "5", None, False),  # the defaults fit: 5 s, then a drain of up to 20 s
    (30, 15, "20", "9", False),  # the delay fits; the drain ends a second before the kill
    (12, 2, "6", "5", True),  # the delay is cut to keep 5 s for the drain
    (30, 25, "25", "4", True),  # but never to end before the app's own wait does
    (10, 15, "10", "1", True),  # a wait past the grace period: both are killed at its end
    (3, None, None, "2", True),  # no room for a delay at all: no hook
    (0, None, None, "1", True),
])
def test_the_sidecars_stop_fits_the_pods_grace_period(grace: int | None, app_wait: int | None,
                                                       delay: str | None, drain: str | None,
                                                       warned: bool) -> None:
    # past terminationGracePeriodSeconds the kubelet kills what still runs: the sidecar's
    # delay and drain are fitted into it, and a delay cut short is said
    pod = make_pod(INJECT)
    if grace is not None:
        pod["spec"]["terminationGracePeriodSeconds"] = grace
    if app_wait is not None:
        pod["spec"]["containers"][0]["lifecycle"] = {"preStop": {"sleep": {"seconds": app_wait}}}
    verdict = decide(make_review(pod), CONFIG)
    assert verdict.outcome is Outcome.INJECTED
    patched = apply_patch(pod, [dict(op) for op in verdict.patch])
    assert_valid(patched)
    sidecar = container(patched, "equilibrium-sidecar")
    stop = sidecar["lifecycle"].get("preStop")
    assert (stop["exec"]["command"][-1] if stop else None) == delay
    args = sidecar["args"]
    assert (arg_after(args, "--drain-timeout") if "--drain-timeout" in args else None) == drain
    assert build_parser(args).parse_args(args).func is not None  # the sidecar's CLI takes it
    warnings = verdict.response["response"].get("warnings", [])
    assert any("terminationGracePeriodSeconds" in w for w in warnings) == warned


def test_a_native_sidecars_drain_is_left_alone() -> None:
    # the kubelet stops a native sidecar only after the app exited: no hook, and its drain
    # is not the app's to fit
    pod = make_pod(INJECT)
    pod["spec"]["terminationGracePeriodSeconds"] = 5
    config = InjectorConfig(image="equilibrium:test", native_sidecar=True)
    verdict = decide(make_review(pod), config)
    patched = apply_patch(pod, [dict(op) for op in verdict.patch])
    [sidecar] = [c for c in patched["spec"]["initContainers"]
                 if c["name"] == "equilibrium-sidecar"]
    assert "--drain-timeout" not in sidecar["args"] and "lifecycle" not in sidecar
    assert "warnings" not in verdict.response["response"]


@pytest.mark.parametrize("command", [[["sleep"], "15"], ["sleep", {"n": 1}], ["sleep"],
                                     ["sh", "-c", "sleep 1; curl x"], ["sleep", "-5"],
                                     ["sleep", "nan"], "sleep 15", None])
def test_odd_prestop_commands_are_untimed_never_an_error(command: Any) -> None:
    pod = make_pod(INJECT)
    pod["spec"]["containers"][0]["lifecycle"] = {"preStop": {"exec": {"command": command}}}
    verdict = decide(make_review(pod), CONFIG)
    assert verdict.outcome is Outcome.INJECTED
    assert "cannot time" in verdict.response["response"]["warnings"][0]


def test_a_prestop_hook_that_cannot_be_timed_gets_a_warning() -> None:
    pod = make_pod(INJECT)
    pod["spec"]["containers"][0]["lifecycle"] = {
        "preStop": {"httpGet": {"path": "/drain", "port": 8080}}}
    verdict = decide(make_review(pod), CONFIG)
    assert verdict.outcome is Outcome.INJECTED
    [warning] = verdict.response["response"]["warnings"]
    assert "'app' has a preStop hook the injector cannot time" in warning
    native = decide(make_review(pod), InjectorConfig(image="x", native_sidecar=True))
    assert "warnings" not in native.response["response"]  # the kubelet orders those itself


def test_the_sidecars_log_format_is_the_injectors_to_choose() -> None:
    env = container(inject(make_pod(INJECT))[1], "equilibrium-sidecar")["env"]
    assert "EQUILIBRIUM_LOG_FORMAT" not in {e["name"] for e in env}  # plain: the default
    config = InjectorConfig(image="equilibrium:test", sidecar_log_format="json")
    patched = apply_patch(make_pod(INJECT), decode_patch(review(make_review(make_pod(INJECT)),
                                                                config)))
    env = container(patched, "equilibrium-sidecar")["env"]
    assert {"name": "EQUILIBRIUM_LOG_FORMAT", "value": "json"} in env
    args = build_parser(["injector"]).parse_args(["injector", "--sidecar-log-format", "json"])
    assert args.sidecar_log_format == "json"


def test_the_hooks_name_the_images_own_entrypoint() -> None:
    dockerfile = (Path(__file__).resolve().parents[3] / "Dockerfile").read_text()
    assert f'ENTRYPOINT ["{IMAGE_ENTRYPOINT}"]' in dockerfile


def test_a_native_sidecar_follows_the_init_container_and_keeps_the_apps_containers() -> None:
    # --native-sidecar: the proxy as an init container that keeps running (Kubernetes
    # 1.29+), after the rules' init container, behind a startup probe the app waits for
    config = InjectorConfig(image="equilibrium:test", native_sidecar=True)
    pod = make_pod(INJECT)
    pod["spec"]["initContainers"] = [{"name": "migrate", "image": "app:1"}]
    response = review(make_review(pod), config)
    patched = apply_patch(pod, decode_patch(response))
    assert_valid(patched)  # against the oldest supported schema (1.29) and the newest
    assert [c["name"] for c in patched["spec"]["initContainers"]] == [
        "migrate", "equilibrium-init", "equilibrium-sidecar"]
    assert [c["name"] for c in patched["spec"]["containers"]] == ["app"]
    sidecar = container(patched, "equilibrium-sidecar", init=True)
    assert "lifecycle" not in sidecar  # the kubelet orders a native sidecar itself
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/readyz", "port": 15020}
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 15020}
    assert sidecar["ports"] == [{"name": "eq-admin", "containerPort": 15020, "protocol": "TCP"}]
    assert "restartPolicy" not in container(patched, "equilibrium-init", init=True)
    assert patched["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "app"
    again = review(make_review(patched), config)  # injected once, never twice
    assert again["response"]["allowed"] is True and "patch" not in again["response"]


def test_the_injector_flag_makes_native_sidecars() -> None:
    args = build_parser(["injector"]).parse_args(["injector", "--native-sidecar"])
    assert args.native_sidecar is True
    assert build_parser(["injector"]).parse_args(["injector"]).native_sidecar is False


def test_missing_lists_and_maps_are_added_whole() -> None:
    pod = make_pod(INJECT)  # no initContainers
    ops = decode_patch(review(make_review(pod), CONFIG))
    paths = {op["path"]: op["value"] for op in ops}
    assert isinstance(paths["/spec/initContainers"], list)
    assert paths["/spec/initContainers"][0]["name"] == "equilibrium-init"
    assert paths["/spec/containers/0"]["name"] == "equilibrium-sidecar"  # first, in the list

    bare = make_pod(None)  # no annotations map at all: inject by namespace default
    response, patched = inject(bare, namespace_default=True)
    ops = decode_patch(response)
    whole = [op for op in ops if op["path"] == "/metadata/annotations"]
    assert len(whole) == 1 and whole[0]["value"]["equilibrium.io/status"] == "injected"
    assert_valid(patched)


def test_existing_lists_are_appended_and_keys_escaped() -> None:
    app_init = {"name": "migrate", "image": "my-company/migrate:1"}
    pod = make_pod({**INJECT, "prometheus.io/scrape": "false"}, init_containers=[app_init])
    response, patched = inject(pod)
    ops = decode_patch(response)
    paths = [op["path"] for op in ops]
    assert "/spec/initContainers/-" in paths
    assert "/metadata/annotations/equilibrium.io~1status" in paths
    assert "/metadata/annotations/kubectl.kubernetes.io~1default-container" in paths
    # The app's own init containers run first, with a normal network.
    assert [c["name"] for c in patched["spec"]["initContainers"]] == ["migrate",
                                                                      "equilibrium-init"]
    # An annotation the app already set is not overwritten.
    assert patched["metadata"]["annotations"]["prometheus.io/scrape"] == "false"
    assert_valid(patched)


def test_pod_without_metadata_is_patched_validly() -> None:
    pod = make_pod(None)
    del pod["metadata"]
    response, patched = inject(pod, namespace_default=True)
    assert decode_patch(response)[0] == {"op": "add", "path": "/metadata", "value": {}}
    assert patched["metadata"]["annotations"]["equilibrium.io/status"] == "injected"


@pytest.mark.parametrize("strategy", STRATEGY_PROFILES)
def test_strategy_annotation_reaches_the_sidecar(strategy: str) -> None:
    _, patched = inject(make_pod({**INJECT, "equilibrium.io/strategy": strategy}))
    args = container(patched, "equilibrium-sidecar")["args"]
    assert arg_after(args, "--strategy") == strategy


def test_strategy_profiles_are_the_sidecars() -> None:
    # The injector validates names from mesh/profile_names.py (no numpy); each must be a profile
    # mesh/profiles.py defines, and every defined profile must be accepted, in the same order.
    assert tuple(PROFILES) == STRATEGY_PROFILES
    assert set(STRATEGY_PROFILES) == {"balanced", "aggressive-learning", "conservative"}


@pytest.mark.parametrize(("annotation", "flags", "parsed"), [
    (None, [], None),  # default: equilibrium init decides from the pod's namespace
    ("auto", [], None),
    ("required", ["--ipv6"], True),
    ("off", ["--no-ipv6"], False),
])
def test_ipv6_annotation_reaches_the_init_container_as_its_flag(
        annotation: str | None, flags: list[str], parsed: bool | None) -> None:
    extra = {} if annotation is None else {"equilibrium.io/ipv6": annotation}
    _, patched = inject(make_pod({**INJECT, "equilibrium.io/exclude-outbound-ports": "5432",
                                  **extra}))
    assert_valid(patched)
    args = container(patched, "equilibrium-init", init=True)["args"]
    assert [a for a in args if a in ("--ipv6", "--no-ipv6")] == flags
    # The real `equilibrium init` parser reads the flag back as the mode the pod asked for.
    assert build_parser(args).parse_args(args).ipv6 is parsed
    # Only interception changes: the sidecar listens on both families whatever the mode.
    _, default = inject(make_pod({**INJECT, "equilibrium.io/exclude-outbound-ports": "5432"}))
    assert (container(patched, "equilibrium-sidecar")
            == container(default, "equilibrium-sidecar"))


def test_long_paths_annotation_reaches_the_sidecars_inbound_policing(tmp_path: Path) -> None:
    """The pod's ``equilibrium.io/long-paths`` becomes its sidecar's --inbound-long-paths,
    which the real sidecar command line reads back as its inbound ``policing.long_paths``."""
    _, patched = inject(make_pod({**INJECT,
                                  "equilibrium.io/long-paths": "/watch, /pkg.Config/Watch"}))
    assert_valid(patched)
    args = container(patched, "equilibrium-sidecar")["args"]
    assert arg_after(args, "--inbound-long-paths") == "/watch,/pkg.Config/Watch"
    flags = flags_from_args(build_parser(args).parse_args(args))
    (tmp_path / "token").write_text("t")  # what the pod's service account mounts
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443",
           "EQUILIBRIUM_KUBE_TOKEN_FILE": str(tmp_path / "token")}
    config = ConfigSource.from_sources(flags, env=env).load()
    assert config.policing.long_paths == ("/watch", "/pkg.Config/Watch")
    _, plain = inject(make_pod(INJECT))
    assert "--inbound-long-paths" not in container(plain, "equilibrium-sidecar")["args"]


def kube_expand(arg: str, env: dict[str, str]) -> str:
    """What the kubelet passes for a container argument: ``$(NAME)`` replaced by the
    container's variable of that name (left as it is when there is none), ``$$`` by ``$``."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
                  arg)


@pytest.mark.parametrize("value", ["/x/$(EQUILIBRIUM_MESH_SECRET)", "/a$$b,/c$",
                                   "/" + "a" * 240 + "$(POD_NAME)"])
def test_a_dollar_in_long_paths_reaches_the_sidecar_as_written(value: str) -> None:
    """The kubelet expands ``$(VAR)`` in a container's arguments (the mesh key is one of the
    sidecar's variables) and ``$$`` to ``$``: what the pod declared arrives unchanged,
    never a secret on the command line nor a path grown past what the injector checked
    (a reviewer's finding)."""
    _, patched = inject(make_pod({**INJECT, "equilibrium.io/long-paths": value}))
    args = container(patched, "equilibrium-sidecar")["args"]
    env = {"EQUILIBRIUM_MESH_SECRET": "s3cret", "POD_NAME": "web-7f9c-abcde" * 2}
    passed = kube_expand(arg_after(args, "--inbound-long-paths"), env)
    assert passed == ",".join(p.strip() for p in value.split(","))
    assert "s3cret" not in passed


def test_ipv6_modes_are_the_documented_three() -> None:
    assert IPV6_MODES == ("auto", "required", "off")


# ---- idempotence and opt-in/out ---------------------------------------------------------------
def test_reviewing_an_injected_pod_again_changes_nothing() -> None:
    _, patched = inject(make_pod(INJECT))
    again = decide(make_review(patched), CONFIG)
    assert again.outcome is Outcome.ALREADY_INJECTED
    assert again.response["response"] == {"uid": again.response["response"]["uid"],
                                          "allowed": True}


@pytest.mark.parametrize("marker", ["annotation", "sidecar", "init"])
def test_any_trace_of_injection_counts_as_injected(marker: str) -> None:
    pod = make_pod(INJECT)
    if marker == "annotation":
        pod["metadata"]["annotations"]["equilibrium.io/status"] = "injected"
    elif marker == "sidecar":
        pod["spec"]["containers"].append({"name": "equilibrium-sidecar", "image": "x"})
    else:
        pod["spec"]["initContainers"] = [{"name": "equilibrium-init", "image": "x"}]
    verdict = decide(make_review(pod), CONFIG)
    assert verdict.outcome is Outcome.ALREADY_INJECTED and "patch" not in verdict.response[
        "response"]


@pytest.mark.parametrize(
    ("annotations", "namespace_default", "outcome"),
    [
        (None, False, Outcome.NOT_REQUESTED),
        ({}, False, Outcome.NOT_REQUESTED),
        ({"equilibrium.io/inject": "false"}, False, Outcome.OPTED_OUT),
        ({"equilibrium.io/inject": "false"}, True, Outcome.OPTED_OUT),
        ({"equilibrium.io/inject": "true"}, False, Outcome.INJECTED),
        ({"equilibrium.io/inject": "true"}, True, Outcome.INJECTED),
        (None, True, Outcome.INJECTED),
        ({"equilibrium.io/inject": "yes"}, True, Outcome.INVALID_ANNOTATION),
    ],
)
def test_who_gets_injected(annotations: dict[str, str] | None, namespace_default: bool,
                           outcome: Outcome) -> None:
    verdict = decide(make_review(make_pod(annotations)), CONFIG,
                     namespace_default=namespace_default)
    assert verdict.outcome is outcome
    assert ("patch" in verdict.response["response"]) is (outcome is Outcome.INJECTED)
    assert verdict.response["response"]["allowed"] is True


def test_host_network_pods_are_never_injected() -> None:
    verdict = decide(make_review(make_pod(INJECT, extra_spec={"hostNetwork": True})), CONFIG)
    assert verdict.outcome is Outcome.HOST_NETWORK
    assert "patch" not in verdict.response["response"]
    assert "hostNetwork" in verdict.response["response"]["warnings"][0]


def test_updates_are_left_alone() -> None:
    verdict = decide(make_review(make_pod(INJECT), operation="UPDATE"), CONFIG)
    assert verdict.outcome is Outcome.NOT_CREATE
    assert "patch" not in verdict.response["response"]


# ---- annotations the injector cannot honour ---------------------------------------------------
def uninjected_warning(annotations: dict[str, str]) -> str:
    """The one warning of a pod admitted unchanged for an annotation it cannot honour."""
    verdict = decide(make_review(make_pod({**INJECT, **annotations})), CONFIG)
    assert verdict.outcome is Outcome.INVALID_ANNOTATION  # counted as "invalid_annotation"
    response = verdict.response["response"]
    assert response["allowed"] is True and "patch" not in response
    (warning,) = response["warnings"]
    assert "not injected" in warning
    return str(warning)


def test_unknown_strategy_admits_the_pod_uninjected_with_a_clear_warning() -> None:
    warning = uninjected_warning({"equilibrium.io/strategy": "greedy"})
    assert "equilibrium.io/strategy='greedy'" in warning
    assert all(name in warning for name in STRATEGY_PROFILES)


@pytest.mark.parametrize("value", ["watch", "/a b,/c", "/ok,relative", "/", "/w?x=1",
                                   "/a/../b", ",".join(f"/p{i}" for i in range(65))])
def test_malformed_long_paths_admit_the_pod_uninjected_with_a_clear_warning(value: str) -> None:
    warning = uninjected_warning({"equilibrium.io/long-paths": value})
    assert "annotation equilibrium.io/long-paths" in warning
    assert "path prefixes such as /watch" in warning


@pytest.mark.parametrize("value", ["", "true", "on", "dual-stack", "Required", " off", "OFF"])
def test_unknown_ipv6_mode_admits_the_pod_uninjected_with_a_clear_warning(value: str) -> None:
    verdict = decide(make_review(make_pod({**INJECT, "equilibrium.io/ipv6": value})), CONFIG)
    assert verdict.outcome is Outcome.INVALID_ANNOTATION  # counted as result="invalid_annotation"
    response = verdict.response["response"]
    assert response["allowed"] is True and "patch" not in response
    (warning,) = response["warnings"]
    assert f"equilibrium.io/ipv6={value!r}" in warning
    assert "expected one of: auto, required, off" in warning
    assert "not injected" in warning


@pytest.mark.parametrize("value", ["80,abc", "0", "70000", "80,80", "80,,443", "-1", "8080 9090"])
@pytest.mark.parametrize("annotation", ["equilibrium.io/exclude-outbound-ports",
                                        "equilibrium.io/exclude-inbound-ports"])
def test_malformed_port_lists_are_rejected_by_name(annotation: str, value: str) -> None:
    verdict = decide(make_review(make_pod({**INJECT, annotation: value})), CONFIG)
    assert verdict.outcome is Outcome.INVALID_ANNOTATION
    assert annotation in verdict.response["response"]["warnings"][0]
    assert "patch" not in verdict.response["response"]


def test_a_bad_app_port_says_one_port_is_expected() -> None:
    # The stranger's finding: it said "expected a comma list of integers", which the
    # annotation is not.
    verdict = decide(make_review(make_pod({**INJECT, "equilibrium.io/app-port": "http"})),
                     CONFIG)
    warning = verdict.response["response"]["warnings"][0]
    assert "'http' is not a port (expected one integer 1-65535" in warning
    assert "comma list" not in warning


def test_excluded_ports_reach_the_init_container() -> None:
    pod = make_pod({**INJECT, "equilibrium.io/exclude-outbound-ports": "5432, 6379",
                    "equilibrium.io/exclude-inbound-ports": "9000"})
    _, patched = inject(pod)
    args = container(patched, "equilibrium-init", init=True)["args"]
    assert arg_after(args, "--exclude-outbound-ports") == "5432,6379"
    assert arg_after(args, "--exclude-inbound-ports") == "15020,9000"


def test_app_port_and_other_declared_ports() -> None:
    # First declared TCP port is the app; the others (metrics, gRPC) bypass the sidecar.
    pod = make_pod(INJECT, ports=(8080, 9090, 8080))
    _, patched = inject(pod)
    sidecar_args = container(patched, "equilibrium-sidecar")["args"]
    init_args = container(patched, "equilibrium-init", init=True)["args"]
    assert arg_after(sidecar_args, "--app") == "http://127.0.0.1:8080"
    assert arg_after(init_args, "--exclude-inbound-ports") == "15020,9090"

    pod = make_pod({**INJECT, "equilibrium.io/app-port": "9090"}, ports=(8080, 9090))
    _, patched = inject(pod)
    assert arg_after(container(patched, "equilibrium-sidecar")["args"],
                     "--app") == "http://127.0.0.1:9090"
    assert arg_after(container(patched, "equilibrium-init", init=True)["args"],
                     "--exclude-inbound-ports") == "15020,8080"


def test_no_declared_port_defaults_to_8080_with_a_warning() -> None:
    response, patched = inject(make_pod(INJECT, ports=None))
    assert arg_after(container(patched, "equilibrium-sidecar")["args"],
                     "--app") == "http://127.0.0.1:8080"
    assert "equilibrium.io/app-port" in response["response"]["warnings"][0]


@pytest.mark.parametrize("annotations", [
    {"equilibrium.io/app-port": "15001"},
    {"equilibrium.io/app-port": "8080", "equilibrium.io/exclude-inbound-ports": "8080"},
    {"equilibrium.io/app-port": "80,81"},
])
def test_app_port_conflicts_are_rejected(annotations: dict[str, str]) -> None:
    verdict = decide(make_review(make_pod({**INJECT, **annotations})), CONFIG)
    assert verdict.outcome is Outcome.INVALID_ANNOTATION


@pytest.mark.parametrize(("pod", "says"), [
    (make_pod(INJECT, ports=(8080, 15006)), "container port 15006 collides"),
    (make_pod(INJECT, ports=(8080, 15020)), "container port 15020 collides"),
    (make_pod(INJECT, extra_spec={"securityContext": {"runAsUser": 1337}}),
     "the pod sets runAsUser: 1337"),
    (make_pod(INJECT, extra_spec={"os": {"name": "windows"}}), "only Linux pods"),
], ids=["declares-15006", "declares-15020", "runs-as-1337", "windows"])
def test_pods_the_mesh_could_not_serve_are_left_alone_with_a_warning(
    pod: dict[str, Any], says: str,
) -> None:
    """Marked injected, each would be broken (a port the sidecar must bind) or unmeshed (the
    sidecar's id is never redirected; a Windows pod has no iptables)."""
    verdict = decide(make_review(pod), CONFIG)
    assert verdict.outcome is Outcome.INVALID_ANNOTATION
    assert "patch" not in verdict.response["response"]
    assert says in verdict.response["response"]["warnings"][0]


def test_a_container_running_as_the_sidecars_group_is_left_alone() -> None:
    pod = make_pod(INJECT)
    pod["spec"]["containers"][0]["securityContext"] = {"runAsGroup": 1337}
    assert decide(make_review(pod), CONFIG).outcome is Outcome.INVALID_ANNOTATION
    pod = make_pod(INJECT, init_containers=[  # before the rules exist: its id does not matter
        {"name": "setup", "image": "app:1", "securityContext": {"runAsUser": 1337}}])
    assert decide(make_review(pod), CONFIG).outcome is Outcome.INJECTED


SHIPPER = {"name": "log-shipper", "image": "shipper:1", "restartPolicy": "Always"}


def test_the_pods_own_native_sidecars_are_checked_like_its_containers() -> None:
    # The stranger's finding: a native sidecar (an init container that runs on beside the
    # app) binding 15020, or running as the sidecar's uid, was injected without a word.
    for shipper, says in (
            ({**SHIPPER, "ports": [{"containerPort": 15020}]}, "container port 15020 collides"),
            ({**SHIPPER, "securityContext": {"runAsUser": 1337}},
             "container 'log-shipper' sets runAsUser: 1337")):
        verdict = decide(make_review(make_pod(INJECT, init_containers=[shipper])), CONFIG)
        assert verdict.outcome is Outcome.INVALID_ANNOTATION
        assert says in verdict.response["response"]["warnings"][0]


def test_a_native_sidecars_ports_bypass_the_sidecar_and_are_never_the_app_port() -> None:
    shipper = {**SHIPPER, "ports": [{"containerPort": 9102}]}
    _, patched = inject(make_pod(INJECT, ports=(8080,), init_containers=[shipper]))
    assert arg_after(container(patched, "equilibrium-sidecar")["args"],
                     "--app") == "http://127.0.0.1:8080"
    assert arg_after(container(patched, "equilibrium-init", init=True)["args"],
                     "--exclude-inbound-ports") == "15020,9102"


def test_port_lists_are_capped_and_read_in_linear_time() -> None:
    many = ",".join(str(p) for p in range(20000, 21024))  # 1,024: the cap
    _, patched = inject(make_pod({**INJECT, "equilibrium.io/exclude-outbound-ports": many}))
    assert arg_after(container(patched, "equilibrium-init", init=True)["args"],
                     "--exclude-outbound-ports") == many
    too_many = ",".join(str(p) for p in range(20000, 62000))  # 42,000 ports, 252 KB
    verdict = decide(make_review(make_pod(
        {**INJECT, "equilibrium.io/exclude-outbound-ports": too_many})), CONFIG)
    assert verdict.outcome is Outcome.INVALID_ANNOTATION
    assert "more than 1024 ports" in verdict.response["response"]["warnings"][0]


# ---- malformed reviews ------------------------------------------------------------------------
@pytest.mark.parametrize("body", [
    None, [], "AdmissionReview", 42,
    {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"},
    {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": "x"},
    {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}},
    {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": 7}},
    {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": ""}},
])
def test_no_readable_uid_raises_malformed_review(body: Any) -> None:
    with pytest.raises(MalformedReview):
        review(body, CONFIG)


def mangled(change: str) -> dict[str, Any]:
    body = make_review(make_pod(INJECT), uid="abc-123")
    request = body["request"]
    if change == "api_version":
        body["apiVersion"] = "admission.k8s.io/v1beta1"
    elif change == "kind":
        body["kind"] = "TokenReview"
    elif change == "not_pod":
        request["kind"] = {"group": "apps", "version": "v1", "kind": "Deployment"}
    elif change == "no_object":
        del request["object"]
    elif change == "no_spec":
        del request["object"]["spec"]
    elif change == "no_containers":
        request["object"]["spec"]["containers"] = []
    elif change == "bad_annotations":
        request["object"]["metadata"]["annotations"] = {"equilibrium.io/inject": True}
    elif change == "bad_init":
        request["object"]["spec"]["initContainers"] = "equilibrium-init"
    return body


@pytest.mark.parametrize("ports", [7, "8080", [8080], [{"containerPort": "8080"}], None])
def test_odd_container_ports_fall_back_to_the_default_app_port(ports: Any) -> None:
    pod = make_pod(INJECT, ports=None)
    pod["spec"]["containers"][0]["ports"] = ports
    verdict = decide(make_review(pod), CONFIG)
    assert verdict.outcome is Outcome.INJECTED
    (sidecar_op,) = [op for op in verdict.patch if op["path"] == "/spec/containers/0"]
    assert arg_after(sidecar_op["value"]["args"], "--app") == "http://127.0.0.1:8080"


@pytest.mark.parametrize("change", ["api_version", "kind", "not_pod", "no_object", "no_spec",
                                    "no_containers", "bad_annotations", "bad_init"])
def test_malformed_review_with_uid_is_allowed_with_a_warning(change: str) -> None:
    verdict = decide(mangled(change), CONFIG)
    assert verdict.outcome is Outcome.MALFORMED
    response = verdict.response["response"]
    assert response["uid"] == "abc-123" and response["allowed"] is True
    assert "patch" not in response
    assert response["warnings"][0].startswith("equilibrium-injector: ")


# ---- property: never crashes, and any patch applies and yields exactly one sidecar -----------
annotation_values = st.one_of(st.sampled_from(["true", "false", "", "80", "balanced",
                                               "aggressive-learning", "5432,6379", "x",
                                               "auto", "required", "off"]),
                              st.text(max_size=8))
annotation_keys = st.sampled_from(["equilibrium.io/inject", "equilibrium.io/strategy",
                                   "equilibrium.io/exclude-outbound-ports",
                                   "equilibrium.io/exclude-inbound-ports",
                                   "equilibrium.io/app-port", "equilibrium.io/status",
                                   "equilibrium.io/ipv6", "prometheus.io/scrape", "a/b~c"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(annotations=st.one_of(st.none(), st.dictionaries(annotation_keys, annotation_values)),
       ports=st.one_of(st.none(), st.lists(st.integers(1, 65535), max_size=3).map(tuple)),
       with_init=st.booleans(), namespace_default=st.booleans())
def test_any_pod_gets_a_valid_answer(annotations: dict[str, str] | None,
                                     ports: tuple[int, ...] | None, with_init: bool,
                                     namespace_default: bool) -> None:
    pod = make_pod(annotations, ports=ports,
                   init_containers=[{"name": "setup", "image": "busybox"}] if with_init else None)
    verdict = decide(make_review(pod), CONFIG, namespace_default=namespace_default)
    response = verdict.response["response"]
    assert response["allowed"] is True
    json.dumps(verdict.response)  # serialisable
    if "patch" in response:
        assert verdict.outcome is Outcome.INJECTED
        patched = apply_patch(pod, json.loads(base64.b64decode(response["patch"])))
        names = [c["name"] for c in patched["spec"]["containers"]]
        assert names.count("equilibrium-sidecar") == 1
        assert decide(make_review(patched), CONFIG).outcome is Outcome.ALREADY_INJECTED


def test_pods_without_an_api_token_get_no_discovery() -> None:
    pod = make_pod(INJECT, extra_spec={"automountServiceAccountToken": False})
    response, patched = inject(pod)
    args = container(patched, "equilibrium-sidecar")["args"]
    assert "--transparent" in args and "--discovery" not in args
    assert "automountServiceAccountToken" in response["response"]["warnings"][0]
