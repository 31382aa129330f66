"""Kubernetes endpoint discovery: Services and EndpointSlices watched through the API server.

From the wire to the routing table, one module per concern:

- :mod:`sidecar.discovery.model`: the pure model; API objects validated and turned into
  ``Routes`` (upstream groups ``NAME.NAMESPACE.PORT``, Host aliases, cluster IP:port
  destinations, port protocols).
- :mod:`sidecar.discovery.client`: credentials and the HTTP of lists and watches (aiohttp).
- :mod:`sidecar.discovery.watch`: ``ResourceWatch``, list + watch forever, resumed, relisted
  on 410 Gone, backed off after failures; discovery's metrics.
- :mod:`sidecar.discovery.table`: ``Discovery``, the watches plus the application of their
  routes to the sidecar's ``UpstreamTable``.

The names below are the package's public surface; import them from ``sidecar.discovery``.
"""

from mesh.backoff import Backoff
from sidecar.discovery.client import (
    LIST_PAGE_SIZE,
    MAX_LINE_BYTES,
    SERVICE_ACCOUNT_DIR,
    WATCH_TIMEOUT_S,
    ApiError,
    Gone,
    KubeClient,
    KubeCredentials,
    credentials_from_flags,
    read_namespace,
)
from sidecar.discovery.model import (
    DEFAULT_CLUSTER_DOMAIN,
    HTTP_APP_PROTOCOLS,
    OPAQUE_NAME_PREFIXES,
    SERVICE_NAME_LABEL,
    EndpointSliceInfo,
    MalformedObject,
    Routes,
    ServiceInfo,
    ServicePort,
    SliceEndpoint,
    build_routes,
    endpoint_url,
    group_name,
    object_key,
    parse_endpoint_slice,
    parse_service,
    port_protocol,
    split_authority,
)
from sidecar.discovery.table import APPLY_SETTLE_S, Discovery, collection_path
from sidecar.discovery.watch import MIN_WATCH_S, ResourceWatch

__all__ = [
    "APPLY_SETTLE_S",
    "DEFAULT_CLUSTER_DOMAIN",
    "HTTP_APP_PROTOCOLS",
    "LIST_PAGE_SIZE",
    "MAX_LINE_BYTES",
    "MIN_WATCH_S",
    "OPAQUE_NAME_PREFIXES",
    "SERVICE_ACCOUNT_DIR",
    "SERVICE_NAME_LABEL",
    "WATCH_TIMEOUT_S",
    "ApiError",
    "Backoff",
    "Discovery",
    "EndpointSliceInfo",
    "Gone",
    "KubeClient",
    "KubeCredentials",
    "MalformedObject",
    "ResourceWatch",
    "Routes",
    "ServiceInfo",
    "ServicePort",
    "SliceEndpoint",
    "build_routes",
    "collection_path",
    "credentials_from_flags",
    "endpoint_url",
    "group_name",
    "object_key",
    "parse_endpoint_slice",
    "parse_service",
    "port_protocol",
    "read_namespace",
    "split_authority",
]
