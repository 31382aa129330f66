"""The simulator on several cores (:mod:`equilibrium.lab.simulate.windowed`): the same run as
the event engine, request for request, whatever the number of worker processes."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

from equilibrium.lab.simulate import sidecar as sim_sidecar
from equilibrium.lab.simulate.engine import Knobs, RunResult, simulate
from equilibrium.lab.simulate.scenarios import Sizes, build
from equilibrium.lab.simulate.windowed import (
    WorkerFailed,
    columns,
    merged,
    simulate_windowed,
)


def assert_same_run(serial: RunResult, windowed: RunResult) -> None:
    ours = merged([columns(serial.records)])
    theirs = windowed.records
    assert len(theirs) == len(ours) > 0
    assert theirs.intended == ours.intended
    assert theirs.latency == ours.latency
    assert theirs.pod == ours.pod
    assert theirs.ok == ours.ok
    assert theirs.sidecar == ours.sidecar
    assert (windowed.events, windowed.retries) == (serial.events, serial.retries)
    assert windowed.sidecars == serial.sidecars


CASES = [
    ("slow-pod", Sizes(4, 5, None, 12.0), Knobs()),  # pods without queues, one bad
    ("herding", Sizes(8, 4, None, 8.0), Knobs()),  # M/M/c pods served on arrival
    ("recovery", Sizes(6, 5, None, 12.0), Knobs()),  # a bad pod on events, then it heals
    ("churn", Sizes(9, 5, None, 12.0), Knobs(cohort=2)),  # pods and sidecars come and go
    ("herding", Sizes(6, 4, None, 6.0), Knobs(jitter=0.002, arrivals="poisson")),
    ("recovery", Sizes(4, 5, None, 8.0), Knobs(network=0.0005)),
    ("churn", Sizes(6, 4, None, 8.0, "constant"), Knobs()),  # ties to the instant
    # pods on events and pods answered as the attempt is sent, both drawing jitter
    ("recovery", Sizes(4, 5, None, 6.0), Knobs(jitter=0.002)),
    ("churn", Sizes(6, 4, None, 6.0), Knobs(jitter=0.002)),
    # a response and the next arrival of one client at the same instant (a review's finding)
    ("herding", Sizes(3, 4, 50.0, 2.0, "constant"), Knobs(network=0.03)),
    ("churn", Sizes(4, 4, 200.0, 2.0, "constant"), Knobs(network=0.01)),
]


@pytest.mark.parametrize(("scenario", "sizes", "knobs"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_two_workers_run_what_the_event_engine_runs(scenario: str, sizes: Sizes,
                                                    knobs: Knobs) -> None:
    setup = build(scenario, sizes)
    for policy in ("equilibrium", "peak-ewma"):
        assert_same_run(simulate(setup, policy, 3, knobs),
                        simulate_windowed(setup, policy, 3, knobs, workers=2))


def test_sidecars_joining_before_discovery_start_with_the_new_endpoint_set() -> None:
    """In the event engine a sidecar that joins after a pod joined, but before the others
    hear of it, starts with the new set: the windowed engine tells its workers both times."""
    churn = build("churn", Sizes(6, 4, None, 8.0))
    setup = replace(churn, changes=((1.0, "pod-leave", 0), (2.0, "pod-join", 4),
                                    (2.4, "sidecars-join", 3), (2.5, "sidecars-leave", 2)))
    serial = simulate(setup, "equilibrium", 5, Knobs())
    assert_same_run(serial, simulate_windowed(setup, "equilibrium", 5, Knobs(), workers=2))
    # the sidecars that joined between the pod's arrival and its discovery
    joined: dict[int, list[int]] = {i: [] for i in range(6, 9)}
    for sidecar, pod, intended in zip(serial.records.sidecar, serial.records.pod,
                                      serial.records.intended, strict=True):
        if sidecar in joined and intended < 2.0 + 1.0:  # before the others hear of it
            joined[sidecar].append(pod)
    assert any(4 in pods for pods in joined.values())  # they use the pod that joined


def test_the_timeline_and_the_pods_without_queues_as_the_event_engine_has_them() -> None:
    """Changes after the end are skipped, as the event engine skips them; a pod without a
    server limit that leaves, joins or heals is answered by events in both engines (a
    review's findings: each gave other records)."""
    churn = build("churn", Sizes(6, 4, None, 4.0))
    for changes, knobs in [
        (((1.0, "pod-leave", 0), (4.0005, "sidecars-leave", 3)), Knobs()),
        (((3.999, "pod-leave", 1),), Knobs(discovery_delay=0.0015)),
        (((1.0, "pod-leave", 0), (2.0, "pod-join", 4), (14.0, "pod-leave", 2)), Knobs()),
    ]:
        setup = replace(churn, changes=changes)
        assert_same_run(simulate(setup, "equilibrium", 1, knobs),
                        simulate_windowed(setup, "equilibrium", 1, knobs, workers=2))
    slow = build("slow-pod", Sizes(12, 5, None, 3.0))
    for changes, seed in [(((1.0003, "pod-leave", 0),), 1), (((1.0, "heal", 4),), 2)]:
        setup = replace(slow, changes=changes)
        assert_same_run(simulate(setup, "round-robin", seed, Knobs()),
                        simulate_windowed(setup, "round-robin", seed, Knobs(), workers=2))


def test_windows_of_many_attempts_do_not_fill_the_pipes_both_ways() -> None:
    """40 clients at 5,000 requests a second and a delay of 0.2 s: some 20,000 attempts a
    worker a window. The coordinator sending window k + 2 while a worker sends window k + 1
    deadlocked with both pipe buffers full (a review's finding)."""
    setup = build("slow-pod", Sizes(40, 5, 5000.0, 0.5))
    knobs = Knobs(network=0.2)
    assert_same_run(simulate(setup, "round-robin", 1, knobs),
                    simulate_windowed(setup, "round-robin", 1, knobs, workers=2))


def test_the_number_of_workers_changes_nothing_but_the_time() -> None:
    setup = build("churn", Sizes(7, 5, None, 10.0))
    one = simulate_windowed(setup, "equilibrium", 4, Knobs(), workers=1)
    three = simulate_windowed(setup, "equilibrium", 4, Knobs(), workers=3)
    assert one.records == three.records
    assert (one.events, one.retries, one.sidecars) == (three.events, three.retries,
                                                       three.sidecars)
    assert one.retries > 0  # the pod that left was tried, refused and retried elsewhere


def test_what_it_refuses_to_run() -> None:
    setup = build("herding", Sizes(2, 4, None, 2.0))
    with pytest.raises(ValueError, match="event engine only"):
        simulate_windowed(setup, "equilibrium-ce", 1, Knobs())
    with pytest.raises(ValueError, match="network delay above 0"):
        simulate_windowed(setup, "equilibrium", 1, Knobs(network=0.0))


def test_a_worker_that_fails_stops_the_run_with_its_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: object, now: float, tried: tuple[str, ...] = ()) -> str | None:
        raise RuntimeError("routing broke")

    monkeypatch.setattr(sim_sidecar.SimSidecar, "route", broken)  # inherited by the fork
    setup = build("herding", Sizes(2, 4, None, 2.0))
    with pytest.raises(WorkerFailed, match="RuntimeError: routing broke"):
        simulate_windowed(setup, "equilibrium", 1, Knobs(), workers=2)


def test_a_worker_that_dies_without_a_word_stops_the_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def killed(self: object, now: float, tried: tuple[str, ...] = ()) -> str | None:
        os._exit(9)  # as if killed: no message, no clean-up

    monkeypatch.setattr(sim_sidecar.SimSidecar, "route", killed)
    setup = build("herding", Sizes(2, 4, None, 2.0))
    with pytest.raises(WorkerFailed, match="exited without a word"):
        simulate_windowed(setup, "equilibrium", 1, Knobs(), workers=2)


def test_the_cli_prints_the_same_json_with_workers(capsys: pytest.CaptureFixture[str]) -> None:
    from equilibrium.cli import main

    base = ["simulate", "--scenario", "recovery", "--sidecars", "3", "--duration", "6",
            "--policies", "equilibrium,equilibrium-ce", "--json"]
    docs = []
    for workers in ("1", "2"):
        assert main([*base, "--workers", workers]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["wall"].pop("workers") == int(workers)
        doc.pop("wall")
        docs.append(doc)
    assert docs[0] == docs[1]
    assert docs[0]["policies"]["equilibrium-ce"]["signaler"]["published"] > 0
    assert main([*base, "--workers", "2", "--network", "0"]) == 2
    assert "--workers above 1 needs --network above 0" in capsys.readouterr().err
