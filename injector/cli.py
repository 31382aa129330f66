"""``equilibrium injector``: run the webhook, or bootstrap its certificates.

    equilibrium injector --listen 0.0.0.0:8443 --tls-cert tls.crt --tls-key tls.key
    equilibrium injector bootstrap-certs --manifest k8s/install.yaml | kubectl apply -f -
    equilibrium injector controller        (in the cluster: generate and hand out the secrets)

Argument parsing only; serving is ``injector.server``, certificates ``injector.certs``, the
install controller ``injector.controller``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import random
import secrets
import sys
from pathlib import Path
from typing import Any

import yaml

from injector import certs, mesh_objects
from injector.config import (
    DEFAULT_SHUTDOWN_DELAY,
    MAX_SHUTDOWN_DELAY,
    InjectorConfig,
    Resources,
)
from injector.controller import Controller, ControllerConfig
from injector.controller_admin import start_metrics
from injector.kube import Credentials, KubeRest
from injector.metrics import ControllerMetrics
from injector.server import DEFAULT_MAX_BODY, serve
from mesh.address import AddressError, parse_host_port
from wire import logs

DEFAULTS = InjectorConfig()
INJECTOR_LOG_LINE = "%(asctime)s %(levelname)s %(message)s"  # its plain lines
DEFAULT_CONTROLLER_METRICS = "127.0.0.1:15020"  # loopback, like the sidecar's admin port


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "injector",
        help="run the Kubernetes sidecar-injector webhook",
        description="Mutating admission webhook adding the Equilibrium sidecar to pods "
                    "(see docs/kubernetes.md).",
    )
    parser.add_argument("--listen", default="0.0.0.0:8443", help="HOST:PORT (default %(default)s)")
    parser.add_argument("--tls-cert", help="PEM serving certificate")
    parser.add_argument("--tls-key", help="PEM serving key")
    parser.add_argument("--sidecar-image", default=DEFAULTS.image,
                        help="image of the injected containers (default %(default)s)")
    parser.add_argument("--image-pull-policy", default=DEFAULTS.image_pull_policy,
                        choices=("Always", "IfNotPresent", "Never"))
    parser.add_argument("--mesh-secret", default=DEFAULTS.mesh_secret_name,
                        help="Secret (in each meshed namespace) with mesh-hmac-key and redis-url")
    parser.add_argument("--sidecar-cpu", default=DEFAULTS.resources.cpu_request,
                        help="CPU request")
    parser.add_argument("--sidecar-memory", default=DEFAULTS.resources.memory_request,
                        help="memory request")
    parser.add_argument("--sidecar-cpu-limit", default=DEFAULTS.resources.cpu_limit)
    parser.add_argument("--sidecar-memory-limit", default=DEFAULTS.resources.memory_limit)
    parser.add_argument("--native-sidecar", action="store_true",
                        help="inject the proxy as a native sidecar (an init container with "
                             "restartPolicy: Always; Kubernetes 1.29+): up before the app's "
                             "containers start, stopped after they exit")
    parser.add_argument("--shutdown-delay", type=float, default=DEFAULT_SHUTDOWN_DELAY,
                        metavar="SECONDS",
                        help="without --native-sidecar: seconds the sidecar keeps serving after "
                             "its pod is told to stop, so the app's last calls go through (its "
                             "preStop hook; 0: none; default %(default)s)")
    parser.add_argument("--sidecar-log-format", default=DEFAULTS.sidecar_log_format,
                        choices=logs.FORMATS,
                        help="the injected sidecars' log lines: plain or json (one object a "
                             "line; default %(default)s)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY,
                        help="reject larger AdmissionReviews with 413 (default %(default)s)")
    logs.add_option(parser)
    parser.set_defaults(func=_run_server)

    sub = parser.add_subparsers(dest="injector_command", metavar="COMMAND")
    boot = sub.add_parser(
        "bootstrap-certs",
        help="make a self-signed CA and serving certificate for the webhook",
        description="Print the TLS Secret (and, with --manifest, that manifest with caBundle "
                    "set) as YAML for `kubectl apply -f -`; or, with --json-patch, the patch "
                    "for `kubectl patch mutatingwebhookconfiguration ... --type=json -p`.",
    )
    boot.add_argument("--service", default="equilibrium-injector")
    boot.add_argument("--namespace", default="equilibrium-system")
    boot.add_argument("--secret-name", default=certs.TLS_SECRET)
    boot.add_argument("--webhook-config", default=certs.WEBHOOK_CONFIGURATION,
                      help="MutatingWebhookConfiguration name (default %(default)s)")
    boot.add_argument("--days", type=int, default=825, help="validity (default %(default)s)")
    boot.add_argument("--extra-name", action="append", default=[],
                      help="extra DNS name or IP in the certificate (repeatable)")
    boot.add_argument("--out-dir", type=Path,
                      help="also write ca.crt, tls.crt and tls.key (0600) there")
    boot.add_argument("--manifest", type=Path,
                      help="YAML stream to print back with caBundle set (e.g. k8s/install.yaml)")
    boot.add_argument("--json-patch", type=int, metavar="N_WEBHOOKS",
                      help="print only a JSON patch setting caBundle on N webhooks")
    boot.set_defaults(func=_run_bootstrap)

    ctl = sub.add_parser(
        "controller",
        help="generate the mesh's secrets in the cluster and copy them to meshed namespaces",
        description="Create (only if absent) the Redis passwords, the mesh key and the "
                    "webhook certificate in --namespace, set the webhook's caBundle, then "
                    "give every namespace labelled equilibrium.io/injection=enabled (or "
                    "equilibrium.io/mesh=enabled) its equilibrium-mesh Secret and RoleBinding.",
    )
    ctl.add_argument("--namespace", default="equilibrium-system")
    ctl.add_argument("--service", default="equilibrium-injector",
                     help="the webhook's Service (the certificate's names)")
    ctl.add_argument("--webhook-config", default=certs.WEBHOOK_CONFIGURATION)
    ctl.add_argument("--tls-secret", default=certs.TLS_SECRET)
    ctl.add_argument("--redis-host", default=mesh_objects.DEFAULT_REDIS_HOST,
                     help="HOST:PORT of Redis in the generated URLs (default %(default)s)")
    ctl.add_argument("--extra-name", action="append", default=[],
                     help="extra DNS name or IP in the certificate (repeatable)")
    ctl.add_argument("--kube-api", help="API server URL (default: the in-cluster one)")
    ctl.add_argument("--kube-token-file", help="bearer token file (default: the pod's)")
    ctl.add_argument("--metrics", default=DEFAULT_CONTROLLER_METRICS, metavar="HOST:PORT",
                     help="serve GET /metrics (Prometheus) and /healthz there (default "
                          "%(default)s; port 0: any free one; 'off': none)")
    logs.add_option(ctl, inherited=True)
    ctl.set_defaults(func=_run_controller)


def _run_server(args: argparse.Namespace) -> int:
    if not args.tls_cert or not args.tls_key:
        print("equilibrium injector: --tls-cert and --tls-key are required (the API server "
              "only calls webhooks over HTTPS; see `equilibrium injector bootstrap-certs`)",
              file=sys.stderr)
        return 2
    if not 0 <= args.shutdown_delay <= MAX_SHUTDOWN_DELAY:
        print(f"equilibrium injector: --shutdown-delay must be between 0 and "
              f"{MAX_SHUTDOWN_DELAY:g} seconds", file=sys.stderr)
        return 2
    try:
        listen = parse_host_port(args.listen)  # HOST:PORT or [V6]:PORT; port 0: any free one
    except AddressError as exc:
        print(f"equilibrium injector: --listen: {exc}", file=sys.stderr)
        return 2
    config = InjectorConfig(
        image=args.sidecar_image,
        image_pull_policy=args.image_pull_policy,
        mesh_secret_name=args.mesh_secret,
        resources=Resources(cpu_request=args.sidecar_cpu, memory_request=args.sidecar_memory,
                            cpu_limit=args.sidecar_cpu_limit,
                            memory_limit=args.sidecar_memory_limit),
        native_sidecar=args.native_sidecar,
        shutdown_delay=args.shutdown_delay,
        sidecar_log_format=args.sidecar_log_format,
    )
    if not logs.start("equilibrium injector", logging.INFO, args.log_format,
                      plain=INJECTOR_LOG_LINE):
        return 2
    try:
        asyncio.run(serve(config, listen, args.tls_cert, args.tls_key,
                          max_body=args.max_body_bytes))
    except (OSError, ValueError) as exc:  # bad cert files, port in use
        logs.fatal(f"equilibrium injector: {exc}")
        return 1
    return 0


def _run_controller(args: argparse.Namespace) -> int:
    try:
        try:
            parse_host_port(args.redis_host)
        except AddressError as exc:
            raise ValueError(f"--redis-host: {exc}") from None
        try:
            metrics_at = None if args.metrics == "off" else parse_host_port(args.metrics)
        except AddressError as exc:
            raise ValueError(f"--metrics: {exc}") from None
        credentials = Credentials.from_flags(args.kube_api, args.kube_token_file, os.environ)
    except ValueError as exc:
        print(f"equilibrium injector controller: {exc}", file=sys.stderr)
        return 2
    config = ControllerConfig(namespace=args.namespace, service=args.service,
                              webhook_config=args.webhook_config, tls_secret=args.tls_secret,
                              redis_host=args.redis_host, extra_names=tuple(args.extra_name))
    if not logs.start("equilibrium injector", logging.INFO, args.log_format,
                      plain=INJECTOR_LOG_LINE):
        return 2

    async def main() -> None:
        metrics = ControllerMetrics()
        runner = None if metrics_at is None else await start_metrics(metrics, metrics_at)
        try:
            async with KubeRest(credentials) as api:
                await Controller(api, config, secrets.token_hex,
                                 lambda: dt.datetime.now(dt.UTC), random.Random(),
                                 metrics).run()
        finally:
            if runner is not None:
                await runner.cleanup()

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(main())
    except OSError as exc:  # the metrics port is taken
        logs.fatal(f"equilibrium injector controller: --metrics {args.metrics}: {exc}")
        return 1
    return 0


def _run_bootstrap(args: argparse.Namespace) -> int:
    bundle = certs.bootstrap(args.service, args.namespace, dt.datetime.now(dt.UTC),
                             days=args.days, extra_names=tuple(args.extra_name))
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "ca.crt").write_bytes(bundle.ca_pem)
        (args.out_dir / "tls.crt").write_bytes(bundle.cert_pem)
        key_path = args.out_dir / "tls.key"
        key_path.touch(mode=0o600)
        os.chmod(key_path, 0o600)
        key_path.write_bytes(bundle.key_pem)
    if args.json_patch is not None:
        print(json.dumps(certs.ca_bundle_json_patch(bundle.ca_bundle, args.json_patch)))
        return 0
    documents: list[Any] = []
    if args.manifest:
        try:
            documents = [d for d in yaml.safe_load_all(args.manifest.read_text()) if d]
            certs.set_ca_bundle(documents, bundle.ca_bundle, args.webhook_config)
        except (OSError, yaml.YAMLError, LookupError) as exc:
            print(f"equilibrium injector bootstrap-certs: {args.manifest}: {exc}",
                  file=sys.stderr)
            return 1
    documents.append(certs.tls_secret(bundle, args.namespace, args.secret_name))
    sys.stdout.write(yaml.safe_dump_all(documents, sort_keys=False))
    return 0
