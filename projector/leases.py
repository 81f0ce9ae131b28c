"""A worker's leases on its slots, and its heartbeat.

A slot (projection, partition stream) is processed by one worker at a time: the holder
of its lease, a key set with NX and a TTL and renewed while the worker lives (a script
renews or releases it only for its holder, so a worker that paused past the TTL cannot
take back a slot someone else holds now). Heartbeats (a sorted set per projection,
scored by time) tell workers how many of them share the slots, which sets each one's
fair share; `cqrs status` reads them too.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable
from typing import Any

import redis

from cqrs.keys import KeyMap
from cqrs.projector.scripts import Scripts

_TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


class Leases:
    def __init__(
        self, client: redis.Redis, keys: KeyMap, scripts: Scripts, consumer: str, lease_ms: int
    ) -> None:
        self.redis = client
        self.keys = keys
        self.scripts = scripts
        self.consumer = consumer
        self.lease_ms = lease_ms

    def beat_and_renew(self, projections: list[str], leases: list[str]) -> list[bool]:
        """Heartbeat for each projection (dropping heartbeats ten leases old) and renew
        each held lease, in one packed round trip (one per master on a cluster, scripts
        reloaded on NOSCRIPT); whether each lease is still ours."""
        now_ms = int(time.time() * 1000)
        commands: list[tuple[Any, ...]] = []
        for name in projections:
            key = self.keys.workers(name)
            commands.append(("ZADD", key, now_ms, self.consumer))
            commands.append(("ZREMRANGEBYSCORE", key, "-inf", now_ms - 10 * self.lease_ms))
        commands += [
            self.scripts.command("renew_lease", [lease], [self.consumer, self.lease_ms])
            for lease in leases
        ]
        results = self.scripts.run(commands)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return [bool(r) for r in results[2 * len(projections) :]]

    def fair_share(self, projections: Iterable[str], total: int) -> int:
        """Slots per live worker (a heartbeat within three leases), rounded up."""
        since_ms = int(time.time() * 1000) - 3 * self.lease_ms
        alive = max(
            (self.redis.zcount(self.keys.workers(name), since_ms, "+inf") for name in projections),
            default=0,
        )
        return math.ceil(total / max(alive, 1))

    def take(self, lease: str) -> bool:
        return bool(self.redis.set(lease, self.consumer, nx=True, px=self.lease_ms))

    def release(self, lease: str) -> None:
        self.scripts["release_lease"](keys=[lease], args=[self.consumer])

    def leave(self, projections: Iterable[str], leases: Iterable[str]) -> None:
        """On the way out: give every lease back and drop the heartbeats, so others take
        the slots at once instead of after the TTL. Best effort: Redis may be gone."""
        for lease in leases:
            with contextlib.suppress(*_TRANSIENT):
                self.release(lease)
        for name in projections:
            with contextlib.suppress(*_TRANSIENT):
                self.redis.zrem(self.keys.workers(name), self.consumer)
