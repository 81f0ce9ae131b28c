"""Fixtures for the tests that need a Redis Cluster (3 masters + 3 replicas).

`CQRS_TEST_CLUSTER_URL` names a node of an existing cluster; unset, one local cluster is
started for the session (`cqrs.cluster`, on free loopback ports, stopped by PID at the end).
PostgreSQL comes from the suite's usual backend (tests/conftest.py).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from cqrs import cluster as local_cluster
from cqrs.settings import Settings
from cqrs.wiring import Wiring
from tests.conftest import truncate_write_side


@dataclass(frozen=True)
class ClusterBackend:
    url: str
    local: local_cluster.LocalCluster | None  # None: an external cluster (no failover tests)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterBackend]:
    url = os.environ.get("CQRS_TEST_CLUSTER_URL")
    if url:
        yield ClusterBackend(url, None)
        return
    home = tmp_path_factory.mktemp("cluster")
    started = local_cluster.start(home)
    try:
        yield ClusterBackend(started.url, started)
    finally:
        local_cluster.stop_cluster(started)


def delete_cluster_namespace(url: str, namespace: str) -> None:
    """Delete a namespace's keys on every master (SCAN is per node on a cluster)."""
    import redis.cluster

    client = redis.cluster.RedisCluster.from_url(url)
    try:
        for node in client.get_primaries():
            conn = client.get_redis_connection(node)
            keys = list(conn.scan_iter(match=f"{namespace}:*", count=1000))
            for key in keys:
                conn.unlink(key)
    finally:
        client.close()


@pytest.fixture
def cluster_settings(redis_cluster: ClusterBackend, database_url: str) -> Iterator[Settings]:
    """Like the suite's `settings`, on the cluster."""
    truncate_write_side(database_url)
    namespace = f"t{uuid.uuid4().hex[:12]}"
    yield Settings(
        database_url=database_url,
        redis_url=redis_cluster.url,
        namespace=namespace,
        relay_poll_seconds=0.2,
        replay_lock_ms=3000,
        replay_grace_seconds=0.2,
    )
    delete_cluster_namespace(redis_cluster.url, namespace)


@pytest.fixture
def cluster_wiring(cluster_settings: Settings) -> Iterator[Wiring]:
    w = Wiring(cluster_settings)
    yield w
    w.close()
