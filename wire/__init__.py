"""Every wire format of Equilibrium, in one place: this docstring is the index.

Rules of this package:

1. Each format has one module here, with its version, its typed value (frozen dataclasses) and
   its validation; nothing outside :mod:`wire` builds or parses these bytes.
2. Bad input raises :class:`wire.errors.WireError` (``X-GT-Identity`` returns a rejection
   instead) whose ``reason`` is one :class:`wire.errors.Reason`: a stable metric label.
3. Layering: :mod:`wire` sits above :mod:`mesh` (it may import mesh's domain types; mesh never
   imports wire) and below ``sidecar``, ``signaler``, ``injector`` and ``equilibrium``, which
   it never imports (import-linter contracts in pyproject.toml).

The formats (module: what, version, where documented):

Signaling plane, through Redis (docs/protocol.md)

- :mod:`wire.keys`: key names ``eq:{<upstream>}:summaries|recs:<sidecar>|leader|fence``, the
  consumer group, stream bounds, the Redis URL check. Unversioned (names). "Keys".
- :mod:`wire.entries`: encoding rules shared by stream entries (numbers, vectors, sizes,
  names). Field ``v``, :data:`wire.entries.PROTOCOL_VERSION` = 1. "Versions", "Encoding rules".
- :mod:`wire.summary`: :class:`~wire.summary.RegretSummary`, sidecar to signaler, HMAC-signed.
  ``v=2`` (one JSON body; signature context ``equilibrium/summary/v2``), ``v=1`` still read.
  "Regret summary", "Summary signature".
- :mod:`wire.recommendation`: :class:`~wire.recommendation.Recommendation`, signaler to one
  sidecar, HMAC-signed. ``v=1`` (signature context ``equilibrium/recommendation/v1``).
  "Recommendation", "Signature and canonical encoding", "Verification order".
- :mod:`wire.lease`: :class:`~wire.lease.Lease` (``"<holder> <fence>"``) and the Lua scripts
  in ``wire/lua/*.lua``. Unversioned. "Leader lease and fencing".

HTTP headers between sidecars (docs/protocol.md "HTTP headers", docs/policing.md)

- :mod:`wire.headers`: the ``X-GT-*`` names, the ``v=1;key=value`` convention, stripping, and
  ``X-GT-Congestion`` (``v=1``), ``X-GT-Retry`` (a bare integer).
- :mod:`wire.identity`: ``X-GT-Identity``, signed caller identity bound to its request. ``v=2``.
- :mod:`wire.signals`: ``X-GT-Signals``, the callee's MAC over its answer's signals and the
  caller's ``X-GT-Challenge``. ``v=1``.
- :mod:`wire.probe`: ``X-GT-Probe`` and the probe answer. ``v=1``.
- :mod:`wire.standing`: ``X-GT-Reputation``, the caller's standing. ``v=1``.
- :mod:`wire.bid`: ``X-GT-Bid`` and ``X-GT-Price``, plain decimals. Unversioned.

Shared

- :mod:`wire.signing`: the mesh key (``EQUILIBRIUM_MESH_SECRET`` or a key file; the only
  reader, :func:`wire.signing.read_mesh_key`) and HMAC-SHA256 in unpadded base64url.
- :mod:`wire.errors`: :class:`~wire.errors.WireError` and the :class:`~wire.errors.Reason`
  vocabulary ("Verification order and rejection reasons"; docs/policing.md "Metrics").
- :mod:`wire.admin`: the admin listeners' paths and probe answers (``/healthz``, ``/readyz``),
  shared by the sidecar and the signaler. Unversioned. docs/operations.md.
- :mod:`wire.logs`: the services' log lines on stderr, ``plain`` or ``json``
  (``--log-format``, ``EQUILIBRIUM_LOG_FORMAT``). Unversioned. docs/operations.md, "Logs".
"""
