"""Facts about the partition streams that the relay and the projector must agree on."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from cqrs.keys import KeyMap

# `<ns>:meta` fields: the partition count, and the target count of a `cqrs repartition`
# that began to switch the streams and has not rebuilt every projection yet.
PARTITIONS = "partitions"
REPARTITION = "repartition"
# The most partitions CQRS_PARTITIONS and `cqrs repartition` accept.
MAX_PARTITIONS = 1024


def stream_partitions(client: redis.Redis, keys: KeyMap, default: int) -> int:
    """The partition count is fixed by the first process that touches the streams:
    changing it under running readers and writers would move aggregates between streams
    and break their order. Only `cqrs repartition` changes it, by replacing the streams
    (docs/scaling.md); long-running processes re-read it (the relay whenever it becomes
    the leader, workers with every status read)."""
    client.hsetnx(keys.meta(), PARTITIONS, default)
    return int(client.hget(keys.meta(), PARTITIONS) or default)


def stored_partitions(client: redis.Redis, keys: KeyMap) -> int | None:
    """The stored count, without storing one: None before any process touched the
    streams (or after Redis lost its data)."""
    value = client.hget(keys.meta(), PARTITIONS)
    return int(value) if value else None


def unfinished_repartition(client: redis.Redis, keys: KeyMap) -> int | None:
    """The target count of a `cqrs repartition` that was interrupted after it began to
    switch the streams (None: none). The namespace works meanwhile (workers rebuild the
    projections it left without views); running it again finishes the job."""
    value = client.hget(keys.meta(), REPARTITION)
    return int(value) if value else None


def parse_entry_id(entry_id: str | bytes) -> tuple[int, int]:
    """Stream entry ids compare as (milliseconds, sequence) pairs, not as strings."""
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass
class PartitionGroup:
    """One consumer group on one partition stream (or the stream alone, when the group
    does not exist there yet: then everything in the stream is lag)."""

    partition: int
    exists: bool  # the stream exists
    length: int = 0
    lag: int = 0  # entries not yet delivered to the group
    pending: int = 0  # delivered, not yet acknowledged
    has_group: bool = False
    last_delivered_id: str | None = None
    first_entry_id: str | None = None
    entries_added: int | None = None


def partition_groups(
    client: redis.Redis, keys: KeyMap, group: str, partitions: int
) -> list[PartitionGroup]:
    """`group` on every partition stream, in one pipelined round trip (plus one XRANGE per
    partition in the rare case the lag cannot be read or computed).

    XINFO GROUPS reports `lag` as nil after deletions or trims (redis/redis#13957); then
    it is computed from the stream's entries-added minus the group's entries-read, and
    when even that is unknown, by counting the entries after the last delivered id.
    """
    pipe = client.pipeline(transaction=False)
    for partition in range(partitions):
        pipe.xinfo_groups(keys.stream(partition))
        pipe.xinfo_stream(keys.stream(partition))
    results = pipe.execute(raise_on_error=False)
    found_all: list[PartitionGroup] = []
    for partition in range(partitions):
        groups, info = results[2 * partition], results[2 * partition + 1]
        if isinstance(groups, Exception) or isinstance(info, Exception):
            found_all.append(PartitionGroup(partition, exists=False))  # no stream yet
            continue
        first = info.get("first-entry")
        added = info.get("entries-added")
        row = PartitionGroup(
            partition,
            exists=True,
            length=int(info["length"]),
            first_entry_id=first[0] if first else None,
            entries_added=None if added is None else int(added),
        )
        found_all.append(row)
        found = next((g for g in groups if g["name"] == group), None)
        if found is None:
            row.lag = row.length
            continue
        row.has_group = True
        row.pending = int(found["pending"])
        row.last_delivered_id = found["last-delivered-id"]
        if found.get("lag") is not None:
            row.lag = int(found["lag"])
        elif found.get("entries-read") is not None and added is not None:
            row.lag = max(int(added) - int(found["entries-read"]), 0)
        else:
            after = f"({found['last-delivered-id']}"
            row.lag = len(client.xrange(keys.stream(partition), after, "+"))
    return found_all


def group_lag(client: redis.Redis, keys: KeyMap, group: str, partitions: int) -> dict[str, int]:
    """Entries of `group` not yet delivered ("lag") and delivered but unacknowledged
    ("pending"), summed over the partition streams (see `partition_groups`)."""
    rows = partition_groups(client, keys, group, partitions)
    return {"lag": sum(r.lag for r in rows), "pending": sum(r.pending for r in rows)}
