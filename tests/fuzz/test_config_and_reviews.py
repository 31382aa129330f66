"""Config files and AdmissionReviews against hostile documents.

A sidecar's config file (YAML or JSON) loads into a :class:`sidecar.config.SidecarConfig` or
raises :class:`mesh.errors.ConfigError` with a message (exit 2 at start-up, a counted
rejection on reload); the injector answers an AdmissionReview or raises ``MalformedReview``
(a 400), and through its real HTTP handler never answers 500. Documents start from the real
shapes (the known keys, a real pod) with hostile values, so the validators behind the first
check are reached.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import strategies as st

from injector.config import InjectorConfig
from injector.review import MalformedReview, review
from injector.server import make_app
from mesh.errors import ConfigError
from sidecar.config import FILE_KEYS, ConfigSource, SidecarConfig
from tests.fuzz.budget import fuzz
from tests.fuzz.strategies import header_values, numbers
from tests.injector_support import make_pod, make_review

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(), numbers(), header_values(),
    st.sampled_from(["127.0.0.1:0", "[::1]:0", "0.0.0.0:65536", "http://127.0.0.1:1",
                     "regret-matching", "peak-ewma", "balanced", "redis://127.0.0.1:1/0",
                     "rediss://x", "svc=http://127.0.0.1:1", "-1", "1e9", "inf"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.sampled_from(sorted(FILE_KEYS)),
                                                      header_values()), inner, max_size=4)),
    max_leaves=12,
)


def load(text: str | bytes, suffix: str) -> SidecarConfig:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"sidecar{suffix}"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8",
                                                                          "surrogatepass"))
        return ConfigSource({"config": str(path)}, {}, path).load()


@fuzz
@given(st.dictionaries(st.sampled_from(sorted(FILE_KEYS)), VALUES, max_size=6),
       st.sampled_from([".yaml", ".json"]))
def test_config_documents(document: dict[str, Any], suffix: str) -> None:
    if suffix == ".json":
        text = json.dumps(document, allow_nan=True)
    else:
        text = yaml.safe_dump(document, allow_unicode=True)
    try:
        config = load(text, suffix)
    except ConfigError as exc:
        assert str(exc)
    else:
        assert isinstance(config, SidecarConfig)


@fuzz
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200)),
       st.sampled_from([".yaml", ".json"]))
def test_config_bytes(text: str | bytes, suffix: str) -> None:
    try:
        load(text, suffix)
    except ConfigError as exc:
        assert str(exc)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
@pytest.mark.parametrize("text", [
    "[" * 1_500 + "]" * 1_500,
    "{a: " * 1_500 + "1" + "}" * 1_500,
    "a:\n" + "".join("  " * i + "- \n" for i in range(300)),
    "drain_timeout: " + "9" * 5_000,
    "upstreams: {svc: [" + ", ".join(["http://127.0.0.1:1"] * 20_000) + "]}",
    "&a [*a]",
    "a: &x [*x, *x]",
    "!!python/object/apply:os.system ['true']",
    "\ufeffid: x",
    "id: \x00",
], ids=["brackets", "flow-maps", "indents", "long-number", "many-endpoints", "alias-loop",
        "alias-self", "python-tag", "bom", "nul"])
def test_config_shapes(text: str, suffix: str) -> None:
    """Shapes too costly to draw thousands of times: deep nesting, huge numbers, aliases."""
    try:
        config = load(text, suffix)
    except ConfigError as exc:
        assert str(exc)
    else:
        assert isinstance(config, SidecarConfig)


CONFIG = InjectorConfig(image="equilibrium:test")
ANNOTATION_KEYS = ["equilibrium.io/inject", "equilibrium.io/app-port", "equilibrium.io/strategy",
                   "equilibrium.io/exclude-outbound-ports", "equilibrium.io/exclude-inbound-ports",
                   "equilibrium.io/ipv6", "equilibrium.io/upstreams", "other/x"]


def pods() -> st.SearchStrategy[Any]:
    """A real pod with hostile annotations, or a pod-shaped document with hostile parts."""
    annotations = st.dictionaries(st.sampled_from(ANNOTATION_KEYS), header_values(),
                                  max_size=5)
    real = st.builds(lambda a: make_pod({"equilibrium.io/inject": "true", **a}), annotations)
    broken = st.builds(
        lambda pod, path, value: _replace(pod, path, value),
        real,
        st.sampled_from([("spec",), ("spec", "containers"), ("metadata",),
                         ("metadata", "annotations"), ("spec", "hostNetwork"),
                         ("spec", "initContainers"), ("spec", "containers", 0),
                         ("spec", "containers", 0, "ports")]),
        VALUES,
    )
    return st.one_of(real, broken, VALUES)


def _replace(document: Any, path: tuple[Any, ...], value: Any) -> Any:
    node = document
    for step in path[:-1]:
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            return document
    with contextlib.suppress(IndexError, TypeError):
        node[path[-1]] = value
    return document


@fuzz
@given(pods(), st.booleans())
def test_admission_reviews(pod: Any, namespace_default: bool) -> None:
    document = make_review(pod) if isinstance(pod, dict) else {"request": pod}
    try:
        answer = review(document, CONFIG, namespace_default=namespace_default)
    except MalformedReview as exc:
        assert str(exc)
    else:
        assert answer["response"]["allowed"] is True
        assert answer["response"]["uid"] == document["request"]["uid"]


@fuzz
@given(st.one_of(
    pods().map(lambda pod: json.dumps(make_review(pod) if isinstance(pod, dict) else pod,
                                      allow_nan=True).encode()),
    st.binary(max_size=300),
    st.integers(1, 3_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(33, 6_000).map(lambda n: b'{"uid": ' + b"9" * n + b"}"),
))
async def test_admission_review_http_never_500(body: bytes) -> None:
    async with TestClient(TestServer(make_app(CONFIG))) as client:
        reply = await client.post("/mutate", data=body,
                                  headers={"Content-Type": "application/json"})
        assert reply.status in (200, 400, 413), await reply.text()
        if reply.status != 200:
            assert "error" in await reply.json()
