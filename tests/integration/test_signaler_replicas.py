"""Two real signaler processes started with the same ``--id`` against a real Redis (issue 14,
finding 12): the second refuses to lead while the first holds the lease, says so in its log
and its metrics, and takes over only after the first is gone and its lease expired."""

from __future__ import annotations

import asyncio
import secrets
import signal
import time

from equilibrium.lab.processes import free_port
from tests.integration.procs import (
    LOOPBACK,
    EquilibriumProcess,
    async_start_sidecar,
    async_stop,
    dead_endpoint,
    http_get,
    start_equilibrium,
)
from tests.redis_fixture import RedisHandle
from tests.signaling_samples import signed
from tests.support import eventually, metric_value
from wire.keys import leader_key, recommendation_stream, summary_stream
from wire.summary import RegretSummary

EPS = ("http://127.0.0.1:9001", "http://127.0.0.1:9002")
UPSTREAM = "orders"


def summary(sent_at: float) -> RegretSummary:
    return RegretSummary(
        sidecar="sc-1", upstream=UPSTREAM, epoch=int(sent_at), sent_at=sent_at, endpoints=EPS,
        requests=(10, 10), failures=(0, 0), latency_mean=(0.01, 0.02), latency_p50=(0.01, 0.02),
        latency_p99=(0.02, 0.03), in_flight=(0, 0), demand=20.0, weights=(0.5, 0.5),
        regret=((0.0, -0.01), (0.01, 0.0)),
    )


def metric(admin: str, name: str, **labels: str) -> float:
    status, body = http_get(f"http://{admin}/metrics", timeout=2.0)
    return metric_value(body.decode(), name, **labels) if status == 200 else -1.0


async def test_a_second_replica_with_the_same_id_refuses_to_lead(
    redis_server: RedisHandle,
) -> None:
    key = secrets.token_hex(32)
    env = {"EQUILIBRIUM_MESH_SECRET": key}
    client = redis_server.client()
    admins = [f"{LOOPBACK}:{free_port()}" for _ in range(2)]

    def feed() -> None:
        client.xadd(summary_stream(UPSTREAM), signed(summary(time.time()), key.encode()))

    procs = []
    try:
        for admin in admins:
            feed()
            procs.append(start_equilibrium(
                "signaler", "--redis", redis_server.url, "--epoch", "0.25", "--id", "twin",
                "--admin", admin, "--upstream", UPSTREAM, "--lease-epochs", "4",
                env=env, ready_url=f"http://{admin}/readyz", timeout=60))
            if len(procs) == 1:
                await eventually(lambda: metric(admins[0], "equilibrium_signaler_leader",
                                                upstream=UPSTREAM) == 1,
                                 "the first replica leads", timeout=30, interval=0.2)
        first, second = procs
        holder = client.get(leader_key(UPSTREAM)).decode().partition(" ")[0]
        for _ in range(8):  # two seconds of epochs: the first leads, the second never does
            feed()
            time.sleep(0.25)
            assert metric(admins[1], "equilibrium_signaler_leader", upstream=UPSTREAM) == 0
        assert metric(admins[0], "equilibrium_signaler_leader", upstream=UPSTREAM) == 1
        assert metric(admins[1], "equilibrium_signaler_id_conflicts") == 1
        assert metric(admins[0], "equilibrium_signaler_id_conflicts") == 0
        assert client.get(leader_key(UPSTREAM)).decode().partition(" ")[0] == holder
        assert holder.startswith("twin.")
        assert metric(admins[1], "equilibrium_signaler_recommendations_published_total",
                      upstream=UPSTREAM) == 0
        assert "same id" in second.output()
        published = client.xlen(recommendation_stream(UPSTREAM, "sc-1"))
        assert published > 0

        # The first one dies without handing over: after its lease expires the twin leads.
        first.send_signal(signal.SIGKILL)
        first.wait(10)

        def twin_leads() -> bool:
            feed()
            return metric(admins[1], "equilibrium_signaler_leader", upstream=UPSTREAM) == 1

        await eventually(twin_leads, "the twin takes over", timeout=30, interval=0.25,
                         context=second.output)
        assert metric(admins[1], "equilibrium_signaler_id_conflicts") == 0
    finally:
        for proc in procs:
            proc.stop()
            proc.cleanup()
        client.close()


async def test_sighup_is_logged_and_ignored_and_sigterm_hands_the_lease_over(
    redis_server: RedisHandle,
) -> None:
    # An operator's habit from the sidecar (SIGHUP reloads it) must not kill a signaler,
    # whose default action for SIGHUP would be to die holding its lease.
    key = secrets.token_hex(32)
    client = redis_server.client()
    admin = f"{LOOPBACK}:{free_port()}"
    client.xadd(summary_stream(UPSTREAM), signed(summary(time.time()), key.encode()))
    proc = start_equilibrium(
        "signaler", "--redis", redis_server.url, "--epoch", "0.25", "--id", "hup",
        "--admin", admin, "--upstream", UPSTREAM, env={"EQUILIBRIUM_MESH_SECRET": key},
        ready_url=f"http://{admin}/readyz", timeout=60)
    try:
        await eventually(lambda: metric(admin, "equilibrium_signaler_leader",
                                        upstream=UPSTREAM) == 1,
                         "it leads", timeout=30, interval=0.2)
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert proc.popen.poll() is None
        assert http_get(f"http://{admin}/readyz", timeout=2.0)[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        output = proc.output()
        assert "SIGHUP ignored" in output and "SIGTERM: releasing its leases" in output
        assert "hup: stopped" in output
        assert client.get(leader_key(UPSTREAM)) is None  # handed over, not left to expire
    finally:
        proc.stop()


async def test_two_sidecars_started_with_one_id_are_named_by_the_signaler(
    redis_server: RedisHandle,
) -> None:
    # A stranger's finding: two sidecars started with the same --id wrote one stream of
    # summaries and read one plan, and nothing said so. The signaler sees it (two summaries
    # of one epoch under one id, every epoch) and names the id in a gauge and its log.
    env = {"EQUILIBRIUM_MESH_SECRET": secrets.token_hex(32)}
    admin = f"{LOOPBACK}:{free_port()}"
    epoch = "0.25"
    endpoints = [dead_endpoint(), dead_endpoint()]
    procs: list[EquilibriumProcess] = []
    try:
        procs.append(await asyncio.to_thread(
            start_equilibrium, "signaler", "--redis", redis_server.url, "--epoch", epoch,
            "--id", "sig", "--admin", admin, "--upstream", UPSTREAM,
            env=env, ready_url=f"http://{admin}/readyz", timeout=60))
        sidecars = await asyncio.gather(*(
            async_start_sidecar({UPSTREAM: endpoints}, sidecar_id=name, env=env,
                                extra_args=["--redis", redis_server.url,
                                            "--signaling-epoch", epoch])
            for name in ("twin", "twin", "solo")))
        procs.extend(sidecars)
        signaler = procs[0]
        shared = "equilibrium_signaler_shared_sidecar_ids"
        await eventually(lambda: metric(admin, shared, upstream=UPSTREAM) == 1,
                         "the signaler names the shared id", timeout=30, interval=0.25,
                         context=signaler.output)
        await eventually(lambda: "the sidecar id(s) twin (" in signaler.output(),
                         "and logs it", timeout=10, interval=0.25, context=signaler.output)
        assert "solo" not in signaler.output()
        assert metric(admin, "equilibrium_signaler_sidecars", upstream=UPSTREAM) == 2
        # one twin goes: within the freshness window (5 epochs) nobody shares an id
        assert await async_stop(sidecars[1]) == 0
        await eventually(lambda: metric(admin, shared, upstream=UPSTREAM) == 0,
                         "the shared id is forgotten", timeout=30, interval=0.25,
                         context=signaler.output)
    finally:
        for proc in procs:
            await async_stop(proc)
