"""The install controller's Kubernetes REST client: get, create, replace, patch, list, watch.

Owns the HTTP of the few calls :mod:`injector.controller` makes, over one aiohttp session,
with the service account's bearer token (re-read at every request: the kubelet rotates it)
and CA, or an explicit API URL and token file (tests). Answers are JSON objects; 404 is
``None`` on get, 409 is :class:`Conflict`, other errors :class:`ApiError` with the status and
the start of the body. It keeps no state and does not retry: the controller does.

The sidecar's discovery has its own read-only list/watch client (``sidecar.discovery.client``);
the services never import each other (the import-linter layers), so the injector carries this
small one rather than a Kubernetes client library.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
WATCH_TIMEOUT_S = 300
# Objects as PartialObjectMetadata: a pod list/watch without the pods' specs.
METADATA_ONLY = ("application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io,"
                 "application/json;as=PartialObjectMetadata;v=v1;g=meta.k8s.io,"
                 "application/json")
MAX_LINE_BYTES = 16 * 1024 * 1024


class ApiError(RuntimeError):
    """The API server answered with an unexpected status (or not JSON)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class Conflict(ApiError):
    """409: the object exists already (create) or changed since it was read (replace)."""


@dataclass(frozen=True, slots=True)
class Credentials:
    api_url: str
    token_file: Path | None
    ca_file: Path | None = None

    @classmethod
    def from_flags(cls, kube_api: str | None, token_file: str | None,
                   env: Mapping[str, str], account_dir: Path = SERVICE_ACCOUNT_DIR,
                   ) -> Credentials:
        """``--kube-api``/``--kube-token-file``, else the pod's service account."""
        if kube_api:
            if not kube_api.startswith(("http://", "https://")):
                raise ValueError(f"--kube-api: expected an http(s):// URL, got {kube_api!r}")
            ca = account_dir / "ca.crt"
            return cls(kube_api, Path(token_file) if token_file else None,
                       ca if kube_api.startswith("https:") and ca.exists() else None)
        host = env.get("KUBERNETES_SERVICE_HOST", "").strip()
        port = env.get("KUBERNETES_SERVICE_PORT", "").strip() or "443"
        if not host:
            raise ValueError("not in a cluster: KUBERNETES_SERVICE_HOST is unset "
                             "(give --kube-api URL)")
        if ":" in host:
            host = f"[{host}]"
        return cls(f"https://{host}:{port}",
                   Path(token_file) if token_file else account_dir / "token",
                   account_dir / "ca.crt")


class KubeRest:
    """A minimal JSON REST client of the Kubernetes API, used inside ``async with``."""

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials
        self.api_url = credentials.api_url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> KubeRest:
        ssl_context: ssl.SSLContext | bool = True
        if self.credentials.ca_file is not None and self.api_url.startswith("https:"):
            ssl_context = ssl.create_default_context(cafile=str(self.credentials.ca_file))
        self._session = aiohttp.ClientSession(
            # five long-lived watches (the controller's) plus room for its reads and writes
            connector=aiohttp.TCPConnector(ssl=ssl_context, limit=8), trust_env=False,
            timeout=aiohttp.ClientTimeout(total=30.0, connect=5.0))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self, content_type: str | None = None, accept: str = "application/json",
                 ) -> dict[str, str]:
        headers = {"Accept": accept}
        if content_type:
            headers["Content-Type"] = content_type
        if self.credentials.token_file is not None:
            try:
                token = self.credentials.token_file.read_text().strip()
            except OSError as exc:
                raise ApiError(f"cannot read token {self.credentials.token_file}: {exc}") \
                    from None
            headers["Authorization"] = f"Bearer {token}"
        return headers

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("KubeRest used outside `async with`")
        return self._session

    async def _call(self, method: str, path: str, body: Any = None,
                    content_type: str = "application/json",
                    params: Mapping[str, str] | None = None, accept: str = "application/json",
                    ) -> dict[str, Any] | None:
        data = None if body is None else json.dumps(body).encode()
        async with self.session.request(
                method, self.api_url + path, data=data, params=params,
                headers=self._headers(content_type if data is not None else None, accept),
        ) as resp:
            if method == "GET" and resp.status == 404:
                return None
            text = await resp.text()
            if resp.status == 409:
                raise Conflict(f"{method} {path}: 409 Conflict", 409)
            if resp.status not in (200, 201):
                hint = " (check the controller's RBAC)" if resp.status in (401, 403) else ""
                raise ApiError(f"{method} {path}: HTTP {resp.status}{hint}: {text[:300]}",
                               resp.status)
            try:
                answer = json.loads(text)
            except ValueError:
                raise ApiError(f"{method} {path}: the answer is not JSON", resp.status) \
                    from None
            if not isinstance(answer, dict):
                raise ApiError(f"{method} {path}: the answer is not an object", resp.status)
            return answer

    async def get(self, path: str) -> dict[str, Any] | None:
        """The object at ``path``, or ``None`` if it does not exist."""
        return await self._call("GET", path)

    async def create(self, collection: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        """POST ``obj`` to ``collection``; :class:`Conflict` if it exists."""
        answer = await self._call("POST", collection, obj)
        assert answer is not None
        return answer

    async def replace(self, path: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        """PUT ``obj`` (with the ``resourceVersion`` read): :class:`Conflict` if it changed."""
        answer = await self._call("PUT", path, obj)
        assert answer is not None
        return answer

    async def json_patch(self, path: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
        """RFC 6902 JSON patch (``application/json-patch+json``)."""
        answer = await self._call("PATCH", path, ops, "application/json-patch+json")
        assert answer is not None
        return answer

    async def list(self, path: str, accept: str = "application/json",
                   selector: Mapping[str, str] | None = None,
                   ) -> tuple[list[dict[str, Any]], str]:
        """Every item of a collection (following ``continue``) and the list's version
        (``accept=METADATA_ONLY``: the items' metadata only; ``selector``: more query
        parameters, e.g. ``fieldSelector``)."""
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            params = {**(selector or {}), "limit": "500",
                      **({"continue": token} if token else {})}
            body = await self._call("GET", path, params=params, accept=accept)
            if body is None or not isinstance(body.get("items"), list | None):
                raise ApiError(f"list {path}: not a list object")
            items.extend(i for i in body.get("items") or [] if isinstance(i, dict))
            meta = body.get("metadata") or {}
            token = str(meta.get("continue") or "")
            if not token:
                return items, str(meta.get("resourceVersion") or "")

    @contextlib.asynccontextmanager
    async def watch(self, path: str, version: str, accept: str = "application/json",
                    selector: Mapping[str, str] | None = None,
                    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """Watch events from ``version`` until the server ends the stream."""
        params = {**(selector or {}), "watch": "1", "resourceVersion": version,
                  "allowWatchBookmarks": "true", "timeoutSeconds": str(WATCH_TIMEOUT_S)}
        async with self.session.get(
                self.api_url + path, params=params, headers=self._headers(accept=accept),
                timeout=aiohttp.ClientTimeout(total=None, sock_read=WATCH_TIMEOUT_S + 30),
        ) as resp:
            if resp.status != 200:
                raise ApiError(f"watch {path}: HTTP {resp.status}", resp.status)
            yield _events(resp)


async def _events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    buffer = b""
    async for chunk in resp.content.iter_any():
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield _decode(line)
        if len(buffer) > MAX_LINE_BYTES:
            raise ApiError(f"a watch event exceeds {MAX_LINE_BYTES} bytes")
    if buffer.strip():
        yield _decode(buffer)


def _decode(line: bytes) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise ApiError("a watch event is not JSON") from None
    if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
        raise ApiError("a watch event lacks its object")
    return event
