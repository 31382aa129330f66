"""sidecar.discovery.model: API object parsing, the routes built from them, their groups' names
and protocols."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.discovery import (
    EndpointSliceInfo,
    MalformedObject,
    ServiceInfo,
    build_routes,
    parse_endpoint_slice,
    parse_service,
    port_protocol,
    split_authority,
)
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


@pytest.mark.parametrize(
    ("port", "protocol"),
    [
        ({"name": "http"}, "http"),
        ({"name": "http-api"}, "http"),
        ({"name": "web", "appProtocol": "http"}, "http"),
        ({"name": "http", "appProtocol": "kubernetes.io/h2c"}, "unknown"),  # appProtocol wins
        ({"name": "http", "appProtocol": "mongodb"}, "opaque"),
        ({"name": "api", "appProtocol": "grpc"}, "unknown"),  # sniffed: h2c is routed
        ({"name": "ws", "appProtocol": "kubernetes.io/ws"}, "http"),
        ({"name": "tcp-db"}, "opaque"),
        ({"name": "grpc"}, "unknown"),
        ({"name": "http2-api"}, "unknown"),
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


def test_a_services_long_paths_annotation_declares_its_groups_long_requests() -> None:
    obj = users_service()
    obj["metadata"]["annotations"] = {"equilibrium.io/long-paths": " /watch, /v1/poll ,"}
    info = parse_service(obj)
    assert (info.long_paths, info.bad_annotation) == (("/watch", "/v1/poll"), "")
    routes = routes_for([obj, service("orders", "default", "10.96.0.11", [("http", 80)])], [])
    assert routes.long_paths == {"users.default.80": ("/watch", "/v1/poll"),
                                 "users.default.9090": ("/watch", "/v1/poll")}


@pytest.mark.parametrize("value", ["watch", "/a b", 5, ",".join(f"/p{i}" for i in range(65))])
def test_a_bad_long_paths_annotation_costs_the_declaration_not_the_routes(value: Any) -> None:
    obj = users_service()
    obj["metadata"]["annotations"] = {"equilibrium.io/long-paths": value}
    info = parse_service(obj)
    assert info.long_paths == () and "equilibrium.io/long-paths" in info.bad_annotation
    routes = routes_for([obj], [])
    assert "users.default.80" in routes.upstreams and routes.long_paths == {}
