"""The local cluster the cluster tests run on: formed, covered, one replica per master."""

from __future__ import annotations

import redis

from tests.integration.cluster.conftest import ClusterBackend


def test_cluster_is_formed_with_a_replica_per_master(redis_cluster: ClusterBackend) -> None:
    client = redis.Redis.from_url(redis_cluster.url, decode_responses=True)
    try:
        info = client.execute_command("CLUSTER", "INFO")
        assert "cluster_state:ok" in info
        assert "cluster_slots_assigned:16384" in info
        shards = client.execute_command("CLUSTER", "SHARDS")
    finally:
        client.close()
    assert len(shards) >= 3
    for shard in shards:
        roles = [node["role"] for node in shard["nodes"]]
        assert roles.count("master") == 1
        assert roles.count("replica") >= 1
