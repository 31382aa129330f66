"""The sidecar process: listeners, background tasks, reload and graceful shutdown.

Owns the lifecycle. ``SidecarRunner.run()`` binds every listener (outbound and admin, plus
any added with ``add_listener``), starts the background tasks (policy ticks: one task that
ticks every upstream's policy in turn each ``tick_interval``; config-file watch; plus any
added with ``add_background``), then marks the process ready. On SIGHUP or a
change of the config file's mtime it reloads; on SIGTERM/SIGINT it drains:

1. ``/readyz`` answers 503 (the orchestrator stops sending new work);
2. draining listeners stop accepting and close idle keep-alive connections;
3. requests in flight get up to ``drain_timeout`` seconds to finish, then are cancelled;
4. background tasks stop, the admin listener closes last, and ``run()`` returns 0.

Extension points (the inbound listener, interception, discovery and signaling plug in here):
``add_listener(name, app, address, drains=True)``, ``set_site_factory(name, factory)``,
``add_background(name, factory)``, ``add_reload_hook(callback)``,
``add_state_section(name, section)`` (a top-level ``/debug/state`` key), and the proxy's phases
(``phases=`` of the constructor, or wrap ``runner.proxy.phases``). They must be
called before ``run()``. The shared objects they may need are attributes: ``config``,
``profile``, ``metrics``, ``table``, ``proxy`` (its ``session`` is the upstream pool).
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
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from mesh.profiles import StrategyProfile, get_profile
from sidecar.admin import Readiness, debug_state, make_admin_app
from sidecar.config import ConfigError, ConfigSource, ListenAddress, SidecarConfig
from sidecar.dual_stack import start_ipv6_twin
from sidecar.metrics import SidecarMetrics
from sidecar.outbound import OutboundProxy
from sidecar.phases import ProxyPhases
from sidecar.upstreams import UpstreamTable

log = logging.getLogger(__name__)

CONFIG_POLL_INTERVAL = 1.0
BackgroundFactory = Callable[[], Coroutine[Any, Any, None]]
ReloadHook = Callable[[SidecarConfig], None]
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
    """The strategy profile with the config's timeout overrides applied."""
    profile = get_profile(config.strategy)
    overrides = {
        name: getattr(config, name)
        for name in ("request_timeout", "connect_timeout")
        if getattr(config, name) is not None
    }
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
        phases: ProxyPhases | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.config = config
        self.clock = clock
        self.profile = effective_profile(config)
        self.metrics = SidecarMetrics()
        self.table = UpstreamTable(config.policy, self.profile)
        self.readiness = Readiness()
        self.proxy = OutboundProxy(
            sidecar_id=config.id,
            table=self.table,
            profile=self.profile,
            metrics=self.metrics,
            phases=phases,
            max_attempts=config.max_attempts or self.profile.max_retries + 1,
            rng=rng or random.Random(),
            clock=clock,
        )
        self._listeners: list[Listener] = []
        self._background: list[tuple[str, BackgroundFactory]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._reload_hooks: list[ReloadHook] = []
        self._state_sections: dict[str, Callable[[], Any]] = {}
        self._stop = asyncio.Event()
        self._in_flight_tasks: set[asyncio.Task[Any]] = set()

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
        self._config_mtime: float | None = None
        self.add_listener("outbound", self.proxy.make_app(), config.outbound, drains=True)
        admin = make_admin_app(metrics=self.metrics, readiness=self.readiness, state=self.state)
        self.add_listener("admin", admin, config.admin, drains=False)
        self.add_background("policy-ticks", self._tick_loop)
        if config.config_file is not None:
            self.add_background("config-watch", self._watch_config_file)

    # ------------------------------------------------------------ extension points

    def add_listener(
        self, name: str, app: web.Application, address: ListenAddress, *, drains: bool = True
    ) -> None:
        if drains:  # the drain deadline must be able to cut what is still running
            app.middlewares.append(self._track_in_flight)
        self._listeners.append(Listener(name, app, address, drains))

    def set_site_factory(self, name: str, factory: SiteFactory) -> None:
        """Bind listener ``name`` with ``factory(app_runner, host, port)`` instead of TCPSite."""
        for listener in self._listeners:
            if listener.name == name:
                listener.site_factory = factory
                return
        raise KeyError(f"no listener named {name!r}")

    def add_background(self, name: str, factory: BackgroundFactory) -> None:
        self._background.append((name, factory))

    def add_reload_hook(self, hook: ReloadHook) -> None:
        """``hook(new_config)`` runs after a reload was applied."""
        self._reload_hooks.append(hook)

    def add_state_section(self, name: str, section: Callable[[], Any]) -> None:
        """``/debug/state`` gets ``name: section()`` beside the upstreams."""
        self._state_sections[name] = section

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
        body.update({name: section() for name, section in self._state_sections.items()})
        return body

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (or ``stop()``), drain, return the exit code."""
        loop = asyncio.get_running_loop()
        await self.proxy.start()
        try:
            self.table.apply(self.config.upstreams, self.clock())
            self._remember_mtime()
            for listener in self._listeners:
                await self._bind(listener)
            for name, factory in self._background:
                self._tasks.append(asyncio.create_task(factory(), name=name))
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
            loop.add_signal_handler(signal.SIGHUP, self.reload)
            # Everything allocated so far (modules, config, pools) lives as long as the
            # process: move it out of the collector's sight, so full collections on the
            # request path only walk what requests allocate (shorter GC pauses at p99).
            gc.collect()
            gc.freeze()
            self.readiness.started = True
            log.info(
                "sidecar %s ready: %s; upstreams: %s",
                self.config.id,
                ", ".join(
                    f"{lst.name}={lst.address.host}:{lst.bound_port}" for lst in self._listeners
                ),
                ", ".join(self.table.names()) or "(none)",
            )
            await self._stop.wait()
            await self._drain()
            return 0
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self._shutdown_rest()

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

    # ------------------------------------------------------------ background tasks

    async def _tick_loop(self) -> None:
        """Off the request path: every upstream's policy learns and its snapshot is swapped."""
        interval = max(self.profile.tick_interval, 0.01)
        while True:
            await asyncio.sleep(interval)
            now = self.clock()
            for group in self.table:
                try:
                    snapshot = group.tick(now)
                except Exception:  # a policy bug must not stop routing of the others
                    log.exception("policy tick failed for upstream %s", group.name)
                    continue
                self.metrics.observe_snapshot(group.name, snapshot)

    def _file_mtime(self) -> float | None:
        path = self.config.config_file
        try:
            return path.stat().st_mtime if path is not None else None
        except OSError:
            return None

    def _remember_mtime(self) -> None:
        self._config_mtime = self._file_mtime()

    async def _watch_config_file(self) -> None:
        while True:
            await asyncio.sleep(CONFIG_POLL_INTERVAL)
            mtime = self._file_mtime()
            if mtime is not None and mtime != self._config_mtime:
                self._config_mtime = mtime
                log.info("config file %s changed", self.config.config_file)
                self.reload()

    # ------------------------------------------------------------ reload

    def reload(self) -> bool:
        """Re-read the config; apply new endpoints or keep the old config. True if applied."""
        if self.readiness.draining:
            return False
        self._remember_mtime()
        try:
            new = self.source.load()
        except ConfigError as exc:
            self.metrics.config_reloads.labels("rejected").inc()
            log.error("config reload rejected, keeping the running config: %s", exc)
            return False
        for field_name in ("id", "outbound", "admin", "strategy", "policy", "redis",
                           "signaling_epoch"):
            if getattr(new, field_name) != getattr(self.config, field_name):
                log.warning("config reload: %s changed; takes effect on restart", field_name)
        added, removed = self.table.apply(new.upstreams, self.clock())
        for name in removed:
            self.metrics.forget_upstream(name)
        # Only these change live; every other setting (listeners, policy, inbound, redis, ...)
        # is kept as it was started with.
        self.config = dataclasses.replace(
            self.config,
            upstreams=new.upstreams,
            drain_timeout=new.drain_timeout,
            sources=new.sources,
        )
        self.metrics.config_reloads.labels("applied").inc()
        log.info(
            "config reloaded: upstreams %s (added %s, removed %s)",
            ", ".join(self.table.names()) or "(none)",
            ", ".join(sorted(added)) or "none",
            ", ".join(sorted(removed)) or "none",
        )
        for hook in self._reload_hooks:
            try:
                hook(self.config)
            except Exception:
                log.exception("reload hook %r failed", hook)
        return True
