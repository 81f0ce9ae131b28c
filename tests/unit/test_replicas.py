"""cqrs.replicas without I/O: reading a primary's replica list, the lag rule, and where a
request's keys go (the routing the integration tests prove against real servers)."""

from __future__ import annotations

from cqrs.replicas import Node, ReadNodes, Route, Shard, reported_replicas, unusable

INFO = """# Replication\r
role:master\r
connected_slaves:2\r
slave0:ip=10.0.0.7,port=6380,state=online,offset=4242,lag=0\r
slave1:ip=::1,port=6381,state=wait_bgsave,offset=0,lag=3\r
master_repl_offset:4242\r
"""


def test_a_primarys_list_of_replicas_raw_or_parsed() -> None:
    raw = reported_replicas(INFO)
    assert raw == {("10.0.0.7", 6380): ("online", 0), ("::1", 6381): ("wait_bgsave", 3)}
    parsed = {
        "role": "master",
        "slave0": {"ip": "10.0.0.7", "port": 6380, "state": "online", "offset": 1, "lag": 0},
    }
    assert reported_replicas(parsed) == {("10.0.0.7", 6380): ("online", 0)}
    assert reported_replicas("role:slave\r\n") == {}


def test_a_replica_serves_while_online_and_heard_from_lately() -> None:
    listed = reported_replicas(INFO)
    assert unusable(listed, "10.0.0.7", 6380, max_lag=2) is None
    assert "wait_bgsave" in str(unusable(listed, "::1", 6381, max_lag=2))
    lagging = {("h", 1): ("online", 3)}
    assert "3s ago (CQRS_REPLICA_MAX_LAG=2)" in str(unusable(lagging, "h", 1, max_lag=2))
    # The slot map's address differs from the one its primary sees: matched by port.
    assert unusable(listed, "replica-a.internal", 6380, max_lag=2) is None
    assert "does not list it" in str(unusable(listed, "h", 9999, max_lag=2))


def _nodes(replicas: int) -> tuple[ReadNodes, Shard]:
    nodes = ReadNodes(None, replicas=True, max_lag=2)
    replicas_of = [Node(f"r{i}", None, replica=True) for i in range(replicas)]
    shard = Shard(Node("primary", None), replicas_of)
    nodes.shards = {"primary": shard}
    return nodes, shard


def test_one_request_stays_on_one_replica_per_shard() -> None:
    nodes, shard = _nodes(2)
    first, second = Route(nodes), Route(nodes)
    picked = first.node_for("a")
    assert picked in shard.replicas and first.node_for("b") is picked
    assert second.node_for("a") is not picked  # the next request, the next replica
    assert first.node_for(None) is None  # keyless: the primary path
    nodes.failed(picked, "refused")
    assert first.node_for("a") is shard.primary  # never another, maybe older, replica


def test_a_guarded_read_goes_where_its_check_read() -> None:
    nodes, shard = _nodes(1)
    check = Route(nodes)
    replica = check.node_for("mark")
    check.served["mark"] = replica
    guarded = Route(nodes, pins=dict(check.served))
    assert guarded.node_for("mark") is replica
    assert guarded.node_for("index") is shard.primary  # not read by the check
    assert Route(nodes, primaries=True).node_for("mark") is shard.primary
    nodes.failed(replica, "gone")
    assert guarded.node_for("mark") is shard.primary
    no_replicas, only = _nodes(0)
    assert Route(no_replicas).node_for("mark") is only.primary
