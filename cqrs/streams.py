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
