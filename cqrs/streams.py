"""Facts about the partition streams that the relay and the projector must agree on."""

from __future__ import annotations

import redis

from cqrs.keys import KeyMap


def stream_partitions(client: redis.Redis, keys: KeyMap, default: int) -> int:
    """The partition count is fixed by the first process that touches the streams:
    changing it later would move aggregates between streams and break their order."""
    client.hsetnx(keys.meta(), "partitions", default)
    return int(client.hget(keys.meta(), "partitions") or default)


def parse_entry_id(entry_id: str | bytes) -> tuple[int, int]:
    """Stream entry ids compare as (milliseconds, sequence) pairs, not as strings."""
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def group_lag(client: redis.Redis, keys: KeyMap, group: str, partitions: int) -> dict[str, int]:
    """Entries of `group` not yet delivered ("lag") and delivered but unacknowledged
    ("pending"), summed over the partition streams.

    XINFO GROUPS reports `lag` as nil after deletions or trims (redis/redis#13957); then
    it is computed from the stream's entries-added minus the group's entries-read, and
    when even that is unknown, by counting the entries after the last delivered id.
    """
    pipe = client.pipeline(transaction=False)
    for partition in range(partitions):
        pipe.xinfo_groups(keys.stream(partition))
        pipe.xinfo_stream(keys.stream(partition))
    results = pipe.execute(raise_on_error=False)
    lag = pending = 0
    for partition in range(partitions):
        groups, info = results[2 * partition], results[2 * partition + 1]
        if isinstance(groups, Exception) or isinstance(info, Exception):
            continue  # no stream yet
        found = next((g for g in groups if g["name"] == group), None)
        if found is None:
            lag += int(info["length"])
            continue
        pending += int(found["pending"])
        if found.get("lag") is not None:
            lag += int(found["lag"])
        elif found.get("entries-read") is not None and info.get("entries-added") is not None:
            lag += max(int(info["entries-added"]) - int(found["entries-read"]), 0)
        else:
            after = f"({found['last-delivered-id']}"
            lag += len(client.xrange(keys.stream(partition), after, "+"))
    return {"lag": lag, "pending": pending}
