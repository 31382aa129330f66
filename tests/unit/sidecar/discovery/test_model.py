"""Discovery's pure parts: API object parsing, the routes built from them, the table they feed."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from mesh.profiles import get_profile
from sidecar.config import ConfigError, ConfigSource, SidecarConfig, parse_namespaces
from sidecar.discovery import (
    Backoff,
    EndpointSliceInfo,
    KubeCredentials,
    MalformedObject,
    ServiceInfo,
    build_routes,
    credentials_from_flags,
    parse_endpoint_slice,
    parse_service,
    port_protocol,
    split_authority,
)
from sidecar.transparent import sniff_http
from sidecar.upstreams import UpstreamTable
from tests.integration.kube_api import endpoint_slice, service
from wire.keys import summary_stream


def users_service(**spec: Any) -> dict[str, Any]:
    obj = service("users", "default", "10.96.0.10", [("http", 80), ("metrics", 9090)])
    obj["spec"].update(spec)
    return obj


def test_service_is_parsed_with_tcp_ports_and_cluster_ips() -> None:
    obj = users_service(clusterIPs=["10.96.0.10", "fd00::10"])
    obj["spec"]["ports"].append({"name": "dns", "port": 53, "protocol": "UDP"})
    obj["spec"]["ports"][1]["appProtocol"] = "https"
    info = parse_service(obj)
    assert info.cluster_ips == ("10.96.0.10", "fd00::10")
    assert [(p.name, p.port, p.scheme) for p in info.ports] == [
        ("http", 80, "http"), ("metrics", 9090, "https"),
    ]
    assert info.primary is not None and info.primary.port == 80


def test_headless_service_has_no_cluster_ip_and_primary_is_first_port() -> None:
    info = parse_service(service("db", "data", None, [("pg", 5432), ("admin", 8080)]))
    assert info.cluster_ips == ()
    assert info.primary is not None and info.primary.port == 5432


def test_external_name_services_route_nothing() -> None:
    obj = users_service(type="ExternalName", externalName="api.example.com")
    info = parse_service(obj)
    assert info.cluster_ips == () and info.ports == ()
    assert routes_for([obj], []).upstreams == {}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda o: o.pop("metadata"), "metadata"),
        (lambda o: o["metadata"].update(namespace=""), "namespace"),
        (lambda o: o.pop("spec"), "no spec"),
        (lambda o: o["spec"].update(clusterIPs=["10.96.0.300"]), "not an IP"),
        (lambda o: o["spec"]["ports"][0].update(port="eighty"), "1..65535"),
        (lambda o: o["spec"]["ports"][0].update(port=70000), "1..65535"),
        (lambda o: o["spec"].update(ports={"http": 80}), "not a list"),
    ],
)
def test_malformed_services_are_rejected_with_a_reason(mutate: Any, message: str) -> None:
    obj = users_service()
    mutate(obj)
    with pytest.raises(MalformedObject, match=message):
        parse_service(obj)


def test_slice_conditions_follow_kubernetes_semantics() -> None:
    obj = endpoint_slice("users-1", "default", "users", [("http", 8080)],
                         ["10.0.0.1", "10.0.0.2", "10.0.0.3"], not_ready=("10.0.0.2",))
    del obj["endpoints"][2]["conditions"]  # unknown readiness counts as ready
    obj["endpoints"][1]["conditions"]["serving"] = True
    info = parse_endpoint_slice(obj)
    assert info is not None
    assert [(e.address, e.ready, e.serving) for e in info.endpoints] == [
        ("10.0.0.1", True, True), ("10.0.0.2", False, True), ("10.0.0.3", True, True),
    ]
    assert dict(info.ports) == {"http": 8080}


def test_slices_without_a_service_or_with_fqdn_addresses_route_nothing() -> None:
    orphan = endpoint_slice("x", "default", "users", [("http", 80)], ["10.0.0.1"])
    del orphan["metadata"]["labels"]
    assert parse_endpoint_slice(orphan) is None
    fqdn = endpoint_slice("y", "default", "users", [("http", 80)], ["10.0.0.1"])
    fqdn["addressType"] = "FQDN"
    assert parse_endpoint_slice(fqdn) is None


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda o: o.update(addressType="IPv5"), "addressType"),
        (lambda o: o["endpoints"][0].update(addresses="10.0.0.1"), "addresses"),
        (lambda o: o["endpoints"][0].update(addresses=["ten"]), "not an IP"),
        (lambda o: o["ports"][0].update(port=0), "1..65535"),
        (lambda o: o["metadata"].update(labels=["a"]), "labels"),
    ],
)
def test_malformed_slices_are_rejected_with_a_reason(mutate: Any, message: str) -> None:
    obj = endpoint_slice("users-1", "default", "users", [("http", 8080)], ["10.0.0.1"])
    mutate(obj)
    with pytest.raises(MalformedObject, match=message):
        parse_endpoint_slice(obj)


def routes_for(services: list[dict[str, Any]], slices: list[dict[str, Any]],
               own_namespace: str | None = "default") -> Any:
    parsed_services: list[ServiceInfo] = [parse_service(s) for s in services]
    parsed_slices: list[EndpointSliceInfo] = [
        s for s in (parse_endpoint_slice(obj) for obj in slices) if s is not None
    ]
    return build_routes(parsed_services, parsed_slices, own_namespace=own_namespace)


def test_routes_group_each_service_port_and_merge_slices_by_port_name() -> None:
    routes = routes_for(
        [users_service()],
        [
            endpoint_slice("users-a", "default", "users", [("http", 8080), ("metrics", 9100)],
                           ["10.0.0.1", "10.0.0.2"]),
            endpoint_slice("users-b", "default", "users", [("http", 8081)], ["10.0.0.3"]),
        ],
    )
    assert routes.upstreams == {
        "users.default.80": ("http://10.0.0.1:8080", "http://10.0.0.2:8080",
                             "http://10.0.0.3:8081"),
        "users.default.9090": ("http://10.0.0.1:9100", "http://10.0.0.2:9100"),
    }
    assert routes.destinations == {
        ("10.96.0.10", 80): "users.default.80", ("10.96.0.10", 9090): "users.default.9090",
    }
    for alias in ("users", "users.default", "users.default.svc",
                  "users.default.svc.cluster.local", "10.96.0.10"):
        assert routes.aliases[alias] == "users.default.80"


def test_group_names_are_valid_signaling_upstream_names() -> None:
    routes = routes_for([users_service()], [])
    for group in routes.upstreams:
        assert summary_stream(group) == f"eq:{{{group}}}:summaries"  # raises if invalid


def test_authorities_name_each_port_of_a_service() -> None:
    routes = routes_for([users_service()], [])
    assert routes.authorities[("users", 9090)] == "users.default.9090"
    assert routes.authorities[("users", 80)] == "users.default.80"
    assert routes.authorities[("users.default.svc.cluster.local", 9090)] == "users.default.9090"
    assert routes.authorities[("10.96.0.10", 9090)] == "users.default.9090"
    assert ("users", 8080) not in routes.authorities


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("users", ("users", 80)),
        ("Users.Default.:9090", ("users.default", 9090)),
        ("10.96.0.10:81", ("10.96.0.10", 81)),
        ("[fd00::1]:8080", ("fd00::1", 8080)),
        ("[fd00::1]", ("fd00::1", 80)),
        ("users:http", ("", 0)),
        ("users:99999", ("", 0)),
    ],
)
def test_split_authority(authority: str, expected: tuple[str, int]) -> None:
    assert split_authority(authority) == expected


def test_short_names_resolve_only_in_the_sidecars_own_namespace() -> None:
    routes = routes_for([users_service()], [], own_namespace="shop")
    assert "users" not in routes.aliases
    assert routes.aliases["users.default"] == "users.default.80"
    assert routes.upstreams["users.default.80"] == ()  # known service, no endpoint yet


def test_terminating_endpoints_serve_only_when_none_is_ready() -> None:
    slices = [endpoint_slice("users-a", "default", "users", [("http", 8080)],
                             ["10.0.0.1", "10.0.0.2"], not_ready=("10.0.0.2",))]
    assert routes_for([users_service()], slices).upstreams["users.default.80"] == (
        "http://10.0.0.1:8080",
    )
    slices = [endpoint_slice("users-a", "default", "users", [("http", 8080)],
                             ["10.0.0.1", "10.0.0.2"], not_ready=("10.0.0.1", "10.0.0.2"))]
    assert routes_for([users_service()], slices).upstreams["users.default.80"] == (
        "http://10.0.0.1:8080", "http://10.0.0.2:8080",
    )


def test_ipv6_endpoints_are_bracketed_and_other_services_slices_ignored() -> None:
    v6 = endpoint_slice("users-6", "default", "users", [("http", 8080)], [])
    v6["addressType"] = "IPv6"
    v6["endpoints"] = [{"addresses": ["fd00::5"], "conditions": {"ready": True}}]
    other = endpoint_slice("orders-a", "default", "orders", [("http", 8080)], ["10.0.0.9"])
    routes = routes_for([users_service()], [v6, other])
    assert routes.upstreams["users.default.80"] == ("http://[fd00::5]:8080",)


def table() -> UpstreamTable:
    return UpstreamTable("equilibrium", get_profile("balanced"))


def test_discovery_and_config_groups_coexist_and_config_wins_a_shared_name() -> None:
    t = table()
    t.apply({"static": ["http://127.0.0.1:1"]}, 0.0)
    t.apply({"users.default.80": ["http://10.0.0.1:80"], "static": ["http://10.0.0.9:80"]},
            0.0, source="discovery")
    t.set_aliases({"users": "users.default.80"})
    assert t.names() == ["static", "users.default.80"]
    static = t.get("static")
    assert static is not None and static.endpoints == ("http://127.0.0.1:1",)
    users = t.get("users")
    assert users is not None and users.name == "users.default.80"

    # A config reload keeps discovery's groups; a discovery update keeps config's.
    t.apply({"static": ["http://127.0.0.1:2"]}, 1.0)
    assert t.get("users") is users
    added, removed = t.apply({}, 2.0, source="discovery")
    assert added == set() and removed == {"users.default.80"} and t.get("users") is None
    assert t.names() == ["static"]


def test_endpoint_updates_keep_the_group_and_learned_state_of_staying_endpoints() -> None:
    t = table()
    t.apply({"users.default.80": ["http://10.0.0.1:80", "http://10.0.0.2:80"]}, 0.0,
            source="discovery")
    group = t.get("users.default.80")
    assert group is not None
    policy = group.policy
    t.apply({"users.default.80": ["http://10.0.0.2:80", "http://10.0.0.3:80"]}, 1.0,
            source="discovery")
    same = t.get("users.default.80")
    assert same is group and same.policy is policy  # a request holding it keeps working
    assert same.endpoints == ("http://10.0.0.2:80", "http://10.0.0.3:80")


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    backoff = Backoff(random.Random(7), base=0.2, cap=5.0)
    waits = [backoff.next() for _ in range(12)]
    for n, wait in enumerate(waits):
        ceiling = min(5.0, 0.2 * 2**n)
        assert ceiling / 2 <= wait <= ceiling
    backoff.reset()
    assert backoff.next() <= 0.2


def test_in_cluster_credentials_come_from_the_service_account(tmp_path: Path) -> None:
    (tmp_path / "namespace").write_text("shop\n")
    creds = KubeCredentials.in_cluster(
        {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"}, tmp_path
    )
    assert creds.api_url == "https://[fd00::1]:6443"
    assert creds.token_file == tmp_path / "token" and creds.ca_file == tmp_path / "ca.crt"
    assert creds.namespace == "shop"
    with pytest.raises(ValueError, match="KUBERNETES_SERVICE_HOST"):
        KubeCredentials.in_cluster({}, tmp_path)


def test_explicit_api_url_must_be_http(tmp_path: Path) -> None:
    creds = credentials_from_flags("http://127.0.0.1:1", None, {"POD_NAMESPACE": "ns1"})
    assert creds.api_url == "http://127.0.0.1:1" and creds.namespace == "ns1"
    with pytest.raises(ValueError, match="http"):
        credentials_from_flags("127.0.0.1:1", None, {})


def kube_config(flags: dict[str, Any], env: dict[str, str]) -> SidecarConfig:
    """The config the command line builds from these Kubernetes flags and environment."""
    return ConfigSource.from_sources(flags, env=env).load()


def test_kube_flags_and_environment(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t")
    off = kube_config({}, {})
    assert not off.transparent and off.discovery is None
    on = kube_config({}, {
        "EQUILIBRIUM_TRANSPARENT": "1", "EQUILIBRIUM_DISCOVERY": "true",
        "EQUILIBRIUM_KUBE_API": "http://127.0.0.1:1", "EQUILIBRIUM_KUBE_TOKEN_FILE": str(token),
    })
    assert on.transparent and on.discovery is not None
    assert on.discovery.credentials.token_file == token
    assert on.discovery.namespaces is None  # the pod's namespace is unknown here: cluster-wide
    scoped = kube_config({"discovery": True, "kube_api": "http://127.0.0.1:1"},
                         {"POD_NAMESPACE": "shop"})
    assert scoped.discovery is not None
    assert scoped.discovery.namespaces == ("shop",)  # default: the pod's own namespace
    # a flag wins over the environment; a switch's variable off is off
    flagged = kube_config({"discovery": True, "kube_api": "http://127.0.0.1:1"},
                          {"EQUILIBRIUM_KUBE_API": "http://other:1",
                           "EQUILIBRIUM_TRANSPARENT": "no"})
    assert flagged.discovery is not None and not flagged.transparent
    assert flagged.discovery.credentials.api_url == "http://127.0.0.1:1"
    assert kube_config({"transparent": True}, {"EQUILIBRIUM_TRANSPARENT": "0"}).transparent


def test_discovery_namespaces() -> None:
    assert parse_namespaces("", "shop") == ("shop",)
    assert parse_namespaces("", None) is None
    assert parse_namespaces("*", "shop") is None
    assert parse_namespaces("a, b,a", "shop") == ("a", "b")
    with pytest.raises(ConfigError, match="not a namespace"):
        parse_namespaces("Bad_NS", None)


@pytest.mark.parametrize(
    ("kw", "env", "message"),
    [
        ({"kube_api": "http://127.0.0.1:1"}, {}, "need --discovery"),
        ({"discovery_namespaces": "*"}, {}, "need --discovery"),
        ({"discovery": True}, {}, "KUBERNETES_SERVICE_HOST"),
        ({"discovery": True, "kube_api": "ftp://x"}, {}, "http"),
        ({"discovery": True, "kube_api": "http://127.0.0.1:1",
          "kube_token_file": "/nonexistent/token"}, {}, "does not exist"),
    ],
)
def test_bad_kube_settings_are_config_errors(kw: dict[str, Any], env: dict[str, str],
                                             message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        kube_config(kw, env)


@pytest.mark.parametrize(
    ("port", "protocol"),
    [
        ({"name": "http"}, "http"),
        ({"name": "http-api"}, "http"),
        ({"name": "web", "appProtocol": "http"}, "http"),
        ({"name": "http", "appProtocol": "kubernetes.io/h2c"}, "opaque"),  # appProtocol wins
        ({"name": "ws", "appProtocol": "kubernetes.io/ws"}, "http"),
        ({"name": "tcp-db"}, "opaque"),
        ({"name": "grpc"}, "opaque"),
        ({"name": "https"}, "opaque"),
        ({"name": "redis"}, "opaque"),
        ({"name": "metrics"}, "unknown"),
        ({}, "unknown"),
    ],
)
def test_port_protocol_follows_app_protocol_then_the_name(
    port: dict[str, str], protocol: str
) -> None:
    assert port_protocol(port) == protocol


def test_routes_carry_each_groups_protocol() -> None:
    obj = service("users", "default", "10.96.0.10", [("http", 80), ("tcp-db", 5432), ("x", 81)])
    routes = routes_for([obj], [])
    assert routes.protocols == {"users.default.80": "http", "users.default.5432": "opaque",
                                "users.default.81": "unknown"}


@pytest.mark.parametrize(
    ("data", "verdict"),
    [
        (b"GET / HTTP/1.1\r\n", True),
        (b"OPTIONS ", True),
        (b"DELETE /x", True),
        (b"G", None),
        (b"OPTIO", None),
        (b"GETX", False),
        (b"PRI * HTTP/2.0", False),  # HTTP/2 prior knowledge: not for the HTTP/1.1 proxy
        (b"\x16\x03\x01\x02\x00", False),  # TLS ClientHello
        (b"get / HTTP/1.1", False),
    ],
)
def test_sniffing_recognises_http1_request_lines(data: bytes, verdict: bool | None) -> None:
    assert sniff_http(data) is verdict
