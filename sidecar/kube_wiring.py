"""Wiring of transparent interception and Kubernetes discovery into a sidecar process.

Owns the flags ``--transparent``, ``--discovery``, ``--discovery-namespaces``, ``--kube-api``
and ``--kube-token-file`` (:data:`OPTIONS`; each also from the environment:
``EQUILIBRIUM_TRANSPARENT=1``, ``EQUILIBRIUM_DISCOVERY=1``, ``EQUILIBRIUM_DISCOVERY_NAMESPACES``,
``EQUILIBRIUM_KUBE_API``, ``EQUILIBRIUM_KUBE_TOKEN_FILE``; a flag wins) and the start-up
decisions; the behaviour lives in :mod:`sidecar.transparent` and :mod:`sidecar.discovery`.
Used by the command line in two steps, so that bad settings are a configuration error (exit 2)::

    wiring = KubeWiring.prepare(args, env)   # ConfigError on bad flags / not in a cluster
    runner = SidecarRunner(source, config)
    wiring.install(runner)
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sidecar.config import ConfigError
from sidecar.flags import Option, add_options, from_flag_or_env, switch_from_flag_or_env

if TYPE_CHECKING:  # aiohttp and friends load only when the sidecar runs (cli imports this)
    from sidecar.discovery import Discovery, KubeCredentials

log = logging.getLogger(__name__)

_NAMESPACE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")

TRANSPARENT = Option(
    "transparent", switch=True, env="EQUILIBRIUM_TRANSPARENT",
    help="route connections redirected by `equilibrium init` by their original destination "
    "(env {env}=1)")
DISCOVERY = Option(
    "discovery", switch=True, env="EQUILIBRIUM_DISCOVERY",
    help="watch Services and EndpointSlices through the Kubernetes API (env {env}=1)")
NAMESPACES = Option(
    "discovery_namespaces", metavar="NS[,NS...]|*", env="EQUILIBRIUM_DISCOVERY_NAMESPACES",
    help="namespaces to watch (default: the pod's own, which a RoleBinding allows; '*': the "
    "whole cluster, which needs a ClusterRoleBinding; env {env})")
KUBE_API = Option(
    "kube_api", metavar="URL", env="EQUILIBRIUM_KUBE_API",
    help="Kubernetes API server (default: in-cluster; env {env})")
KUBE_TOKEN_FILE = Option(
    "kube_token_file", metavar="FILE", env="EQUILIBRIUM_KUBE_TOKEN_FILE",
    help="bearer token file (default: the pod's service account; env {env})")
OPTIONS = (TRANSPARENT, DISCOVERY, NAMESPACES, KUBE_API, KUBE_TOKEN_FILE)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, OPTIONS)


def parse_namespaces(value: str, own: str | None) -> tuple[str, ...] | None:
    """``*`` -> None (cluster-wide); ``a,b`` -> ("a", "b"); empty -> the pod's own namespace
    (cluster-wide when that is unknown)."""
    text = value.strip()
    if text == "*":
        return None
    if not text:
        return (own,) if own else None
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    for name in names:
        if not _NAMESPACE_RE.match(name):
            raise ConfigError(f"--discovery-namespaces: {name!r} is not a namespace name")
    return names or ((own,) if own else None)


@dataclass(frozen=True, slots=True)
class KubeWiring:
    transparent: bool
    credentials: KubeCredentials | None  # None: discovery off
    namespaces: tuple[str, ...] | None = None  # None: the whole cluster

    @classmethod
    def prepare(cls, args: argparse.Namespace, env: Mapping[str, str]) -> KubeWiring:
        transparent = switch_from_flag_or_env(args, env, TRANSPARENT)
        discovery = switch_from_flag_or_env(args, env, DISCOVERY)
        api, token, scope = (from_flag_or_env(args, env, option)
                             for option in (KUBE_API, KUBE_TOKEN_FILE, NAMESPACES))
        if (api or token or scope) and not discovery:
            raise ConfigError("--kube-api/--kube-token-file/--discovery-namespaces need "
                              "--discovery")
        credentials = None
        if discovery:
            from sidecar.discovery import credentials_from_flags

            try:
                credentials = credentials_from_flags(api or None, token or None, env)
            except ValueError as exc:
                raise ConfigError(f"discovery: {exc}") from None
            if credentials.token_file is not None and not credentials.token_file.is_file():
                raise ConfigError(f"discovery: token file {str(credentials.token_file)!r} "
                                  "does not exist")
        namespaces: tuple[str, ...] | None = None
        if credentials is not None:
            namespaces = parse_namespaces(scope, credentials.namespace)
        return cls(transparent, credentials, namespaces)

    def install(self, runner: Any) -> Discovery | None:
        from sidecar.discovery import Discovery

        discovery: Discovery | None = None
        if self.credentials is not None:
            discovery = Discovery(
                self.credentials, runner.table, registry=runner.metrics.registry,
                namespaces=self.namespaces, on_removed=runner.metrics.forget_upstream,
                clock=runner.clock,
            )
            runner.add_background("discovery", discovery.run)
            runner.add_reload_hook(discovery.reapply)
            log.info("discovery: watching Services and EndpointSlices at %s in %s",
                     self.credentials.api_url,
                     ", ".join(self.namespaces) if self.namespaces else "all namespaces")
        by_authority = (_authority_pin(discovery, runner.table) if discovery is not None
                        else None)
        if self.transparent:
            from sidecar.transparent import install

            install(runner, discovery.route if discovery is not None else None,
                    fallback=by_authority)
            log.info("transparent interception: routing redirected connections by their "
                     "original destination")
        elif by_authority is not None:
            runner.proxy.pinned_upstream = by_authority
        return discovery


def _authority_pin(discovery: Discovery, table: Any) -> Callable[[Any], str | None]:
    """Route ``Host: users:9090`` to the Service's port 9090 (plain Host routing ignores the
    port and would take the Service's primary port). An upstream the config names exactly
    as the Host keeps precedence."""
    from sidecar.outbound import split_target, upstream_name

    def pinned(request: Any) -> str | None:
        authority, _ = split_target(request)
        if not authority:
            return None
        own = table.get(upstream_name(authority))
        if own is not None and own.name == upstream_name(authority):
            return None
        return discovery.upstream_for_authority(authority)

    return pinned
