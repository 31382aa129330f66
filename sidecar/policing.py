"""Wiring of policing into a sidecar process: mesh key, caller phases, inbound listener.

Owns the start-up decisions only; the behaviour lives in :mod:`sidecar.inbound` (the
listener in front of the app) and :mod:`sidecar.identity_phase` (the outbound side). Used by
the command line in two steps, so that a bad key is a configuration error (exit 2) and the
listener is registered before the runner starts::

    wiring = PolicingWiring.prepare(config, env)   # ConfigError on a bad or unreadable key
    runner = SidecarRunner(source, config)
    wiring.install(runner)

Security default: without a mesh key (neither ``EQUILIBRIUM_MESH_SECRET`` nor
``mesh_secret_file``) no identity can be signed or verified. The sidecar still starts: its
outbound side sends requests unsigned, and its inbound side treats *every* caller as
``anonymous`` (one shared bucket, the strictest treatment) and logs a warning at start. It
never trusts an identity it cannot check.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.admin import inbound_json
from sidecar.config import ConfigError
from sidecar.identity_phase import CallerPhases
from sidecar.inbound import InboundProxy
from wire.errors import WireError
from wire.signing import MESH_SECRET_ENV, read_mesh_key

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PolicingWiring:
    """What :meth:`install` adds to a runner, decided before it is built."""

    mesh_key: bytes | None

    @classmethod
    def prepare(cls, config: Any, env: Mapping[str, str]) -> PolicingWiring:
        """The mesh key (:func:`wire.signing.read_mesh_key`: env, else ``mesh_secret_file``),
        or None without either; ConfigError when the file is unreadable or the key too short."""
        try:
            return cls(read_mesh_key(env, getattr(config, "mesh_secret_file", None)))
        except WireError as exc:
            raise ConfigError(str(exc)) from None

    def install(self, runner: Any) -> InboundProxy | None:
        """Wrap the runner's outbound phases; add the inbound listener if one is configured."""
        config = runner.config
        settings = config.policing
        runner.proxy.phases = CallerPhases(
            runner.proxy.phases,
            caller_id=config.id,
            mesh_key=self.mesh_key,
            default_bid=settings.default_bid,
            registry=runner.metrics.registry,
            clock=runner.clock,
        )
        if self.mesh_key is None:
            log.warning("no mesh key (%s or mesh_secret_file): outbound requests go unsigned",
                        MESH_SECRET_ENV)
        if config.inbound is None or config.app is None:
            runner.add_state_section("inbound", lambda: None)
            return None
        inbound = InboundProxy(
            sidecar_id=config.id,
            app_url=config.app,
            settings=settings,
            registry=runner.metrics.registry,
            mesh_key=self.mesh_key,
            request_timeout=runner.profile.request_timeout,
            connect_timeout=runner.profile.connect_timeout,
            clock=runner.clock,
        )
        runner.add_listener("inbound", inbound.make_app(), config.inbound, drains=True)
        runner.add_background("inbound-gauges", inbound.refresh_gauges)
        runner.add_state_section("inbound", lambda: inbound_json(inbound.snapshot()))
        if self.mesh_key is None:
            log.warning("inbound %s: no mesh key, so no caller identity can be verified: every "
                        "caller is policed as 'anonymous' (the strictest bucket)", config.inbound)
        log.info("inbound %s -> app %s, policing mode %s", config.inbound, config.app,
                 settings.mode)
        return inbound
