"""A slot migrating between masters while the packed round trips run (what `redis-cli
--cluster reshard` does, step by step): a key already moved answers ASK (the command is
resent with ASKING on the importing master), a key not yet moved answers on the old
master, and once the slot is handed over every master answers MOVED until the slot map is
read again. `round_trip` (sync: relay, workers, CLI queries) and `cluster_round_trip_async`
(`cqrs serve`) both return the right replies in the commands' order through all of it.
The slot goes back to its first master at the end, so later tests see the layout the
fixture made."""

from __future__ import annotations

import asyncio
from typing import Any

import redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from cqrs.redisio import cluster_round_trip_async, round_trip, slot_of
from cqrs.wiring import Wiring, cluster_url


def _node(client: Any, port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, decode_responses=True)


def _set_slot(masters: list[redis.Redis], slot: int, owner_id: str) -> None:
    for master in masters:
        master.execute_command("CLUSTER", "SETSLOT", slot, "NODE", owner_id)


def _reads(keys: list[str]) -> list[tuple[Any, ...]]:
    return [("HGET", key, "n") for key in keys]


async def _async_reads(url: str, keys: list[str]) -> list[Any]:
    client = AsyncRedisCluster.from_url(cluster_url(url), decode_responses=True)
    try:
        return await cluster_round_trip_async(client, _reads(keys))
    finally:
        await client.aclose()


def test_round_trips_follow_a_slot_through_its_migration(cluster_wiring: Wiring) -> None:
    w = cluster_wiring
    client = w.redis
    ns = w.keys.ns
    moving = [f"{ns}:mig:{{m}}:{i}" for i in range(6)]  # one slot, one hash tag
    elsewhere = [f"{ns}:mig:{{e{i}}}" for i in range(12)]  # spread over the masters
    every = moving + elsewhere
    expected = [str(i) for i in range(len(every))]
    assert round_trip(client, [("HSET", k, "n", i) for i, k in enumerate(every)]) == [1] * len(
        every
    )
    slot = slot_of(moving[0])
    source = client.nodes_manager.get_node_from_slot(slot)
    target = next(n for n in client.get_primaries() if n.name != source.name)
    src, dst = _node(client, source.port), _node(client, target.port)
    masters = [_node(client, n.port) for n in client.get_primaries()]
    src_id, dst_id = (c.execute_command("CLUSTER", "MYID") for c in (src, dst))
    try:
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        # Half the slot's keys moved: those answer ASK on the source.
        src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *moving[:3])
        assert dst.execute_command("ASKING") and dst.hget(moving[0], "n") == "0"
        assert round_trip(client, _reads(every)) == expected
        assert asyncio.run(_async_reads(w.redis_url, every)) == expected
        # The rest moved and the slot handed over: the old master answers MOVED.
        src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *moving[3:])
        _set_slot(masters, slot, dst_id)
        assert round_trip(client, _reads(every)) == expected
        assert client.nodes_manager.get_node_from_slot(slot).name == target.name
        assert asyncio.run(_async_reads(w.redis_url, every)) == expected
        # Writes follow the new owner too.
        round_trip(client, [("HSET", k, "n", "x") for k in moving])
        assert dst.hget(moving[-1], "n") == "x"
    finally:
        # The slot's keys go, wherever the migration left them (ASKING lets the importing
        # master answer), then the slot returns to its first master.
        for c in (src, dst):
            for key in moving:
                pipe = c.pipeline(transaction=False)
                pipe.execute_command("ASKING")
                pipe.delete(key)
                pipe.execute(raise_on_error=False)
        for c in (src, dst):
            c.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
        _set_slot(masters, slot, src_id)
        for c in masters:
            c.close()
    assert round_trip(client, _reads(elsewhere)) == expected[len(moving) :]
