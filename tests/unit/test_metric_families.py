"""Every metric family the sidecar (with every part on), the signaler and the injector export,
by name, type and labels, is the checked-in list below: a rename or a changed label fails here
first, and the list is what k8s/observability/ and the docs may rely on.

Change the list only together with k8s/observability/ (``generate.py``), docs/operations.md and
the dashboards of anyone who scrapes these names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from injector.metrics import ControllerMetrics, InjectorMetrics
from sidecar.config import DiscoverySettings, SidecarConfig, parse_listen
from sidecar.discovery import KubeCredentials
from sidecar.runner import SidecarRunner
from signaler.metrics import SignalerMetrics

KEY = b"metric-families-test-key-0123456789"

# name (as registered: counters without _total), type, labels
SIDECAR = """
equilibrium_caller_backoff counter upstream
equilibrium_caller_probation counter upstream
equilibrium_caller_bad_app_bids counter reason
equilibrium_caller_bad_signals counter header,reason
equilibrium_caller_punished gauge upstream
equilibrium_config_reloads counter result
equilibrium_converged gauge upstream
equilibrium_discovery_errors counter resource,kind
equilibrium_discovery_events counter resource,type
equilibrium_discovery_rejected_annotations counter -
equilibrium_discovery_rejected_objects counter resource
equilibrium_discovery_relists counter resource,reason
equilibrium_discovery_services gauge -
equilibrium_discovery_synced gauge resource
equilibrium_discovery_updates counter -
equilibrium_draining gauge -
equilibrium_errors counter upstream,reason
equilibrium_flapping gauge upstream
equilibrium_grpc_calls counter upstream,endpoint,grpc_status
equilibrium_h2_engine gauge engine,version
equilibrium_h2_flood_goaways counter kind
equilibrium_h2_oversized_header_blocks counter -
equilibrium_h2_refused_streams counter -
equilibrium_h2_streams_cancelled counter upstream
equilibrium_hedges counter upstream,result
equilibrium_http1_rejected_requests counter reason
equilibrium_in_flight gauge upstream
equilibrium_inbound_accept_errors counter -
equilibrium_inbound_app_checks counter result
equilibrium_inbound_app_duration_seconds histogram -
equilibrium_inbound_bad_bids counter reason
equilibrium_inbound_bad_headers counter header
equilibrium_inbound_demands counter result
equilibrium_inbound_caller_punishment_level gauge caller
equilibrium_inbound_caller_reputation gauge caller
equilibrium_inbound_capacity_estimate gauge -
equilibrium_inbound_clearing_price gauge -
equilibrium_inbound_concurrency_limit gauge -
equilibrium_inbound_congestion gauge -
equilibrium_inbound_connections counter protocol
equilibrium_inbound_connections_open gauge -
equilibrium_inbound_connections_rejected counter reason
equilibrium_inbound_identity counter result
equilibrium_inbound_h2_flood_goaways counter kind
equilibrium_inbound_h2_oversized_header_blocks counter -
equilibrium_inbound_h2_refused_streams counter -
equilibrium_inbound_http1_rejected_requests counter reason
equilibrium_inbound_in_flight gauge -
equilibrium_inbound_listener_timeouts counter phase
equilibrium_inbound_long_requests counter -
equilibrium_inbound_long_running gauge -
equilibrium_inbound_mesh_key_configured gauge -
equilibrium_inbound_price_paid counter caller
equilibrium_inbound_probes counter result
equilibrium_inbound_punished_callers gauge -
equilibrium_inbound_queue_length gauge -
equilibrium_inbound_queue_wait_seconds histogram -
equilibrium_inbound_requests counter caller,outcome
equilibrium_inbound_slow_uploads counter caller,outcome
equilibrium_inbound_stripped_headers counter source
equilibrium_inbound_voided_bids counter -
equilibrium_latency_estimate_seconds gauge upstream,endpoint
equilibrium_endpoint_ejections counter upstream,endpoint,reason
equilibrium_listener_timeouts counter phase
equilibrium_malformed_requests counter kind
equilibrium_nash_gap gauge upstream
equilibrium_outbound_connections counter protocol
equilibrium_outbound_connections_open gauge -
equilibrium_outbound_connections_rejected counter -
equilibrium_outbound_foreign_callers counter -
equilibrium_passthrough_bytes counter direction
equilibrium_passthrough_failures counter reason
equilibrium_passthrough_open gauge -
equilibrium_probe_duration_seconds histogram -
equilibrium_probes counter upstream,result
equilibrium_regret gauge upstream,endpoint
equilibrium_rejected_headers counter header,reason
equilibrium_request_duration_seconds histogram upstream,endpoint
equilibrium_requests counter upstream,endpoint,code
equilibrium_rescued counter upstream
equilibrium_retries counter upstream
equilibrium_retry_budget_exhausted counter upstream
equilibrium_route_weight gauge upstream,endpoint
equilibrium_signaling_connected gauge -
equilibrium_signaling_fallbacks counter -
equilibrium_signaling_following gauge upstream
equilibrium_signaling_unplanned gauge upstream
equilibrium_signaling_key_errors counter upstream,key
equilibrium_signaling_recommendations_accepted counter upstream
equilibrium_signaling_recommendations_rejected counter upstream,reason
equilibrium_signaling_redis_errors counter kind
equilibrium_signaling_summaries_invalid counter upstream,reason
equilibrium_signaling_summaries_published counter upstream
equilibrium_transparent_connections counter route
equilibrium_upstream_refused counter upstream,reason
equilibrium_websocket_oversized counter listener
"""

SIGNALER = """
equilibrium_signaler_ce_gap_seconds gauge upstream,source
equilibrium_signaler_consume_deferred counter upstream
equilibrium_signaler_entries_reclaimed counter upstream
equilibrium_signaler_entries_rejected counter upstream,reason
equilibrium_signaler_probes_rejected counter reason
equilibrium_signaler_streams_repaired counter -
equilibrium_signaler_epoch_errors counter kind
equilibrium_signaler_cpu_seconds counter phase
equilibrium_signaler_epochs counter -
equilibrium_signaler_fence gauge upstream
equilibrium_signaler_id_conflicts gauge -
equilibrium_signaler_shared_sidecar_ids gauge upstream
equilibrium_signaler_key_errors counter upstream,key
equilibrium_signaler_leader gauge upstream
equilibrium_signaler_lp_constraints gauge upstream
equilibrium_signaler_lp_tokens gauge upstream
equilibrium_signaler_lp_variables gauge upstream
equilibrium_signaler_objective gauge upstream
equilibrium_signaler_publish_fenced counter upstream
equilibrium_signaler_recommendations_published counter upstream
equilibrium_signaler_redis_errors counter kind
equilibrium_signaler_redis_up gauge -
equilibrium_signaler_solve_seconds histogram upstream
equilibrium_signaler_solver_failures counter upstream,error
equilibrium_signaler_sidecars gauge upstream
equilibrium_signaler_summaries_consumed counter upstream
equilibrium_signaler_upstreams gauge -
"""

INJECTOR = """
equilibrium_injector_reviews counter result
"""

CONTROLLER = """
equilibrium_controller_control_plane_ready gauge -
equilibrium_controller_errors counter loop
equilibrium_controller_managed_namespaces gauge -
equilibrium_controller_reconciles counter result
equilibrium_controller_rotations counter secret
"""


def families(registry: CollectorRegistry) -> set[str]:
    """``name type labels`` of every family in ``registry`` (labels ``-`` when none)."""
    out = set()
    for collector in registry._collector_to_names:  # the registered metric objects
        assert isinstance(collector, MetricWrapperBase), collector
        labels = ",".join(collector._labelnames) or "-"
        out.add(f"{collector._name} {collector._type} {labels}")
    return out


def listed(text: str) -> set[str]:
    return {line for line in text.strip().splitlines()}


def every_part_on() -> SidecarRunner:
    """A sidecar with inbound policing, signaling, discovery and interception configured
    (built, not started: nothing listens or connects)."""
    config = SidecarConfig(
        id="families", outbound=parse_listen(":0"), admin=parse_listen(":0"), upstreams={},
        inbound=parse_listen(":0"), app="http://127.0.0.1:9", redis="redis://127.0.0.1:1/0",
        transparent=True,
        discovery=DiscoverySettings(KubeCredentials("https://127.0.0.1:1", None)),
    )
    return SidecarRunner(None, config, mesh_key=KEY)  # type: ignore[arg-type]  # no reload


async def test_a_sidecar_with_every_part_on_exports_the_listed_families() -> None:
    runner = every_part_on()
    assert runner.inbound is not None and runner.signaling is not None
    assert runner.discovery is not None
    assert families(runner.metrics.registry) == listed(SIDECAR)


async def test_a_sidecar_with_no_optional_part_exports_only_the_outbound_families() -> None:
    config = SidecarConfig(id="plain", outbound=parse_listen(":0"), admin=parse_listen(":0"),
                           upstreams={})
    runner = SidecarRunner(None, config)  # type: ignore[arg-type]
    optional = ("equilibrium_inbound_", "equilibrium_signaling_", "equilibrium_discovery_",
                "equilibrium_passthrough_", "equilibrium_transparent_",
                "equilibrium_probe")  # probes run only with a mesh key
    assert families(runner.metrics.registry) == {
        line for line in listed(SIDECAR) if not line.startswith(optional)}


def test_the_signaler_and_the_injector_export_the_listed_families() -> None:
    assert families(SignalerMetrics().registry) == listed(SIGNALER)
    assert families(InjectorMetrics().registry) == listed(INJECTOR)
    assert families(ControllerMetrics().registry) == listed(CONTROLLER)
