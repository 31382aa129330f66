"""The real webhook: `equilibrium injector` over HTTPS on loopback, AdmissionReviews in.

The process serves a certificate made by `equilibrium injector bootstrap-certs`; the client
trusts only that CA and checks the name, as the API server does with caBundle.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import signal
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from injector import certs
from tests.injector_support import (
    apply_patch,
    assert_valid,
    decode_patch,
    make_pod,
    make_review,
)
from tests.integration.procs import EquilibriumProcess, start_equilibrium
from tests.support import metric_value

MAX_BODY = 64 * 1024


@dataclass
class Webhook:
    proc: EquilibriumProcess
    url: str
    ssl: ssl.SSLContext


def wait_listening(proc: EquilibriumProcess, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"listening on (https://\S+)", proc.output())
        if found:
            return found.group(1)
        if not proc.alive():
            raise RuntimeError(f"injector exited early:\n{proc.output()}")
        time.sleep(0.05)
    raise TimeoutError(f"injector did not listen within {timeout}s:\n{proc.output()}")


def write_certs(directory: Path) -> None:
    """What `equilibrium injector bootstrap-certs --out-dir` writes (tested in unit tests)."""
    bundle = certs.bootstrap("equilibrium-injector", "equilibrium-system",
                             dt.datetime.now(dt.UTC), days=1, extra_names=("127.0.0.1",))
    (directory / "ca.crt").write_bytes(bundle.ca_pem)
    (directory / "tls.crt").write_bytes(bundle.cert_pem)
    (directory / "tls.key").write_bytes(bundle.key_pem)


@pytest.fixture(scope="module")
def webhook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webhook]:
    tls = tmp_path_factory.mktemp("tls")
    write_certs(tls)
    proc = start_equilibrium(
        "injector", "--listen", "127.0.0.1:0", "--tls-cert", str(tls / "tls.crt"),
        "--tls-key", str(tls / "tls.key"), "--sidecar-image", "equilibrium:it",
        "--max-body-bytes", str(MAX_BODY))
    try:
        url = wait_listening(proc)
        context = ssl.create_default_context(cafile=str(tls / "ca.crt"))
        yield Webhook(proc, url, context)
    finally:
        proc.stop()
        proc.cleanup()


async def post(hook: Webhook, body: bytes | dict[str, Any],
               path: str = "/mutate") -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as session, session.post(
            hook.url + path, data=data, ssl=hook.ssl,
            headers={"Content-Type": "application/json"}) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_annotated_pod_is_injected_over_https(webhook: Webhook) -> None:
    pod = make_pod({"equilibrium.io/inject": "true",
                    "equilibrium.io/strategy": "conservative"})
    request = make_review(pod)
    status, answer = await post(webhook, request)
    assert status == 200
    assert answer["response"]["uid"] == request["request"]["uid"]
    patched = apply_patch(pod, decode_patch(answer))
    assert_valid(patched)
    sidecar = patched["spec"]["containers"][0]  # first: it holds the app's start
    assert sidecar["name"] == "equilibrium-sidecar" and sidecar["image"] == "equilibrium:it"
    assert "conservative" in sidecar["args"]

    # The injected pod, sent again (e.g. a reinvocation), is left as it is.
    status, again = await post(webhook, make_review(patched))
    assert status == 200 and "patch" not in again["response"]


async def test_unannotated_pod_is_left_alone_unless_the_namespace_opted_in(
        webhook: Webhook) -> None:
    status, answer = await post(webhook, make_review(make_pod(None)))
    assert status == 200 and answer["response"]["allowed"] is True
    assert "patch" not in answer["response"]

    status, answer = await post(webhook, make_review(make_pod(None)), "/mutate/namespace")
    assert status == 200 and "patch" in answer["response"]
    status, answer = await post(webhook, make_review(make_pod({"equilibrium.io/inject": "false"})),
                                "/mutate/namespace")
    assert status == 200 and "patch" not in answer["response"]


@pytest.mark.parametrize(("body", "message"), [
    (b"{not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[]", "not an AdmissionReview"),
    (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                 "request": {"object": {}}}).encode(), "no 'uid'"),
])
async def test_unanswerable_bodies_get_400_with_a_message(webhook: Webhook, body: bytes,
                                                          message: str) -> None:
    status, answer = await post(webhook, body)
    assert status == 400
    assert message in answer["error"]


async def test_malformed_review_with_uid_is_allowed_with_a_warning(webhook: Webhook) -> None:
    request = make_review(make_pod({"equilibrium.io/inject": "true"}), uid="u-1")
    del request["request"]["object"]["spec"]
    status, answer = await post(webhook, request)
    assert status == 200
    assert answer["response"] == {"uid": "u-1", "allowed": True,
                                  "warnings": [answer["response"]["warnings"][0]]}
    assert "no spec" in answer["response"]["warnings"][0]


async def test_a_huge_uid_is_answered_whole_and_logged_cut(webhook: Webhook) -> None:
    """A stranger's finding: a client-chosen 500 KB uid made a log line as long. The answer
    must echo it (the API server matches by it); the log line is cut."""
    uid = "u" * 40_000
    status, answer = await post(webhook, make_review(make_pod({}), uid=uid))
    assert status == 200 and answer["response"]["uid"] == uid
    lines = [line for line in webhook.proc.output().splitlines() if "review uid=" in line]
    assert lines and "(40000 characters)" in lines[-1] and len(lines[-1]) < 400


async def test_oversized_body_is_refused(webhook: Webhook) -> None:
    pod = make_pod({"equilibrium.io/inject": "true", "filler": "x" * MAX_BODY})
    status, answer = await post(webhook, make_review(pod))
    assert status == 413 and "larger than" in answer["error"]


async def test_metrics_count_reviews_by_result(webhook: Webhook) -> None:
    async def read_metrics() -> dict[str, float]:
        async with aiohttp.ClientSession() as session, session.get(
                webhook.url + "/metrics", ssl=webhook.ssl) as resp:
            text = await resp.text()
        return {result: metric_value(text, "equilibrium_injector_reviews_total", result=result)
                for result in ("injected", "invalid_annotation", "rejected")}

    before = await read_metrics()
    await post(webhook, make_review(make_pod({"equilibrium.io/inject": "true"})))
    await post(webhook, make_review(make_pod({"equilibrium.io/strategy": "x",
                                              "equilibrium.io/inject": "true"})))
    await post(webhook, b"nope")
    after = await read_metrics()
    assert after["injected"] == before["injected"] + 1
    assert after["invalid_annotation"] == before["invalid_annotation"] + 1
    assert after["rejected"] == before["rejected"] + 1


@pytest.mark.parametrize("body", [
    b"[" * 30_000 + b"]" * 30_000,  # nesting past the recursion limit
    b'{"apiVersion": ' + b"9" * 5_000 + b"}",  # past int()'s 4,300-digit limit
    b'{"request": {"uid": "u", "x": NaN}}',
], ids=["deep-nesting", "5000-digits", "nan"])
async def test_hostile_json_is_a_400_never_a_500(webhook: Webhook, body: bytes) -> None:
    status, answer = await post(webhook, body)
    assert status == 400 and "not an AdmissionReview" in answer["error"]
    async with aiohttp.ClientSession() as session, session.get(
            webhook.url + "/metrics", ssl=webhook.ssl) as resp:
        assert metric_value(await resp.text(), "equilibrium_injector_reviews_total",
                            result="error") == 0
    assert "Traceback" not in webhook.proc.output()


@pytest.mark.parametrize("annotation", ["equilibrium.io/app-port",
                                        "equilibrium.io/exclude-inbound-ports"])
@pytest.mark.parametrize("value", ["\u00b2", "8\u0663", "9" * 5_000])
async def test_non_ascii_or_huge_port_annotations_are_invalid_not_a_500(
        webhook: Webhook, annotation: str, value: str) -> None:
    """'²'.isdigit() is true but int('²') raises: the pod must be admitted uninjected with
    the documented warning (docs/kubernetes.md §3), not answered with a 500 that
    ``failurePolicy: Ignore`` turns into a pod without its sidecar and without a word."""
    value = value.encode().decode("unicode_escape")
    pod = make_pod({"equilibrium.io/inject": "true", annotation: value})
    status, answer = await post(webhook, make_review(pod, uid="u-digits"))
    assert status == 200
    response = answer["response"]
    assert response["allowed"] is True and "patch" not in response
    assert annotation in response["warnings"][0] and "not a port" in response["warnings"][0]


async def test_healthz_and_tls_is_required_and_verified(webhook: Webhook,
                                                        tmp_path: Path) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(webhook.url + "/healthz", ssl=webhook.ssl) as resp:
            assert resp.status == 200
        # A client that does not trust our CA refuses the server.
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(webhook.url + "/healthz", ssl=ssl.create_default_context())
        # Plain HTTP is not served.
        with pytest.raises(aiohttp.ClientError):
            await session.get(webhook.url.replace("https://", "http://") + "/healthz")


def test_sigterm_stops_the_webhook_cleanly(tmp_path: Path) -> None:
    write_certs(tmp_path)
    proc = start_equilibrium("injector", "--listen", "127.0.0.1:0",
                             "--tls-cert", str(tmp_path / "tls.crt"),
                             "--tls-key", str(tmp_path / "tls.key"))
    try:
        wait_listening(proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.cleanup()
