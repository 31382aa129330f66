"""Test support for the injector: AdmissionReview fixtures and an independent JSON Patch applier.

The applier is written from RFC 6902/6901 here, apart from ``injector/jsonpatch.py``, so a
patch the injector builds is checked by code that does not share its assumptions.
"""

from __future__ import annotations

import base64
import copy
import json
import uuid
from typing import Any

import kubernetes_validate

KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")  # the oldest supported and the newest bundled


class PatchError(ValueError):
    pass


def _tokens(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"pointer {path!r} does not start with /")
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def _parent(doc: Any, tokens: list[str]) -> tuple[Any, str]:
    node = doc
    for token in tokens[:-1]:
        if isinstance(node, list):
            node = node[int(token)]
        elif isinstance(node, dict) and token in node:
            node = node[token]
        else:
            raise PatchError(f"path segment {token!r} does not exist")
    return node, tokens[-1]


def apply_patch(document: Any, patch: list[dict[str, Any]]) -> Any:
    """Apply ``add``/``remove``/``replace``/``test`` operations; raise ``PatchError`` if invalid."""
    doc = copy.deepcopy(document)
    for op in patch:
        tokens = _tokens(op["path"])
        if not tokens:
            raise PatchError("whole-document operations are not used by the injector")
        parent, last = _parent(doc, tokens)
        kind = op["op"]
        if kind == "add":
            if isinstance(parent, list):
                if last == "-":
                    parent.append(copy.deepcopy(op["value"]))
                elif last.isdigit() and int(last) <= len(parent):
                    parent.insert(int(last), copy.deepcopy(op["value"]))
                else:
                    raise PatchError(f"bad array index {last!r}")
            elif isinstance(parent, dict):
                parent[last] = copy.deepcopy(op["value"])
            else:
                raise PatchError(f"cannot add under a {type(parent).__name__}")
        elif kind in ("remove", "replace"):
            if isinstance(parent, list):
                index = int(last)
                if kind == "remove":
                    del parent[index]
                else:
                    parent[index] = copy.deepcopy(op["value"])
            elif isinstance(parent, dict) and last in parent:
                if kind == "remove":
                    del parent[last]
                else:
                    parent[last] = copy.deepcopy(op["value"])
            else:
                raise PatchError(f"{op['path']} does not exist")
        elif kind == "test":
            value = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if value != op["value"]:
                raise PatchError(f"test failed at {op['path']}")
        else:
            raise PatchError(f"unsupported op {kind!r}")
    return doc


def make_pod(annotations: dict[str, str] | None = None, *, ports: tuple[int, ...] | None = (8080,),
             init_containers: list[dict[str, Any]] | None = None,
             extra_spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """A pod as the API server sends it on CREATE from a Deployment (generateName, no name)."""
    container: dict[str, Any] = {"name": "app", "image": "my-company/old-java-app:latest"}
    if ports:
        container["ports"] = [{"containerPort": p, "protocol": "TCP"} for p in ports]
    metadata: dict[str, Any] = {"generateName": "my-legacy-java-app-7d4b9c-",
                                "namespace": "legacy-apps",
                                "labels": {"app": "my-legacy-java-app"}}
    if annotations is not None:
        metadata["annotations"] = dict(annotations)
    spec: dict[str, Any] = {"containers": [container]}
    if init_containers is not None:
        spec["initContainers"] = init_containers
    spec.update(extra_spec or {})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def make_review(pod: Any, *, uid: str | None = None, operation: str = "CREATE",
                api_version: str = "admission.k8s.io/v1") -> dict[str, Any]:
    """A full AdmissionReview v1 request for ``pod``, as the API server posts it."""
    return {
        "apiVersion": api_version,
        "kind": "AdmissionReview",
        "request": {
            "uid": uid or str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "legacy-apps",
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def decode_patch(response: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON Patch carried in an AdmissionReview response (base64 of JSON)."""
    assert response["response"]["patchType"] == "JSONPatch"
    return json.loads(base64.b64decode(response["response"]["patch"]))


def assert_valid(obj: dict[str, Any]) -> None:
    """Strict schema validation for every Kubernetes version we support."""
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)
