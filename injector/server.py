"""The webhook's HTTPS server: a thin aiohttp wrapper around ``injector.review.decide``.

Owns transport concerns only: TLS (reloaded when the mounted Secret changes), the body size
limit, JSON decoding (numbers of at most 32 characters, no NaN/Infinity, nesting within the
interpreter's recursion limit; anything else is HTTP 400), mapping ``MalformedReview`` to HTTP
400, and counting each answer in
:class:`injector.metrics.InjectorMetrics`. Every decision about the pod is the pure function's.

Routes: ``POST /mutate`` (the annotation decides), ``POST /mutate/namespace`` (the namespace
opted in: inject unless annotated ``"false"``), ``GET /healthz``, ``GET /metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import ssl
from typing import Any

from aiohttp import web

from injector.config import InjectorConfig
from injector.metrics import CONTENT_TYPE, InjectorMetrics
from injector.review import MalformedReview, Outcome, decide
from mesh.address import HostPort
from wire import logs

log = logging.getLogger("equilibrium.injector")

DEFAULT_MAX_BODY = 1 << 20  # a pod spec is a few kB; the API server caps objects at 1.5 MiB
CERT_RELOAD_SECONDS = 30.0

CONFIG_KEY = web.AppKey("config", InjectorConfig)
METRICS_KEY = web.AppKey("metrics", InjectorMetrics)
MAX_BODY_KEY = web.AppKey("max_body", int)


def make_app(config: InjectorConfig, *, max_body: int = DEFAULT_MAX_BODY) -> web.Application:
    """The aiohttp application (no TLS, no socket: ``serve`` adds those)."""
    app = web.Application(client_max_size=max_body)
    app[CONFIG_KEY] = config
    app[METRICS_KEY] = InjectorMetrics()
    app[MAX_BODY_KEY] = max_body
    app.router.add_post("/mutate", _mutate)
    app.router.add_post("/mutate/namespace", _mutate)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    return app


async def _mutate(request: web.Request) -> web.Response:
    metrics = request.app[METRICS_KEY]
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        metrics.reviewed(Outcome.TOO_LARGE)
        return _error(413, f"body larger than {request.app[MAX_BODY_KEY]} bytes")
    try:
        document = _load_json(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        metrics.reviewed(Outcome.REJECTED)
        return _error(400, f"body is not JSON: {exc}")
    except _Unreadable as exc:
        metrics.reviewed(Outcome.REJECTED)
        return _error(400, f"body is not an AdmissionReview: {exc}")
    namespace_default = request.path.endswith("/namespace")
    try:
        verdict = decide(document, request.app[CONFIG_KEY], namespace_default=namespace_default)
    except MalformedReview as exc:
        metrics.reviewed(Outcome.REJECTED)
        return _error(400, f"malformed AdmissionReview: {exc}")
    except Exception:  # a bug must not take the webhook down; the API server then Ignores
        log.exception("review failed")
        metrics.reviewed(Outcome.ERROR)
        return _error(500, "internal error while reviewing the pod")
    metrics.reviewed(verdict.outcome)
    response = verdict.response["response"]
    # %r: no forged lines; cut: the client chose both (a stranger's 500 KB uid, a line as long)
    log.info("review uid=%r namespace=%r result=%s", _cut(response["uid"]),
             _cut((document.get("request") or {}).get("namespace")), verdict.outcome.value)
    return web.json_response(verdict.response)


def _cut(value: object, limit: int = 80) -> object:
    """A client's value for a log line: a string longer than ``limit`` cut, with its length."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]}... ({len(value)} characters)"
    return value


class _Unreadable(ValueError):
    """JSON that is valid but not something a review can come from."""


MAX_NUMBER_CHARS = 32  # a pod spec's numbers (ports, UIDs, quantities) are far shorter


def _number(text: str) -> int | float:
    if len(text) > MAX_NUMBER_CHARS:
        raise _Unreadable(f"a number of {len(text)} characters (at most {MAX_NUMBER_CHARS})")
    return float(text) if any(c in text for c in ".eE") else int(text)


def _no_constant(name: str) -> None:
    raise _Unreadable(f"{name} is not JSON")


def _load_json(body: bytes) -> Any:
    """``json.loads`` with bounded numbers and nesting: what it refuses is ``_Unreadable``
    (a 5,000-digit number would raise ``ValueError``, deep nesting ``RecursionError``)."""
    try:
        return json.loads(body, parse_int=_number, parse_float=_number,
                          parse_constant=_no_constant)
    except RecursionError:
        raise _Unreadable("nested too deeply") from None


async def _healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS_KEY].render(),
                        headers={"Content-Type": CONTENT_TYPE})


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# ---- serving ----------------------------------------------------------------------------------

def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


async def serve(config: InjectorConfig, listen: HostPort, cert_file: str, key_file: str,
                *, max_body: int = DEFAULT_MAX_BODY) -> None:
    """Serve until SIGTERM/SIGINT. Prints ``listening on https://HOST:PORT`` once bound."""
    context = tls_context(cert_file, key_file)
    runner = web.AppRunner(make_app(config, max_body=max_body), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, listen.host, listen.port, ssl_context=context)
    await site.start()
    host, port = runner.addresses[0][:2]
    if logs.current() == "json":  # every line the pipeline reads is JSON
        log.info("listening on https://%s:%d", host, port)
    else:
        print(f"listening on https://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloader = asyncio.create_task(_reload_on_change(context, cert_file, key_file))
    try:
        await stop.wait()
    finally:
        reloader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reloader
        await runner.cleanup()


async def _reload_on_change(context: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    """Pick up a rotated Secret (cert-manager renewals): new handshakes use the new pair."""
    def stamp() -> tuple[float, float]:
        return os.stat(cert_file).st_mtime, os.stat(key_file).st_mtime

    seen = stamp()
    while True:
        await asyncio.sleep(CERT_RELOAD_SECONDS)
        try:
            now = stamp()
            if now != seen:
                context.load_cert_chain(cert_file, key_file)
                seen = now
                log.info("reloaded the serving certificate from %s", cert_file)
        except (OSError, ssl.SSLError) as exc:  # mid-rotation: keep the old pair, retry later
            log.warning("certificate reload failed, keeping the current one: %s", exc)
