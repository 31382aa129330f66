"""The sidecar's mesh key: read once at start, before the runner is built.

Owns turning a bad or unreadable key into the sidecar's ``ConfigError`` (exit 2); where the key
comes from (``EQUILIBRIUM_MESH_SECRET``, else ``mesh_secret_file``) and what makes it bad is
:func:`wire.signing.read_mesh_key`'s. The key is handed to
:class:`sidecar.runner.SidecarRunner`, which gives it to the caller phases
(:mod:`sidecar.identity_phase`), the inbound listener (:mod:`sidecar.inbound`) and the
signaling plane (:mod:`sidecar.signaling`).

Security default: without a mesh key (neither ``EQUILIBRIUM_MESH_SECRET`` nor
``mesh_secret_file``) no identity can be signed or verified. The sidecar still starts: its
outbound side sends requests unsigned, and its inbound side treats *every* caller as
``anonymous`` (one shared bucket, the strictest treatment) and logs a warning at start. It
never trusts an identity it cannot check. "Neither" means unset: a *blank*
``EQUILIBRIUM_MESH_SECRET``, a key file others can read, or a placeholder key is a
``ConfigError`` (docs/operations.md, "Security").
"""

from __future__ import annotations

from collections.abc import Mapping

from mesh.errors import ConfigError
from sidecar.config import SidecarConfig
from wire.errors import WireError
from wire.signing import read_mesh_key


def sidecar_mesh_key(config: SidecarConfig, env: Mapping[str, str]) -> bytes | None:
    """The mesh key from the environment or the configured file; None if neither is set."""
    try:
        return read_mesh_key(env, config.mesh_secret_file)
    except WireError as exc:
        raise ConfigError(str(exc)) from None
