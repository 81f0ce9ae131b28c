"""Failover mid-run: the master holding the most partition streams is SIGKILLed while
writers commit and `cqrs relay` + `cqrs project` workers run. The cluster promotes its
replica; relay and workers carry on without a restart (connection errors -> slot-map
refresh -> back-off), and after a drain `cqrs verify` is clean and every order placed is
queryable. The killed node is started again afterwards and rejoins as a replica.

Twice: with the replica in sync, and with the replica cut off first (it cannot
authenticate to resynchronise), so the dead master takes acknowledged writes with it
(stream entries, group offsets, view updates) and the repair paths run: the relay
re-publishes the lost entries from the log, the workers see the promoted replica's new
replication id and rebuild every projection from the log, and the dead letters the lost
updates caused are settled (docs/scaling.md, "Failover").

Needs the local cluster (it kills one of its processes): skipped on CQRS_TEST_CLUSTER_URL.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from sqlalchemy import text

from bench.workload import WorkloadReport, generate
from cqrs import cluster as local_cluster
from cqrs.projector.deadletters import list_dead_letters
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.state import live_generation
from cqrs.queries.service import QueryService
from cqrs.redisio import slot_of
from cqrs.settings import Settings
from cqrs.wiring import Wiring
from tests.conftest import settings_env
from tests.helpers import wait_until
from tests.integration.cluster.conftest import ClusterBackend
from tests.integration.cluster.procs import cli, cqrs, logs, wait_ready
from tests.integration.projector_support import deploy_projections

N_COMMANDS = 1500
KILL_AT = 0.3


def _replica_of(
    cluster: local_cluster.LocalCluster, master: local_cluster.Node
) -> local_cluster.Node:
    for node in cluster.alive():
        client = cluster.client(node.port)
        try:
            info = client.info("replication")
        finally:
            client.close()
        if info.get("role") == "slave" and int(info.get("master_port", 0)) == master.port:
            return node
    raise AssertionError(f"master {master.port} has no replica")


def _busiest_master(
    cluster: local_cluster.LocalCluster, wiring: Wiring
) -> tuple[local_cluster.Node, int]:
    owners = Counter(
        local_cluster.master_of_slot(cluster, slot_of(wiring.keys.stream(p))).port
        for p in range(wiring.settings.partitions)
    )
    port, streams = owners.most_common(1)[0]
    return cluster.node_by_port(port), streams


@pytest.mark.slow
def _still_running_then_stopped(
    wiring: Wiring,
    names: list[str],
    workers: list[subprocess.Popen[bytes]],
    procs: list[subprocess.Popen[bytes]],
) -> None:
    """Nobody restarted anything (the same processes still run, the workers heartbeat),
    and every one of them stops cleanly on SIGTERM."""
    for proc in procs:
        assert proc.poll() is None, f"{proc.args[3:]} exited with {proc.returncode}"
    wait_ready(wiring, names, workers)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        assert proc.wait(timeout=30) == 0, f"{proc.args[3:]} did not stop cleanly"


def _drain_and_verify(env: dict[str, str]) -> None:
    """What is left drains, and the views then equal what PostgreSQL says."""
    drained = cli(["run", "--drain"], env)
    assert drained.returncode == 0, drained.stdout + drained.stderr
    verified = cli(["verify", "--json"], env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["differences"] == 0, verified.stdout


def _kill_leftovers(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_a_master_dies_mid_run_and_the_pipeline_carries_on(
    redis_cluster: ClusterBackend,
    cluster_wiring: Wiring,
    cluster_settings: Settings,
    tmp_path: Path,
) -> None:
    if redis_cluster.local is None:
        pytest.skip("kills a node: needs the local cluster, not CQRS_TEST_CLUSTER_URL")
    cluster = redis_cluster.local
    env = {
        **settings_env(cluster_settings),
        "CQRS_PROJECTOR_LEASE_MS": "2000",
        "CQRS_PROJECTOR_BATCH_SIZE": "50",
    }
    deploy_projections(cluster_wiring)
    victim, streams = _busiest_master(cluster, cluster_wiring)
    report = WorkloadReport()
    halt = threading.Event()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(cqrs(["relay"], env, tmp_path / "relay.log"))
        workers = [
            cqrs(["project", "--consumer", f"w{i}"], env, tmp_path / f"w{i}.log") for i in range(2)
        ]
        procs += workers
        wait_ready(cluster_wiring, ["w0", "w1"], workers)
        with ThreadPoolExecutor(1) as pool:
            workload = pool.submit(
                generate, random.Random(7), cluster_wiring, N_COMMANDS, writers=2,
                report=report, stop=halt,
            )  # fmt: skip
            try:
                while not workload.done() and report.attempted < KILL_AT * N_COMMANDS:
                    time.sleep(0.01)
                assert not workload.done(), "the workload ended before the kill"
                killed_at = time.monotonic()
                local_cluster.stop_node(victim, kill=True)
                local_cluster.wait_failover(cluster, victim, timeout=30)
                promoted_after = time.monotonic() - killed_at
                done = workload.result()
            finally:
                halt.set()
        assert done.committed > 0.9 * N_COMMANDS, done.summary()
        _still_running_then_stopped(cluster_wiring, ["w0", "w1"], workers, procs)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{logs(tmp_path)}") from None
    finally:
        _kill_leftovers(procs)
        halt.set()
        if not local_cluster._pid_alive(victim.pid):
            local_cluster.restart_node(cluster, victim)

    _drain_and_verify(env)
    with cluster_wiring.engine.connect() as conn:
        order_ids = [row[0] for row in conn.execute(text("SELECT id FROM orders.orders"))]
    queries = QueryService(
        cluster_wiring.redis, cluster_wiring.keys, partitions=cluster_settings.partitions
    )
    assert order_ids
    for order_id in order_ids:
        queries.get_order(order_id)  # NotFound would fail the test
    local_cluster.wait_healthy(cluster, timeout=30)
    print(
        f"\n{done.summary()}; killed master {victim.port} holding {streams} streams; "
        f"replica promoted {promoted_after:.1f}s later; {len(order_ids)} orders queryable"
    )


LOSSY_BEFORE_CUT = 300  # commands committed before the replica is cut off
LOSSY_WHILE_CUT = 300  # then before the master is killed
LOSSY_AFTER = 300  # and after the replica is promoted


def _marks_on(
    cluster: local_cluster.LocalCluster,
    node: local_cluster.Node,
    wiring: Wiring,
    partitions: list[int],
) -> dict[int, int]:
    """The relay marks of these partitions as one node holds them (a replica too; -1 for
    none, or while the node cannot answer, e.g. loading its first full sync)."""
    cluster_client = cluster.client(node.port)
    found = dict.fromkeys(partitions, -1)
    try:
        cluster_client.execute_command("READONLY")
        count = wiring.settings.partitions
        for p in partitions:
            value = cluster_client.hget(wiring.keys.relay_mark(p), count)
            found[p] = -1 if value is None else int(value)
    except redis.RedisError:
        pass
    finally:
        cluster_client.close()
    return found


@pytest.mark.slow
def test_a_master_dies_with_writes_its_replica_never_got_and_they_are_repaired(
    redis_cluster: ClusterBackend,
    cluster_wiring: Wiring,
    cluster_settings: Settings,
    tmp_path: Path,
) -> None:
    if redis_cluster.local is None:
        pytest.skip("kills a node: needs the local cluster, not CQRS_TEST_CLUSTER_URL")
    cluster = redis_cluster.local
    wiring = cluster_wiring
    env = {
        **settings_env(cluster_settings),
        "CQRS_PROJECTOR_LEASE_MS": "2000",
        "CQRS_PROJECTOR_BATCH_SIZE": "50",
        "CQRS_RELAY_AUDIT_SECONDS": "1",
        "CQRS_PROJECTOR_FAILOVER_CHECK_SECONDS": "1",
    }
    deploy_projections(wiring)
    generations = {p: live_generation(wiring.redis, wiring.keys, p) for p in PROJECTIONS}
    victim, streams = _busiest_master(cluster, wiring)
    replica = _replica_of(cluster, victim)
    on_victim = [
        p
        for p in range(cluster_settings.partitions)
        if local_cluster.master_of_slot(cluster, slot_of(wiring.keys.stream(p))).port == victim.port
    ]
    report = WorkloadReport()
    halt = threading.Event()
    procs: list[subprocess.Popen[bytes]] = []
    names = ["w0", "w1", "w2"]
    replica_client = cluster.client(replica.port)
    try:
        procs.append(cqrs(["relay"], env, tmp_path / "relay.log"))
        workers = [cqrs(["project", "--consumer", n], env, tmp_path / f"{n}.log") for n in names]
        procs += workers
        wait_ready(wiring, names, workers)
        with ThreadPoolExecutor(1) as pool:
            workload = pool.submit(
                generate, random.Random(11), wiring, None, writers=2, report=report, stop=halt
            )
            try:
                # Every stream of the victim has a relay mark on the replica before the cut
                # (the replica may still be in its first full sync: the session's earlier
                # tests leave data behind), so what it lacks is a tail, the path that
                # re-publishes.
                wait_until(
                    lambda: (
                        workload.done()
                        or (
                            report.committed >= LOSSY_BEFORE_CUT
                            and min(_marks_on(cluster, replica, wiring, on_victim).values()) > 0
                        )
                    ),
                    timeout=60,
                    what="traffic on every stream of the victim, replicated",
                )
                assert not workload.done(), "the workload ended before the cut"
                replica_client.config_set("masterauth", "wrong-on-purpose")
                replica_client.config_set("cluster-replica-validity-factor", 0)
                victim_client = cluster.client(victim.port)
                try:
                    victim_client.execute_command("CLIENT", "KILL", "TYPE", "replica")
                    cut_at = report.committed
                    wait_until(
                        lambda: report.committed >= cut_at + LOSSY_WHILE_CUT,
                        timeout=60,
                        what="commits while the replica is cut off",
                    )
                    # Proof that the replica is behind: offsets, and relay marks (stream
                    # entries the master acknowledged and the replica never received).
                    master_offset = victim_client.info("replication")["master_repl_offset"]
                    replica_info = replica_client.info("replication")
                    lagging = master_offset - int(replica_info["slave_repl_offset"])
                    assert replica_info["master_link_status"] == "down"
                    assert lagging > 0
                    before = _marks_on(cluster, victim, wiring, on_victim)
                    behind = _marks_on(cluster, replica, wiring, on_victim)
                    assert any(behind[p] < before[p] for p in on_victim), (before, behind)
                finally:
                    victim_client.close()
                killed_at = time.monotonic()
                local_cluster.stop_node(victim, kill=True)
                local_cluster.wait_failover(cluster, victim, timeout=30)
                promoted_after = time.monotonic() - killed_at
                promoted_at = report.committed
                wait_until(
                    lambda: report.committed >= promoted_at + LOSSY_AFTER,
                    timeout=60,
                    what="commits after the promotion",
                )
            finally:
                halt.set()
            done = workload.result()

        # Repaired by the running processes, none restarted: the lost entries were
        # re-published, and every projection was rebuilt once the new id was seen (or
        # built from scratch, had its state been lost with the master).
        def repaired() -> bool:
            flags = [wiring.redis.exists(wiring.keys.repair(p)) for p in PROJECTIONS]
            rebuilt = [
                live_generation(wiring.redis, wiring.keys, p) > generations[p] for p in PROJECTIONS
            ]
            return not any(flags) and all(rebuilt)

        wait_until(repaired, timeout=120, interval=0.2, what="every projection repaired")
        republished = int(wiring.redis.hget(wiring.keys.meta(), "republished") or 0)
        assert republished > 0
        _still_running_then_stopped(wiring, names, workers, procs)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{logs(tmp_path)}") from None
    finally:
        _kill_leftovers(procs)
        halt.set()
        # The session's cluster, whole again: the promoted replica's settings back to
        # their defaults, the killed node back as its replica.
        with contextlib.suppress(redis.RedisError):
            replica_client.config_set("masterauth", "")
            replica_client.config_set("cluster-replica-validity-factor", 10)
        replica_client.close()
        if not local_cluster._pid_alive(victim.pid):
            local_cluster.restart_node(cluster, victim)

    _drain_and_verify(env)
    for name in PROJECTIONS:
        assert list_dead_letters(wiring.redis, wiring.keys, name) == [], name
    with wiring.engine.connect() as conn:
        order_ids = [row[0] for row in conn.execute(text("SELECT id FROM orders.orders"))]
    queries = QueryService(wiring.redis, wiring.keys, partitions=cluster_settings.partitions)
    assert order_ids
    for order_id in order_ids:
        queries.get_order(order_id)  # NotFound would fail the test
    local_cluster.wait_healthy(cluster, timeout=30)
    worker_logs = "".join(p.read_text() for p in tmp_path.glob("w*.log"))
    acked = sum(map(int, re.findall(r"(\d+) pending entries acknowledged", worker_logs)))
    settled = sum(map(int, re.findall(r"(\d+) of \d+ dead letter\(s\) now applied", worker_logs)))
    print(
        f"\n{done.summary()}; replica of master {victim.port} ({streams} streams) cut off "
        f"{lagging} bytes behind; promoted {promoted_after:.1f}s after the kill; "
        f"{republished} events re-published, {len(PROJECTIONS)} projections rebuilt, "
        f"{acked} pending entries acknowledged, {settled} dead letters settled; "
        f"{len(order_ids)} orders queryable"
    )
