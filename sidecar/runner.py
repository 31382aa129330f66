"""The sidecar process: built from one ``SidecarConfig``, then run; reload and graceful shutdown.

Owns the assembly and the lifecycle, in two explicit steps:

1. ``SidecarRunner(source, config, mesh_key=...)`` builds every part from the validated
   config, in order, and nothing changes them afterwards: the routing table, Kubernetes
   discovery (which feeds the table), the routing pins (transparent interception's original
   destination, or the discovered ``Host:port``), the caller phases (signed identity, bids),
   the outbound proxy, the inbound listener in front of the app, the signaling plane; then the
   listeners (outbound, admin, inbound), the background tasks, the reload hooks and the
   ``/debug/state`` sections. A setting that cannot work together with the rest (``redis``
   without a mesh key) is a ``ConfigError`` here, before anything starts.
2. ``run()`` starts it: binds every listener, starts the background tasks (policy ticks: one
   task that ticks every upstream's policy in turn each ``tick_interval``; config-file watch;
   discovery; inbound gauges; signaling), then marks the process ready. On SIGHUP or a
   change of the config file's mtime it reloads; on SIGTERM/SIGINT it drains:

   1. ``/readyz`` answers 503 (the orchestrator stops sending new work);
   2. draining listeners stop accepting and close idle keep-alive connections;
   3. requests in flight get up to ``drain_timeout`` seconds to finish, then are cancelled;
   4. background tasks stop, the admin listener closes last, and ``run()`` returns 0.

The parts are attributes: ``config``, ``profile``, ``metrics``, ``table``, ``proxy`` (its
``transport`` carries requests upstream), ``discovery``, ``inbound``, ``signaling`` (None when off).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import random
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import h2
from aiohttp import web

from mesh.errors import ConfigError
from mesh.profiles import StrategyProfile, get_profile
from sidecar import log_guard, nghttp2, outbound
from sidecar.admin import Readiness, debug_state, inbound_json, make_admin_app
from sidecar.config import ConfigSource, ListenAddress, SidecarConfig
from sidecar.discovery import Discovery
from sidecar.dual_stack import start_ipv6_twin
from sidecar.exchange import Exchange
from sidecar.h2_inbound import H2Inbound
from sidecar.h2_proxy import H2Outbound
from sidecar.h2_server import H2Limits
from sidecar.h2_site import outbound_site
from sidecar.http1.server import H1Limits
from sidecar.identity_phase import CallerPhases
from sidecar.inbound import InboundProxy
from sidecar.inbound_site import InboundGuards, InboundLimits
from sidecar.local_callers import LocalCallers
from sidecar.membership import MeshMembership
from sidecar.metrics import (
    DiscoveryMetrics,
    InboundListenerMetrics,
    InboundMetrics,
    ProberMetrics,
    SidecarMetrics,
    SignalingMetrics,
    TransparentMetrics,
)
from sidecar.outbound import OutboundProxy, split_target, upstream_name
from sidecar.phases import ProxyPhases
from sidecar.prober import Prober
from sidecar.shifts import ShiftLog
from sidecar.signaling import SidecarSignaling, signaling_settings
from sidecar.transparent import PASSTHROUGH_CONNECT_TIMEOUT, transparent_outbound
from sidecar.upstreams import UpstreamTable
from wire.redis_store import RedisSignalStore
from wire.signing import MESH_SECRET_ENV

log = logging.getLogger(__name__)

CONFIG_POLL_INTERVAL = 1.0
BackgroundFactory = Callable[[], Coroutine[Any, Any, None]]
# (app runner, host, port) -> an unstarted site; default web.TCPSite (sidecar.transparent's
# TransparentSite reads each accepted connection's original destination first)
SiteFactory = Callable[[web.AppRunner, str, int], web.BaseSite]


@dataclass(slots=True)
class Listener:
    name: str
    app: web.Application
    address: ListenAddress
    drains: bool  # True: waits for in-flight requests on shutdown; False: closed last
    runner: web.AppRunner | None = None
    bound_port: int | None = None
    site_factory: SiteFactory | None = None


def effective_profile(config: SidecarConfig) -> StrategyProfile:
    """The strategy profile with the config's timeout and retry-budget overrides applied."""
    profile = get_profile(config.strategy)
    overrides = {
        name: getattr(config, name)
        for name in ("request_timeout", "connect_timeout", "retry_budget_ratio",
                     "retry_budget_min_per_s")
        if getattr(config, name) is not None
    }
    if config.hedge:
        overrides["hedged"] = True
    return dataclasses.replace(profile, **overrides) if overrides else profile


def _tcp_site(runner: web.AppRunner, host: str, port: int) -> web.BaseSite:
    return web.TCPSite(runner, host, port, reuse_address=True)


class StartupError(RuntimeError):
    """A listener could not be bound (address in use, permission, bad host)."""


class SidecarRunner:
    def __init__(
        self,
        source: ConfigSource,
        config: SidecarConfig,
        *,
        mesh_key: bytes | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Build every part from ``config`` (see the module docstring); nothing starts here."""
        self.source = source
        self.config = config
        self.clock = clock
        signaling = signaling_settings(config, mesh_key)  # ConfigError before anything is built
        try:
            self.h2_engine = nghttp2.engine()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.profile = effective_profile(config)
        self.metrics = SidecarMetrics()
        self.metrics.h2_engine.labels(
            self.h2_engine,
            nghttp2.version() if self.h2_engine == "nghttp2" else h2.__version__).set(1)
        self.table = UpstreamTable(config.policy, self.profile, clock=clock)
        self._shifts = ShiftLog(cap=self.profile.herd.cap)  # routing shifts as log lines
        self.readiness = Readiness()
        self._listeners: list[Listener] = []
        self._background: list[tuple[str, BackgroundFactory]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._in_flight_tasks: set[asyncio.Task[Any]] = set()
        self._config_mtime: float | None = None

        # Discovery feeds the table; its routes pin requests by destination or authority.
        self.discovery = self._build_discovery()
        membership = MeshMembership(lambda name: name in self.config.external_upstreams)
        pinned = (_authority_pin(self.discovery, self.table) if self.discovery is not None
                  else None)
        site = None
        transparent = None
        local = (LocalCallers(self.metrics.registry).admit if config.listener.local_only
                 else None)  # the outbound listener serves this pod only
        if config.transparent:
            transparent = transparent_outbound(
                self.table, TransparentMetrics(self.metrics.registry),
                connect_timeout=max(self.profile.connect_timeout,
                                    PASSTHROUGH_CONNECT_TIMEOUT),
                drain_timeout=config.drain_timeout,
                lookup=self.discovery.route if self.discovery is not None else None,
                fallback=pinned, header_timeout=config.listener.header_timeout,
                accept_from=local,
            )
            site, pinned = transparent.site, transparent.pinned_upstream
            log.info("transparent interception: routing redirected connections by their "
                     "original destination")
        if mesh_key is None:
            log.warning("no mesh key (%s or mesh_secret_file): outbound requests go unsigned",
                        MESH_SECRET_ENV)
        self.proxy = OutboundProxy(
            sidecar_id=config.id,
            table=self.table,
            profile=self.profile,
            metrics=self.metrics.outbound,
            phases=CallerPhases(
                ProxyPhases(),
                caller_id=config.id,
                mesh_key=mesh_key,
                default_bid=config.policing.default_bid,
                metrics=self.metrics.caller,
                clock=clock,
                membership=membership,
            ),
            pinned_upstream=pinned,
            max_attempts=config.max_attempts or self.profile.max_retries + 1,
            rng=rng or random.Random(),
            clock=clock,
            hedge=config.hedge,
            source_address=config.source_address,
            rescue=config.rescue,
            long_paths=self._long_paths,
        )
        if config.rescue:
            log.info("rescue on: bodiless idempotent requests an ejected endpoint holds are sent "
                     "to another, as retries (HTTP/1.1; not for services of long polls)")
        if config.hedge:
            log.info("hedged exploration on: exploratory picks of bodiless idempotent requests "
                     "race the best endpoint after its p90 (HTTP/1.1)")
        # HTTP/2 (h2c) on the outbound port: each stream routed on its own (sidecar.h2_proxy)
        self.h2 = H2Outbound(
            sidecar_id=config.id,
            table=self.table,
            metrics=self.metrics.outbound,
            request_timeout=self.profile.request_timeout,
            connect_timeout=self.profile.connect_timeout,
            phases=self.proxy.phases,
            authority_pin=(_h2_authority_pin(self.discovery, self.table)
                           if self.discovery is not None else None),
            max_attempts=self.proxy.max_attempts,
            rng=self.proxy.rng,
            clock=clock,
            source_address=config.source_address,
            long_paths=self.proxy.long_paths,
        )
        limits = config.listener
        h2_limits = H2Limits(max_streams=limits.max_streams, idle_timeout=limits.idle_timeout)
        if transparent is not None:  # h2c on redirected connections: per stream, pinned
            transparent.serve_h2(self.h2.handle, self.h2.h2_metrics, h2_limits)
            transparent.serve_http1(self._serve_http1, self.h2.h2_metrics, H1Limits(
                header_timeout=limits.header_timeout, idle_timeout=limits.idle_timeout))
        if site is None:
            site = outbound_site(
                self.h2.handle, self.h2.h2_metrics, drain_timeout=config.drain_timeout,
                limits=h2_limits, sniff_timeout=limits.header_timeout,
                max_connections=limits.max_connections,
                http1=self._serve_http1,
                http1_limits=H1Limits(header_timeout=limits.header_timeout,
                                      idle_timeout=limits.idle_timeout),
                accept_from=local)
        self.inbound = self._build_inbound(mesh_key)
        self.h2_inbound: H2Inbound | None = None  # set with the inbound listener's site
        self.signaling: SidecarSignaling | None = None
        if signaling is not None:
            self.signaling = SidecarSignaling(
                sidecar_id=config.id,
                table=self.table,
                metrics=SignalingMetrics(self.metrics.registry),
                settings=signaling,
                store=RedisSignalStore(signaling.redis_url, signaling.timeout),
                clock=clock,
            )
            log.info("signaling: summaries every %gs as %s", signaling.epoch,
                     self.signaling.sidecar)

        @web.middleware
        async def track_in_flight(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            task = asyncio.current_task()
            if task is None:
                return await handler(request)
            self._in_flight_tasks.add(task)
            try:
                return await handler(request)
            finally:
                self._in_flight_tasks.discard(task)

        self._track_in_flight = track_in_flight
        # Listeners, bound in this order by run().
        self._add_listener("outbound", self.proxy.make_app(), config.outbound, drains=True,
                           site_factory=site)
        admin = make_admin_app(metrics=self.metrics, readiness=self.readiness, state=self.state)
        self._add_listener("admin", admin, config.admin, drains=False)
        if self.inbound is not None and config.inbound is not None:
            metrics = InboundListenerMetrics(self.metrics.registry, self.h2.h2_metrics)
            policing = config.policing  # the listener's defences (sidecar.inbound_site)
            guards = InboundGuards(InboundLimits(
                policing.header_timeout, policing.keepalive_timeout, policing.max_connections,
                policing.max_connections_per_source), metrics)
            inbound_app = self.inbound.make_app()
            inbound_app.middlewares.append(guards.middleware)
            self._add_listener("inbound", inbound_app, config.inbound, drains=True,
                               site_factory=self._inbound_site(self.inbound, metrics, guards))
        # Background tasks, started in this order by run().
        self._background.append(("policy-ticks", self._tick_loop))
        if config.config_file is not None:
            self._background.append(("config-watch", self._watch_config_file))
        if self.discovery is not None:
            self._background.append(("discovery", self.discovery.run))
        if self.inbound is not None:
            self._background.append(("inbound-gauges", self.inbound.refresh_gauges))
            self._background.append(("app-check", self._check_app))
        # Probes of every endpoint's inbound sidecar (sidecar.prober); they need the mesh key.
        self.prober = (Prober(self.table, caller_id=config.id, mesh_key=mesh_key,
                              metrics=ProberMetrics(self.metrics.registry), clock=clock,
                              membership=membership)
                       if mesh_key is not None else None)
        if self.prober is not None:
            self._background.append(("probes", self.prober.run))
        if self.signaling is not None:
            self._background.append(("signaling", self.signaling.run))

    async def _serve_http1(self, exchange: Exchange) -> None:
        """The outbound HTTP/1.1 server's handler: the proxy, tracked so the drain deadline
        cuts it."""
        await self._tracked(self.proxy.serve, exchange)

    async def _serve_inbound_http1(self, exchange: Exchange) -> None:
        """The inbound HTTP/1.1 server's handler, tracked the same way."""
        assert self.inbound is not None
        await self._tracked(self.inbound.serve, exchange)

    async def _tracked(self, serve: Callable[[Exchange], Awaitable[None]],
                       exchange: Exchange) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._in_flight_tasks.add(task)
        try:
            await serve(exchange)
        finally:
            self._in_flight_tasks.discard(task)

    def _long_paths(self, upstream: str) -> tuple[str, ...]:
        """An upstream's declared long requests (wire.long_paths): the config file's for
        it, else, for a discovered one, its Service's ``equilibrium.io/long-paths``."""
        declared = self.config.long_paths.get(upstream)
        if declared is None and self.discovery is not None:
            return self.discovery.long_paths(upstream)
        return declared or ()

    def _build_discovery(self) -> Discovery | None:
        settings = self.config.discovery
        if settings is None:
            return None
        discovery = Discovery(
            settings.credentials, self.table, metrics=DiscoveryMetrics(self.metrics.registry),
            namespaces=settings.namespaces, on_removed=self.metrics.outbound.forget_upstream,
            clock=self.clock,
        )
        log.info("discovery: watching Services and EndpointSlices at %s in %s",
                 settings.credentials.api_url,
                 ", ".join(settings.namespaces) if settings.namespaces else "all namespaces")
        return discovery

    def _build_inbound(self, mesh_key: bytes | None) -> InboundProxy | None:
        config = self.config
        if config.inbound is None or config.app is None:
            return None
        inbound = InboundProxy(
            sidecar_id=config.id,
            app_url=config.app,
            settings=config.policing,
            metrics=InboundMetrics(self.metrics.registry),
            mesh_key=mesh_key,
            request_timeout=self.profile.request_timeout,
            connect_timeout=self.profile.connect_timeout,
            clock=self.clock,
        )
        inbound.probes.draining = lambda: self.readiness.draining
        if mesh_key is None:
            log.warning("inbound %s: no mesh key, so no caller identity can be verified: every "
                        "caller is policed as 'anonymous' (the strictest bucket)", config.inbound)
        log.info("inbound %s -> app %s, policing mode %s, declared long requests: %s",
                 config.inbound, config.app, config.policing.mode,
                 ", ".join(config.policing.long_paths) or "none")
        return inbound

    def _inbound_site(self, inbound: InboundProxy, metrics: InboundListenerMetrics,
                      guards: InboundGuards) -> SiteFactory:
        """HTTP/1.1 and h2c on the inbound port: each HTTP/2 stream is policed and forwarded
        on its own (sidecar.h2_inbound), with the outbound listener's defences; each HTTP/1.1
        request by the inbound proxy on the sidecar's own server (sidecar.http1.server), with
        the inbound header and keep-alive timeouts; every connection under ``guards``' caps
        (sidecar.inbound_site)."""
        self.h2_inbound = H2Inbound(inbound)
        limits = self.config.listener
        return outbound_site(
            self.h2_inbound.handle, metrics, drain_timeout=self.config.drain_timeout,
            limits=H2Limits(max_streams=limits.max_streams, idle_timeout=limits.idle_timeout),
            sniff_timeout=limits.header_timeout, max_connections=limits.max_connections,
            http1=self._serve_inbound_http1,
            http1_limits=H1Limits(header_timeout=guards.limits.header_timeout,
                                  idle_timeout=guards.limits.idle_timeout, require_host=True),
            guards=guards)

    async def _check_app(self) -> None:
        """The inbound side's idle check of its app, for probe answers (sidecar.probe_answer)."""
        if self.inbound is not None and self.config.app is not None:
            await self.inbound.probes.check_app(self.config.app,
                                                self.config.policing.app_check_path,
                                                self.profile.request_timeout)

    def _add_listener(
        self, name: str, app: web.Application, address: ListenAddress, *, drains: bool,
        site_factory: SiteFactory | None = None,
    ) -> None:
        if drains:  # the drain deadline must be able to cut what is still running
            app.middlewares.append(self._track_in_flight)
        self._listeners.append(Listener(name, app, address, drains, site_factory=site_factory))

    def bound_port(self, name: str) -> int | None:
        return next((lst.bound_port for lst in self._listeners if lst.name == name), None)

    # ------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        body = debug_state(
            sidecar_id=self.config.id,
            strategy=self.config.strategy,
            policy=self.config.policy,
            draining=self.readiness.draining,
            table=self.table,
        )
        body["inbound"] = inbound_json(self.inbound.snapshot()) if self.inbound else None
        return body

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (or ``stop()``), drain, return the exit code."""
        loop = asyncio.get_running_loop()
        await self.proxy.start()
        unguard = log_guard.install(lambda kind: self.metrics.malformed_requests.labels(kind).inc())
        try:
            self.table.apply(self.config.upstreams, self.clock())
            self._remember_mtime()
            for listener in self._listeners:
                await self._bind(listener)
            for name, factory in self._background:
                self._tasks.append(asyncio.create_task(factory(), name=name))
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
            loop.add_signal_handler(signal.SIGHUP, self.safe_reload)
            # Everything allocated so far (modules, config, pools) lives as long as the
            # process: move it out of the collector's sight, so full collections on the
            # request path only walk what requests allocate (shorter GC pauses at p99).
            gc.collect()
            gc.freeze()
            self.readiness.started = True
            log.info(
                "sidecar %s ready: %s; upstreams: %s; request path %s; HTTP/2 engine %s",
                self.config.id,
                ", ".join(
                    f"{lst.name}={lst.address.host}:{lst.bound_port}" for lst in self._listeners
                ),
                ", ".join(self.table.names()) or "(none)",
                "compiled (mypyc)" if not (outbound.__file__ or "").endswith(".py")
                else "pure Python",
                f"libnghttp2 {nghttp2.version()}" if self.h2_engine == "nghttp2"
                else "h2 (pure Python)",
            )
            await self._stop.wait()
            await self._drain()
            return 0
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self._shutdown_rest()
            unguard()

    def stop(self) -> None:
        if not self._stop.is_set():
            log.info("sidecar %s: stopping, draining for up to %.1fs",
                     self.config.id, self.config.drain_timeout)
            self.readiness.draining = True
            self.metrics.draining.set(1)
            self._stop.set()

    async def _bind(self, listener: Listener) -> None:
        runner = web.AppRunner(
            listener.app,
            access_log=None,
            shutdown_timeout=self.config.drain_timeout if listener.drains else 1.0,
            handle_signals=False,
        )
        await runner.setup()
        listener.runner = runner
        host, port = listener.address.host, listener.address.port
        factory = listener.site_factory or _tcp_site
        site = factory(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {listener.address} for {listener.name}: {exc.strerror or exc}"
            ) from None
        server = site._server  # aiohttp keeps the asyncio server private
        sockets = getattr(server, "sockets", None) or ()
        listener.bound_port = sockets[0].getsockname()[1] if sockets else listener.address.port
        try:  # 0.0.0.0 also listens on [::], same port (sidecar.dual_stack)
            await start_ipv6_twin(lambda h, p: factory(runner, h, p), listener.name,
                                  host, port, listener.bound_port)
        except OSError as exc:
            raise StartupError(f"cannot listen on [::]:{listener.bound_port} for "
                               f"{listener.name}: {exc.strerror or exc}") from None

    async def _drain(self) -> None:
        """Stop accepting, wait for in-flight requests up to the deadline, then cut the rest."""
        draining = [lst for lst in self._listeners if lst.drains and lst.runner is not None]
        cleanup = asyncio.ensure_future(
            asyncio.gather(*(lst.runner.cleanup() for lst in draining if lst.runner))
        )
        try:
            async with asyncio.timeout(self.config.drain_timeout):
                await asyncio.shield(cleanup)
        except TimeoutError:
            stuck = [task for task in self._in_flight_tasks if not task.done()]
            log.warning(
                "sidecar %s: drain deadline reached, cutting %d request(s) still in flight",
                self.config.id, len(stuck),
            )
            for task in stuck:
                task.cancel()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await asyncio.shield(cleanup)
        if not cleanup.done():
            cleanup.cancel()
        for lst in draining:
            lst.runner = None
        log.info("sidecar %s: drained", self.config.id)

    async def _shutdown_rest(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        for lst in self._listeners:
            if lst.runner is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2.0):
                        await lst.runner.cleanup()
                lst.runner = None
        await self.proxy.close()
        self.h2.close()
        if self.h2_inbound is not None:
            self.h2_inbound.close()

    # ------------------------------------------------------------ background tasks

    async def _tick_loop(self) -> None:
        """Off the request path: every upstream's policy learns and its snapshot is swapped."""
        interval = max(self.profile.tick_interval, 0.01)
        while True:
            await asyncio.sleep(interval)
            now = self.clock()
            for group in self.table:
                if group.dormant:  # nobody asked for it yet: nothing to learn
                    continue
                try:
                    snapshot = group.tick(now)
                    if self.proxy.rescue is not None:  # what its ejected endpoints hold
                        self.proxy.rescue.sweep(group, now)
                    shifts = self._shifts.observe(group.name, snapshot, now)
                except Exception:  # a policy bug must not stop routing of the others
                    log.exception("policy tick failed for upstream %s", group.name)
                    continue
                self.metrics.outbound.observe_snapshot(group.name, snapshot)
                for line in shifts:
                    log.info("%s", line)
            self._shifts.keep({group.name for group in self.table})
            self.h2.prune()

    def _file_mtime(self) -> float | None:
        path = self.config.config_file
        try:
            return path.stat().st_mtime if path is not None else None
        except OSError:
            return None

    def _remember_mtime(self) -> None:
        self._config_mtime = self._file_mtime()

    async def _watch_config_file(self) -> None:
        """Poll the file's mtime; reload on a change. Never ends on a bad edit: every failure
        is logged and counted (:meth:`safe_reload`) and the next edit is read again."""
        while True:
            await asyncio.sleep(CONFIG_POLL_INTERVAL)
            mtime = self._file_mtime()
            if mtime is not None and mtime != self._config_mtime:
                self._config_mtime = mtime
                log.info("config file %s changed", self.config.config_file)
                self.safe_reload()

    # ------------------------------------------------------------ reload

    def safe_reload(self) -> bool:
        """:meth:`reload` for the file watcher and SIGHUP: an error that is not a
        ``ConfigError`` (a bug met by an unusual edit) is logged with its traceback and
        counted as ``result="failed"``; the running config stays and later edits apply."""
        try:
            return self.reload()
        except Exception:
            self.metrics.config_reloads.labels("failed").inc()
            log.exception("config reload failed, keeping the running config")
            return False

    def reload(self) -> bool:
        """Re-read the config; apply new endpoints or keep the old config. True if applied."""
        if self.readiness.draining:
            return False
        self._remember_mtime()
        try:
            new = self.source.load(reload=True)
        except ConfigError as exc:
            self.metrics.config_reloads.labels("rejected").inc()
            log.error("config reload rejected, keeping the running config: %s", exc)
            return False
        waiting = [f.name for f in dataclasses.fields(new) if f.name not in LIVE_SETTINGS
                   and getattr(new, f.name) != getattr(self.config, f.name)]
        if waiting:  # every setting but the upstreams: named, not lost
            log.warning("config reload: %s changed; %s on restart, the running value stays "
                        "until then", ", ".join(waiting),
                        "takes effect" if len(waiting) == 1 else "they take effect")
        before = self.config.upstreams
        added, removed = self.table.apply(new.upstreams, self.clock())
        moved = [f"{name} {_endpoint_change(before[name], endpoints)}"
                 for name, endpoints in sorted(new.upstreams.items())
                 if name in before and list(before[name]) != list(endpoints)]
        for name in removed:
            self.metrics.outbound.forget_upstream(name)
        # Only the upstreams change live, with what the file declares of them (outside the
        # mesh, long requests: sidecar.membership reads the running config at each request);
        # every other setting (listeners, policy, inbound, redis, the drain timeout the
        # listeners were built with, ...) is kept as started.
        self.config = dataclasses.replace(
            self.config, upstreams=new.upstreams, external_upstreams=new.external_upstreams,
            long_paths=new.long_paths, sources=new.sources)
        self.metrics.config_reloads.labels("applied").inc()
        origin = new.sources.get("upstreams")
        log.info(
            "config reloaded: upstreams %s (added %s, removed %s; endpoints changed: %s)%s",
            ", ".join(self.table.names()) or "(none)",
            ", ".join(sorted(added)) or "none",
            ", ".join(sorted(removed)) or "none",
            "; ".join(moved) or "none",
            f"; they come from the {origin}, which overrides the config file's"
            if origin in ("environment", "command line") else "",
        )
        if self.discovery is not None:  # the config may have released a name discovery wants
            try:
                self.discovery.reapply(self.config)
            except Exception:
                log.exception("discovery: applying the routes again after a reload failed")
        return True


def _endpoint_change(before: Sequence[str], after: Sequence[str]) -> str:
    """``+new -gone`` endpoints of one upstream (or ``reordered``), for the reload's log."""
    gone = [e for e in before if e not in after]
    new = [e for e in after if e not in before]
    return " ".join([*(f"+{e}" for e in new), *(f"-{e}" for e in gone)]) or "reordered"


LIVE_SETTINGS = frozenset({"upstreams", "external_upstreams", "long_paths", "sources",
                           "config_file"})
"""What a reload applies (``sources`` and ``config_file`` describe where settings came
from); any other setting that changed is named in a warning and waits for a restart."""


def _h2_authority_pin(discovery: Discovery, table: UpstreamTable) -> Callable[[str], str | None]:
    """:func:`_authority_pin` for an HTTP/2 request's ``:authority``."""

    def pinned(authority: str) -> str | None:
        own = table.get(upstream_name(authority))
        if own is not None and own.name == upstream_name(authority):
            return None
        return discovery.upstream_for_authority(authority)

    return pinned


def _authority_pin(discovery: Discovery, table: UpstreamTable) -> Callable[[Any], str | None]:
    """Route ``Host: users:9090`` to the Service's port 9090 (plain Host routing ignores the
    port and would take the Service's primary port). An upstream the config names exactly
    as the Host keeps precedence."""

    def pinned(request: Any) -> str | None:
        authority, _ = split_target(request)
        if not authority:
            return None
        own = table.get(upstream_name(authority))
        if own is not None and own.name == upstream_name(authority):
            return None
        return discovery.upstream_for_authority(authority)

    return pinned
