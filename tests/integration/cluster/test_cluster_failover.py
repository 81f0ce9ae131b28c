"""Failover mid-run: the master holding the most partition streams is SIGKILLed while
writers commit and `cqrs relay` + 2 `cqrs project` workers run. The cluster promotes its
replica; relay and workers carry on without a restart (connection errors -> slot-map
refresh -> back-off), and after a drain `cqrs verify` is clean and every order placed is
queryable. The killed node is started again afterwards and rejoins as a replica.

Needs the local cluster (it kills one of its processes): skipped on CQRS_TEST_CLUSTER_URL.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import text

from bench.workload import WorkloadReport, generate
from cqrs import cluster as local_cluster
from cqrs.queries.service import QueryService
from cqrs.redisio import slot_of
from cqrs.settings import Settings
from cqrs.wiring import Wiring
from tests.conftest import settings_env
from tests.integration.cluster.conftest import ClusterBackend
from tests.integration.cluster.procs import cli, cqrs, logs, wait_ready
from tests.integration.projector_support import deploy_projections

N_COMMANDS = 1500
KILL_AT = 0.3


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
        # Nobody restarted anything: the same processes are still running.
        for proc in procs:
            assert proc.poll() is None, f"{proc.args[3:]} exited with {proc.returncode}"
        wait_ready(cluster_wiring, ["w0", "w1"], workers)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(timeout=30) == 0, f"{proc.args[3:]} did not stop cleanly"
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{logs(tmp_path)}") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        halt.set()
        if not local_cluster._pid_alive(victim.pid):
            local_cluster.restart_node(cluster, victim)

    drained = cli(["run", "--drain"], env)
    assert drained.returncode == 0, drained.stdout + drained.stderr
    verified = cli(["verify", "--json"], env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["differences"] == 0, verified.stdout
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
