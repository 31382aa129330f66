"""Rescue: idempotent requests held by an endpoint the policy ejected are sent elsewhere.

A pod that hangs accepts requests and answers none. The policy notices (a stall of a second
and ten times its latency: :meth:`mesh.estimators.EndpointStats.hung`) and ejects it, so
nothing more goes there; but what it already holds would wait for the request timeout (15 s
by default) and fail, which is what a hang cost before: a helper counted 20 such 504s per
hang from one sidecar. Envoy answers it with a per-try timeout and a retry; here the try ends
when the policy ejects the endpoint (:class:`mesh.hedging.Rescuer`), which it decides from
what the endpoint does rather than from a fixed time. Off by default (``--rescue``): on a
service of long polls it re-sends polls a healthy pod holds (docs/routing.md, "Rescue").

:class:`RescueBoard` owns the bookkeeping, off the request path except for one dict insert
and delete per request: the outbound listener holds a :class:`Held` for each attempt of a
bodiless idempotent request while it waits for the answer's head, and after each policy tick
(:meth:`RescueBoard.sweep`, from the sidecar's tick loop) every held attempt at an endpoint
ejected since it was sent is cancelled, if the request has attempts left, another endpoint to
go to and the upstream's retry budget allows one more (the withdrawal is made here, so a
rescue is never left without its retry). The request's task sees ``CancelledError``, asks
:meth:`Held.took_back` whether the rescue caused it, and sends the request to another
endpoint as a retry (``X-GT-Retry``: the first endpoint's app may have seen it). Which
requests may be sent twice is :func:`sidecar.outbound.may_retry`'s rule: never one with a
body, never a non-idempotent method.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from mesh.hedging import Rescuer
from sidecar.phases import RequestContext
from sidecar.upstreams import UpstreamGroup


class Held:
    """One attempt waiting for its answer at ``endpoint``, rescuable while held."""

    __slots__ = ("ctx", "declined", "endpoint", "rescued", "sent", "task")

    def __init__(self, task: asyncio.Task[object], ctx: RequestContext, endpoint: str,
                 sent: float) -> None:
        self.task = task
        self.ctx = ctx
        self.endpoint = endpoint
        self.sent = sent
        self.rescued = False
        self.declined = False  # the retry budget was empty when it was due (counted once)

    def took_back(self) -> bool:
        """After a ``CancelledError``: True if the rescue caused it (the cancellation is then
        withdrawn and the request goes elsewhere, its retry already paid for); False if
        someone else cancelled the task, also when both did (theirs stands)."""
        if not self.rescued:
            return False
        self.rescued = False
        if self.task.cancelling() > 1:
            self.task.uncancel()
            return False
        self.task.uncancel()
        return True


class RescueBoard:
    """The attempts held per upstream and endpoint; see the module docstring."""

    def __init__(self, max_attempts: int,
                 on_budget_exhausted: Callable[[UpstreamGroup], None] | None = None) -> None:
        self.max_attempts = max_attempts
        self.on_budget_exhausted = on_budget_exhausted
        # upstream name -> endpoint -> held attempts (a dict as an ordered set: oldest first)
        self._held: dict[str, dict[str, dict[Held, None]]] = {}

    def hold(self, group: UpstreamGroup, ctx: RequestContext, endpoint: str,
             sent: float) -> Held | None:
        """Hold the current task's attempt at ``endpoint``; None when the upstream's policy
        does not rescue (or there is no task)."""
        if getattr(group.policy, "rescue_before", None) is None:  # (isinstance of a
            return None  # runtime-checkable Protocol costs microseconds: per request here)
        task = asyncio.current_task()
        if task is None:
            return None
        held = Held(task, ctx, endpoint, sent)
        self._held.setdefault(group.name, {}).setdefault(endpoint, {})[held] = None
        return held

    def release(self, group: UpstreamGroup, held: Held) -> None:
        """The attempt got its answer's head, failed or was cancelled: no longer rescuable."""
        by_endpoint = self._held.get(group.name)
        if by_endpoint is None:
            return
        waiting = by_endpoint.get(held.endpoint)
        if waiting is not None:
            waiting.pop(held, None)
            if not waiting:
                del by_endpoint[held.endpoint]
                if not by_endpoint:
                    del self._held[group.name]

    def held(self, upstream: str) -> int:
        """Attempts of ``upstream`` held now (for tests and /debug)."""
        return sum(len(w) for w in self._held.get(upstream, {}).values())

    def sweep(self, group: UpstreamGroup, now: float) -> int:
        """After a tick of ``group``'s policy: rescue what its ejected endpoints hold (see
        the module docstring); returns how many attempts were rescued."""
        by_endpoint = self._held.get(group.name)
        policy = group.policy
        if not by_endpoint or not isinstance(policy, Rescuer):
            return 0
        rescued = 0
        budget_empty = False
        endpoints = len(group.endpoints)
        for endpoint, waiting in list(by_endpoint.items()):
            before = policy.rescue_before(endpoint, now)
            if before is None:
                continue
            for held in list(waiting):
                if held.rescued or held.sent >= before or held.task.done():
                    continue
                ctx = held.ctx
                if ctx.attempt + 1 >= self.max_attempts or len(ctx.tried) >= endpoints:
                    continue  # nowhere to go: it waits for its answer or its timeout
                if budget_empty or not group.budget.try_withdraw(now):
                    budget_empty = True  # for the rest of this sweep as well
                    if not held.declined:
                        held.declined = True
                        if self.on_budget_exhausted is not None:
                            self.on_budget_exhausted(group)
                    continue  # it waits; a later sweep may find the budget refilled
                held.rescued = True
                waiting.pop(held, None)
                held.task.cancel()  # counted where the request path takes it back
                rescued += 1
            if not waiting:
                by_endpoint.pop(endpoint, None)
        if not by_endpoint:
            self._held.pop(group.name, None)
        return rescued
