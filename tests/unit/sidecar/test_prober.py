"""sidecar.prober: which endpoints get a probe (and so this sidecar's identity)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from mesh.profiles import get_profile
from sidecar.membership import MeshMembership
from sidecar.metrics import ProberMetrics
from sidecar.prober import Prober, _authority
from sidecar.upstreams import UpstreamTable

KEY = b"prober-test-key-0123456789abcdef"


def test_only_endpoints_in_the_mesh_are_probed() -> None:
    table = UpstreamTable("equilibrium", get_profile("balanced"))
    table.apply({"static": ["http://127.0.0.1:1"], "payments": ["http://127.0.0.1:2"]}, 0.0)
    table.apply({"users.default.80": ["http://10.0.0.1:80"]}, 0.0, source="discovery")
    membership = MeshMembership(lambda name: name == "payments")  # declared mesh: false
    prober = Prober(table, caller_id="caller-1", mesh_key=KEY,
                    metrics=ProberMetrics(CollectorRegistry()), membership=membership)
    assert prober._in_mesh("http://127.0.0.1:1", ["static"])
    assert not prober._in_mesh("http://127.0.0.1:2", ["payments"])
    assert not prober._in_mesh("http://10.0.0.1:80", ["users.default.80"])  # not proven yet
    membership.prove("http://10.0.0.1:80")  # it answered a request with signed signals
    assert prober._in_mesh("http://10.0.0.1:80", ["users.default.80"])


def test_a_probe_is_sent_with_the_host_its_identity_is_bound_to() -> None:
    assert _authority("http://127.0.0.1:8080") == "127.0.0.1:8080"
    assert _authority("http://[::1]:9000/") == "[::1]:9000"
    assert _authority("http://pod-1") == "pod-1"
