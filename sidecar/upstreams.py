"""The live table of upstream services: one policy, snapshot and retry budget per upstream.

Owns the mapping NAME -> ``UpstreamGroup`` and its changes on reload (endpoints replaced via
``policy.set_endpoints``, which keeps the state of endpoints that stay; groups added and
removed). The request path only calls ``policy.pick``; ``tick`` (off the request path)
rebuilds the snapshot, which is swapped in whole. A request that already holds a group keeps
using it when a reload removes it, so in-flight requests are never dropped.

Groups have a source: the config's (flags, environment, file; applied on start and reload)
and discovery's (:mod:`sidecar.discovery`), each applied without touching the other's; on a
name both claim, the config wins. Discovery also sets Host aliases (``users``,
``users.default.svc.cluster.local``...) that ``get`` resolves when no group has the name.

A discovered group is *dormant* until its first request: discovery makes a group for every
Service port of the namespace, and a policy's state grows with its endpoints squared (a
stranger's Service of 5 x 1,000 endpoints that nobody called stalled every request of the
sidecar); a dormant group keeps its endpoints and nothing else, is not ticked, probed or
summarised, and ``get`` wakes it (the policy is given its endpoints and ticked once), as
Linkerd builds a balancer when a destination is first resolved.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from mesh.policies import make_policy
from mesh.policy import Policy, PolicySnapshot
from mesh.profiles import StrategyProfile
from mesh.retry import RetryBudget

log = logging.getLogger(__name__)


@dataclass(slots=True)
class UpstreamGroup:
    """One upstream service as the proxy sees it."""

    name: str
    policy: Policy
    budget: RetryBudget
    endpoints: tuple[str, ...] = ()
    snapshot: PolicySnapshot | None = None
    source: str = "config"  # who owns the group: "config" or "discovery" (sidecar.discovery)
    dormant: bool = False  # endpoints kept, the policy not told until the first request

    def set_endpoints(self, endpoints: Sequence[str], now: float) -> None:
        self.endpoints = tuple(endpoints)
        if not self.dormant:
            self.policy.set_endpoints(self.endpoints, now)

    def wake(self, now: float) -> None:
        """A dormant group's first request: the policy takes its endpoints and ticks once."""
        if self.dormant:
            self.dormant = False
            self.policy.set_endpoints(self.endpoints, now)
            self.tick(now)
            log.info("upstream %s: first request, routing over its %d endpoints", self.name,
                     len(self.endpoints))

    def tick(self, now: float) -> PolicySnapshot:
        """Off the request path: let the policy learn, then swap in the new snapshot."""
        self.policy.tick(now)
        self.snapshot = self.policy.snapshot()
        return self.snapshot

    @property
    def usable(self) -> int:
        """Endpoints the policy may send to now (not ejected, not draining; all of them
        before the first tick or for a policy that never ejects)."""
        snapshot = self.snapshot
        if snapshot is None or snapshot.usable is None:
            return len(self.endpoints)
        return min(snapshot.usable, len(self.endpoints))


LOGGED_ENDPOINTS = 20
"""Endpoints a change of an upstream's set names in its log line (the rest are counted)."""


class UpstreamTable:
    """NAME -> UpstreamGroup, all groups built with the same policy name and profile."""

    def __init__(self, policy_name: str, profile: StrategyProfile,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy_name = policy_name
        self.profile = profile
        self.clock = clock  # when a dormant group wakes
        self._groups: dict[str, UpstreamGroup] = {}
        self._aliases: dict[str, str] = {}  # Host name -> group name (sidecar.discovery)

    def get(self, name: str) -> UpstreamGroup | None:
        """The group of ``name`` (or of the alias), woken if it was dormant (module doc)."""
        group = self._groups.get(name)
        if group is None and name in self._aliases:
            group = self._groups.get(self._aliases[name])
        if group is not None and group.dormant:
            group.wake(self.clock())
        return group

    def set_aliases(self, aliases: Mapping[str, str]) -> None:
        """Replace the alias map; a group's own name wins over an alias of the same text."""
        self._aliases = dict(aliases)

    def __iter__(self) -> Iterator[UpstreamGroup]:
        return iter(list(self._groups.values()))

    def __len__(self) -> int:
        return len(self._groups)

    def names(self) -> list[str]:
        return sorted(self._groups)

    def apply(
        self, upstreams: Mapping[str, Sequence[str]], now: float, *, source: str = "config"
    ) -> tuple[set[str], set[str]]:
        """Make ``source``'s groups match ``upstreams``; returns (added, removed) names.

        Groups of other sources are left alone; on a name both claim, "config" wins.
        """
        owned = {name for name, group in self._groups.items() if group.source == source}
        claimed = {
            name for name in upstreams
            if name not in self._groups or self._groups[name].source == source
            or source == "config"
        }
        added = claimed - owned
        removed = owned - claimed
        for name in removed:
            del self._groups[name]
        for name, endpoints in upstreams.items():
            if name not in claimed:
                continue
            group = self._groups.get(name)
            created = group is None or group.source != source
            if created:
                group = UpstreamGroup(
                    name=name,
                    policy=make_policy(self.policy_name, self.profile),
                    budget=RetryBudget(
                        self.profile.retry_budget_ratio, self.profile.retry_budget_min_per_s
                    ),
                    source=source,
                    dormant=source != "config",  # discovered: waits for its first request
                )
                self._groups[name] = group
            assert group is not None
            changed = created or group.endpoints != tuple(endpoints)
            if group.dormant:
                if not changed:
                    continue
                group.set_endpoints(endpoints, now)  # kept for its first request
            else:
                if not (changed or group.snapshot is None):
                    continue
                group.set_endpoints(endpoints, now)
                group.tick(now)  # observers see the new set at once
            if endpoints or source != "config":  # discovery: a Service scaled to 0
                shown = ", ".join(endpoints[:LOGGED_ENDPOINTS]) or "(none)"
                if len(endpoints) > LOGGED_ENDPOINTS:  # 130 KB a change at 5,000
                    shown += f" and {len(endpoints) - LOGGED_ENDPOINTS} more"
                log.info("upstream %s endpoints: %s%s", name, shown,
                         " (dormant until its first request)" if group.dormant else "")
            else:  # configured so (NAME= on the command line, an empty list in a file)
                log.warning("upstream %s has no endpoint: its requests are answered 503 "
                            "no-endpoint until one is configured", name)
        return added, removed
