"""The sidecar's mesh key: read once at start, before the runner is built.

Owns where the key comes from (``EQUILIBRIUM_MESH_SECRET``, else ``mesh_secret_file``) and
the errors of a bad or unreadable key (a ``ConfigError``: exit 2). The key is handed to
:class:`sidecar.runner.SidecarRunner`, which gives it to the caller phases
(:mod:`sidecar.identity_phase`), the inbound listener (:mod:`sidecar.inbound`) and the
signaling plane (:mod:`sidecar.signaling`).

Security default: without a mesh key (neither ``EQUILIBRIUM_MESH_SECRET`` nor
``mesh_secret_file``) no identity can be signed or verified. The sidecar still starts: its
outbound side sends requests unsigned, and its inbound side treats *every* caller as
``anonymous`` (one shared bucket, the strictest treatment) and logs a warning at start. It
never trusts an identity it cannot check.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mesh.identity import MeshKeyError, load_mesh_key
from sidecar.config import ConfigError
from sidecar.policing_config import MESH_SECRET_ENV


def read_mesh_key(config: Any, env: Mapping[str, str]) -> bytes | None:
    """The mesh key from the environment or the configured file; None if neither is set."""
    env_value = env.get(MESH_SECRET_ENV)
    path = getattr(config, "mesh_secret_file", None)
    file_content: bytes | None = None
    if path is not None and not (env_value and env_value.strip()):
        try:
            file_content = path.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"mesh_secret_file {str(path)!r}: cannot read: {exc.strerror}"
            ) from None
        if not file_content.strip():
            raise ConfigError(f"mesh_secret_file {str(path)!r} is empty")
    if not (env_value and env_value.strip()) and file_content is None:
        return None
    try:
        return load_mesh_key(env_value, file_content)
    except MeshKeyError as exc:
        raise ConfigError(str(exc)) from None
