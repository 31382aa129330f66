"""Which endpoints are in the mesh: who may see this sidecar's identity and game headers.

Owns the answer to "may this request carry ``X-GT-Identity``, ``X-GT-Demand``, ``X-GT-Bid``
and ``X-GT-Retry`` to that endpoint?" (issue 14, finding 4). An identity is a bearer credential
of the mesh for one request; game headers describe this caller's strategy. Neither goes to a
server outside the mesh:

- **Static upstreams** (flags, environment, config file) are the operator's declaration: in
  the mesh unless the file says ``mesh: false`` for that upstream (``upstreams: {payments:
  {endpoints: [...], mesh: false}}``), e.g. an external API.
- **Discovered upstreams** (:mod:`sidecar.discovery`): discovery sees Services and
  EndpointSlices, not which pods carry a sidecar, so an endpoint counts as in the mesh once it
  has *proved* it: it answered with ``X-GT-Signals`` signed with the mesh key
  (:mod:`wire.signals`), which only a sidecar holding the key can make. Until then its
  requests go without identity (the callee polices them as ``anonymous``) but with the
  ``X-GT-Challenge`` that lets a meshed callee prove itself on the first answer.

Memory is bounded (``capacity`` proven endpoints, least recently proven dropped first). It
must not sign, verify or route: :mod:`sidecar.identity_phase` asks and tells it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from sidecar.phases import RequestContext

DEFAULT_CAPACITY = 10_000


class MeshMembership:
    """In-mesh endpoints: declared (static upstreams) or proven (see the module docstring).

    ``external``: whether a static upstream (by name) was declared outside the mesh; read at
    each request, so a reload applies at once.
    """

    def __init__(self, external: Callable[[str], bool] = lambda name: False,
                 capacity: int = DEFAULT_CAPACITY) -> None:
        self.external = external
        self.capacity = capacity
        self._proven: OrderedDict[str, None] = OrderedDict()

    def admits(self, ctx: RequestContext) -> bool:
        """Whether the attempt in ``ctx`` (its group and endpoint) goes to a mesh member."""
        group, endpoint = ctx.group, ctx.endpoint
        if group is None or endpoint is None:
            return False
        if group.source == "config":
            return not self.external(group.name)
        return endpoint in self._proven

    def prove(self, endpoint: str) -> bool:
        """``endpoint`` answered with signals signed by the mesh key; True if it was new."""
        if endpoint in self._proven:
            self._proven.move_to_end(endpoint)
            return False
        self._proven[endpoint] = None
        while len(self._proven) > self.capacity:
            self._proven.popitem(last=False)
        return True

    def __contains__(self, endpoint: object) -> bool:
        return endpoint in self._proven
