"""What the repartition tests (one node and cluster) share: the CLI as a user runs it, and
the checks that the streams are exactly the new count's, each holding only its own
aggregates' events."""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

import redis

from cqrs.keys import KeyMap, partition_of
from cqrs.projector.registry import PROJECTIONS
from cqrs.redisio import is_cluster_client
from tests.helpers import run_cli


def repartition(env: dict[str, str], partitions: int, *args: str) -> dict[str, Any]:
    """`cqrs repartition N ARGS --yes --json`, which must succeed: its report."""
    result = run_cli("repartition", str(partitions), *args, "--yes", "--json", env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def stream_keys(client: redis.Redis, keys: KeyMap) -> dict[str, int | None]:
    """Every partition stream key of the namespace, with the port of the master holding
    it on a cluster (SCAN is per node there), None on one node."""
    found: dict[str, int | None] = {}
    if is_cluster_client(client):
        for node in client.get_primaries():
            conn = client.get_redis_connection(node)
            for key in conn.scan_iter(match=keys.stream_pattern(), count=1000):
                found[key.decode() if isinstance(key, bytes) else key] = node.port
        return found
    for key in client.scan_iter(match=keys.stream_pattern(), count=1000):
        found[key] = None
    return found


def assert_streams_are(client: redis.Redis, keys: KeyMap, partitions: int) -> None:
    """The stream keys are exactly `<ns>:stream:{pK}` for K < partitions, each with every
    projection's consumer group, and every entry sits in its aggregate's partition under
    that count (the relay published with the new count, nothing of the old set is left)."""
    assert client.hget(keys.meta(), "partitions") == str(partitions)
    assert set(stream_keys(client, keys)) == {keys.stream(k) for k in range(partitions)}
    for k in range(partitions):
        stream = keys.stream(k)
        groups = {g["name"] for g in client.xinfo_groups(stream)}
        assert groups == set(PROJECTIONS), (stream, groups)
        for _entry_id, fields in client.xrange(stream, "-", "+"):
            key = UUID(fields["partition_key"])
            assert partition_of(key, partitions) == k, (stream, fields["type"])
