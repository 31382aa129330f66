"""Discovery's Kubernetes API client: credentials, paginated lists and watch streams.

Owns where the API server is and how to authenticate to it (``KubeCredentials``: in a pod the
service account's token, CA and namespace under ``/var/run/secrets/kubernetes.io/
serviceaccount`` and ``KUBERNETES_SERVICE_HOST``/``_PORT``; for tests an explicit API URL and
token file; the token file is re-read at every request, since the kubelet rotates bound
tokens) and the HTTP of a list (following ``continue``) and of a watch (newline-delimited JSON
events, each bounded in size). Only aiohttp is used, no Kubernetes client library. It does not
retry, parse objects or keep state: :mod:`sidecar.discovery.watch` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from sidecar.discovery.model import MalformedObject

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
WATCH_TIMEOUT_S = 300  # the server ends a watch after this; we resume from the last version
WATCH_IDLE_S = 90.0
"""A watch that sends nothing for this long (no event, no bookmark: the API server sends a
bookmark about once a minute to a watch that asked for them) is given up and resumed from its
last version. Without it a black-holed connection (a dead node, a NAT that dropped its state)
kept the endpoints of 5 minutes before (a stranger's finding: 326 s stale, a dead pod listed
and a new one missing, nothing said); a quiet namespace costs a resumed watch a minute and a
half at most."""
LIST_PAGE_SIZE = 500
MAX_LINE_BYTES = 16 * 1024 * 1024  # one watch event; the API server's own limit is ~3 MiB


class ApiError(RuntimeError):
    """The API server answered with an error other than 410 Gone."""


class Gone(ApiError):
    """410 Gone: the resource version is too old; relist."""


@dataclass(frozen=True, slots=True)
class KubeCredentials:
    """Where the API server is and how to authenticate to it."""

    api_url: str
    token_file: Path | None
    ca_file: Path | None = None
    namespace: str | None = None  # the pod's own namespace (short Host names resolve here)

    @classmethod
    def in_cluster(
        cls, env: Mapping[str, str], account_dir: Path = SERVICE_ACCOUNT_DIR
    ) -> KubeCredentials:
        host = env.get("KUBERNETES_SERVICE_HOST", "").strip()
        port = env.get("KUBERNETES_SERVICE_PORT", "").strip() or "443"
        if not host:
            raise ValueError(
                "not in a cluster: KUBERNETES_SERVICE_HOST is unset (give --kube-api URL)"
            )
        if ":" in host:
            host = f"[{host}]"
        return cls(
            api_url=f"https://{host}:{port}",
            token_file=account_dir / "token",
            ca_file=account_dir / "ca.crt",
            namespace=read_namespace(env, account_dir),
        )


def read_namespace(env: Mapping[str, str], account_dir: Path = SERVICE_ACCOUNT_DIR) -> str | None:
    """The pod's namespace: ``POD_NAMESPACE`` (downward API) or the service account's file."""
    if env.get("POD_NAMESPACE", "").strip():
        return env["POD_NAMESPACE"].strip()
    try:
        return (account_dir / "namespace").read_text().strip() or None
    except OSError:
        return None


class KubeClient:
    """A minimal list/watch client over one aiohttp session."""

    def __init__(self, credentials: KubeCredentials, watch_idle: float = WATCH_IDLE_S) -> None:
        self.credentials = credentials
        self.api_url = credentials.api_url.rstrip("/")
        self.watch_idle = watch_idle  # WATCH_IDLE_S
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> KubeClient:
        ssl_context: ssl.SSLContext | bool = True
        if self.credentials.ca_file is not None and self.api_url.startswith("https:"):
            ssl_context = ssl.create_default_context(cafile=str(self.credentials.ca_file))
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl_context, limit=4),
            trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None, connect=5.0, sock_connect=5.0),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.credentials.token_file is not None:
            try:
                token = self.credentials.token_file.read_text().strip()
            except OSError as exc:
                raise ApiError(f"cannot read token {self.credentials.token_file}: {exc}") from None
            headers["Authorization"] = f"Bearer {token}"
        return headers

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("KubeClient used outside `async with`")
        return self._session

    async def list(self, path: str) -> tuple[list[Any], str]:
        """Every item of a collection (following ``continue``) and the list's resourceVersion."""
        items: list[Any] = []
        token = ""
        while True:
            params = {"limit": str(LIST_PAGE_SIZE)}
            if token:
                params["continue"] = token
            async with self.session.get(
                self.api_url + path, params=params, headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=30.0),
            ) as resp:
                await _raise_for_status(resp, f"list {path}")
                try:
                    body = await resp.json(content_type=None)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise MalformedObject(f"list {path}: the answer is not JSON: {exc}") from None
            if not isinstance(body, dict) or not isinstance(body.get("items"), list | None):
                raise MalformedObject(f"list {path}: the answer is not a list object")
            items.extend(body.get("items") or [])
            meta = body.get("metadata") or {}
            token = str(meta.get("continue") or "")
            if not token:
                version = str(meta.get("resourceVersion") or "")
                if not version:
                    raise MalformedObject(f"list {path}: no metadata.resourceVersion")
                return items, version

    @contextlib.asynccontextmanager
    async def watch(self, path: str, version: str) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """A watch stream from ``version``: yields decoded events until the server ends it."""
        params = {
            "watch": "1", "resourceVersion": version, "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_TIMEOUT_S),
        }
        async with self.session.get(
            self.api_url + path, params=params, headers=self._headers(),
            # (a request's timeout replaces the session's: the connect bounds again)
            timeout=aiohttp.ClientTimeout(total=None, connect=5.0, sock_connect=5.0,
                                          sock_read=self.watch_idle),
        ) as resp:
            await _raise_for_status(resp, f"watch {path}")
            yield _events(resp)


async def _raise_for_status(resp: aiohttp.ClientResponse, what: str) -> None:
    if resp.status == 200:
        return
    try:
        detail = (await resp.text())[:300]
    except (aiohttp.ClientError, UnicodeDecodeError):
        detail = ""
    if resp.status == 410:
        raise Gone(f"{what}: 410 Gone")
    hint = " (check the service account's RBAC)" if resp.status in (401, 403) else ""
    raise ApiError(f"{what}: HTTP {resp.status}{hint}: {detail}")


async def _events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """Newline-delimited JSON events, each bounded by ``MAX_LINE_BYTES``."""
    buffer = b""
    async for chunk in resp.content.iter_any():
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield _decode_event(line)
        if len(buffer) > MAX_LINE_BYTES:
            raise MalformedObject(f"a watch event exceeds {MAX_LINE_BYTES} bytes")
    if buffer.strip():
        yield _decode_event(buffer)


def _decode_event(line: bytes) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedObject(f"a watch event is not JSON: {exc}") from None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str) \
            or not isinstance(event.get("object"), dict):
        raise MalformedObject("a watch event lacks type or object")
    return event


def credentials_from_flags(
    kube_api: str | None, token_file: str | None, env: Mapping[str, str] | None = None
) -> KubeCredentials:
    """``--kube-api``/``--kube-token-file`` if given, else the in-cluster service account."""
    environ = os.environ if env is None else env
    if kube_api:
        if not kube_api.startswith(("http://", "https://")):
            raise ValueError(f"--kube-api: expected an http(s):// URL, got {kube_api!r}")
        ca = SERVICE_ACCOUNT_DIR / "ca.crt"
        return KubeCredentials(
            api_url=kube_api,
            token_file=Path(token_file) if token_file else None,
            ca_file=ca if kube_api.startswith("https:") and ca.exists() else None,
            namespace=read_namespace(environ),
        )
    credentials = KubeCredentials.in_cluster(environ)
    if token_file:
        credentials = KubeCredentials(
            credentials.api_url, Path(token_file), credentials.ca_file, credentials.namespace
        )
    return credentials
