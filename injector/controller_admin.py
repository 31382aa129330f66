"""The install controller's metrics listener: ``GET /metrics`` and ``GET /healthz``.

Owns the HTTP of ``equilibrium injector controller --metrics HOST:PORT`` (loopback by
default, like the sidecar's admin port; k8s/base/controller.yaml binds it on the pod's IP
as the ``metrics`` port for Prometheus and the liveness probe). ``/metrics`` is
:class:`injector.metrics.ControllerMetrics` in Prometheus' text format; ``/healthz`` answers
200 while the process serves. Nothing else is served, and nothing here reads or writes the
Kubernetes API.
"""

from __future__ import annotations

from aiohttp import web

from injector.metrics import CONTENT_TYPE, ControllerMetrics
from mesh.address import HostPort


async def start_metrics(metrics: ControllerMetrics, listen: HostPort) -> web.AppRunner:
    """Serve ``metrics`` on ``listen`` until the returned runner is cleaned up."""

    async def render(_: web.Request) -> web.Response:
        response = web.Response(body=metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/metrics", render)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, listen.host, listen.port).start()
    return runner
