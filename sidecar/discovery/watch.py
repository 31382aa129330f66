"""Discovery's watch loop: one API collection kept in a local store, forever.

Owns ``ResourceWatch``: list (paginated) + watch from the list's ``resourceVersion``, with
bookmarks; a watch that ends is resumed from the last version seen; ``410 Gone`` (as HTTP
status or as a watch ``ERROR`` event) relists; any other failure reconnects after the
exponential, jittered backoff of :mod:`mesh.backoff`. Malformed objects are counted and
skipped (a malformed update keeps the last good version); everything is counted in
:class:`sidecar.metrics.DiscoveryMetrics`. It does not build routes or touch the routing table:
:mod:`sidecar.discovery.table` does.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from mesh.backoff import Backoff
from sidecar.discovery.client import ApiError, Gone, KubeClient
from sidecar.discovery.model import MalformedObject, object_key
from sidecar.metrics import DiscoveryMetrics

log = logging.getLogger(__name__)

MIN_WATCH_S = 1.0  # a watch that ends sooner without any event counts as a failure


class ResourceWatch:
    """Keeps ``store`` equal to one API collection: list, then watch, forever."""

    def __init__(
        self,
        client: KubeClient,
        resource: str,
        path: str,
        parse: Callable[[Mapping[str, Any]], Any],
        on_change: Callable[[], None],
        metrics: DiscoveryMetrics,
        rng: random.Random,
    ) -> None:
        self.client = client
        self.resource = resource
        self.path = path
        self.parse = parse
        self.on_change = on_change
        self.metrics = metrics
        self.store: dict[tuple[str, str], Any] = {}
        self.synced = False
        self.backoff = Backoff(rng)
        self._version: str | None = None

    async def run(self) -> None:
        reason = "start"
        while True:
            try:
                if self._version is None:
                    await self._relist(reason)
                started = asyncio.get_running_loop().time()
                events = await self._watch_once()
                reason = "start"
                if events or asyncio.get_running_loop().time() - started >= MIN_WATCH_S:
                    self.backoff.reset()  # a watch that ran its course: resume at once
                else:  # ended at once with nothing: back off rather than spin on the server
                    self.metrics.errors.labels(self.resource, "EmptyWatch").inc()
                    await asyncio.sleep(self.backoff.next())
            except Gone:
                log.info("%s: resource version too old (410), relisting", self.resource)
                self._version, reason = None, "gone"
            except Exception as exc:  # a watch must outlive any one failure
                kind = type(exc).__name__
                if not isinstance(exc, aiohttp.ClientError | TimeoutError | OSError | ApiError
                                  | MalformedObject):
                    log.exception("%s: unexpected failure", self.resource)
                self.metrics.errors.labels(self.resource, kind).inc()
                delay = self.backoff.next()
                log.warning("%s: %s: %s; retrying in %.1fs", self.resource, kind, exc, delay)
                if isinstance(exc, MalformedObject):
                    self._version = None  # a stream we could not follow: start from a list
                reason = "error"
                await asyncio.sleep(delay)

    async def _relist(self, reason: str) -> None:
        items, version = await self.client.list(self.path)
        store: dict[tuple[str, str], Any] = {}
        for item in items:
            valid, parsed = self._parse(item)
            if valid and parsed is not None:
                store[object_key(item)] = parsed
        self.store, self._version = store, version
        self.metrics.relists.labels(self.resource, reason).inc()
        self.synced = True
        self.metrics.synced.labels(self.resource).set(1)
        self.backoff.reset()
        self.on_change()

    def _parse(self, obj: Mapping[str, Any]) -> tuple[bool, Any]:
        """(valid, parsed); parsed is None for a valid object that routes nothing."""
        try:
            object_key(obj)
            return True, self.parse(obj)
        except (MalformedObject, KeyError, TypeError, AttributeError) as exc:
            self.metrics.rejected.labels(self.resource).inc()
            log.warning("%s: skipped a malformed object: %s", self.resource, exc)
            return False, None

    async def _watch_once(self) -> int:
        """Follow one watch stream to its end; returns how many events it carried."""
        assert self._version is not None
        count = 0
        async with self.client.watch(self.path, self._version) as events:
            async for event in events:
                count += 1
                kind, obj = event["type"], event["object"]
                self.metrics.events.labels(self.resource, kind).inc()
                if kind == "ERROR":
                    code = obj.get("code")
                    if code == 410:
                        raise Gone(f"watch {self.path}: {obj.get('message', '410 Gone')}")
                    raise ApiError(f"watch {self.path}: error event {code}: {obj.get('message')}")
                version = (obj.get("metadata") or {}).get("resourceVersion")
                if kind == "BOOKMARK":
                    self._version = str(version) if version else self._version
                    continue
                if kind not in ("ADDED", "MODIFIED", "DELETED"):
                    self.metrics.rejected.labels(self.resource).inc()
                    continue
                valid, parsed = (True, None) if kind == "DELETED" else self._parse(obj)
                if valid:  # a malformed update keeps the last good version of the object
                    key = object_key(obj)
                    if parsed is not None:
                        self.store[key] = parsed
                        self.on_change()
                    elif self.store.pop(key, None) is not None:  # deleted, or no longer routable
                        self.on_change()
                if version:
                    self._version = str(version)
        return count
