"""Shared helpers for projector tests: a workload through the real command handlers,
relaying, draining the real worker, and snapshots of the namespace's view keys."""

from __future__ import annotations

import threading
from collections.abc import Iterable

from commands.db import make_session_factory
from commands.handlers import execute
from commands.relay import Relay
from commands.results import CommandResult
from cqrs.wiring import Wiring
from projector.projection import Projection
from projector.registry import PROJECTIONS
from projector.state import live_generation
from projector.verify import verify
from projector.worker import Worker


def run(wiring: Wiring, command: object) -> CommandResult:
    return execute(command, make_session_factory(wiring.engine))


def relay_all(wiring: Wiring) -> int:
    return Relay(wiring.database_url, wiring.redis, wiring.settings).drain()


def drain(wiring: Wiring, projections: Iterable[Projection] | None = None) -> Worker:
    relay_all(wiring)
    worker = Worker(
        wiring.redis,
        wiring.settings,
        projections or PROJECTIONS.values(),
        database_url=wiring.database_url,
    )
    worker.run(threading.Event(), drain=True)
    return worker


def differences(wiring: Wiring) -> list:
    generations = {n: live_generation(wiring.redis, wiring.keys, n) for n in PROJECTIONS}
    return verify(wiring.database_url, wiring.redis, wiring.keys, generations)


def view_snapshot(wiring: Wiring) -> dict[str, object]:
    """Every view key of the namespace with its full content (streams and leases excluded)."""
    snapshot: dict[str, object] = {}
    for projection in PROJECTIONS:
        generation = live_generation(wiring.redis, wiring.keys, projection)
        pattern = wiring.keys.views(projection, generation).pattern()
        for key in wiring.redis.scan_iter(match=pattern, count=1000):
            kind = wiring.redis.type(key)
            if kind == "hash":
                snapshot[key] = wiring.redis.hgetall(key)
            elif kind == "zset":
                snapshot[key] = wiring.redis.zrange(key, 0, -1, withscores=True)
            elif kind == "set":
                snapshot[key] = sorted(wiring.redis.smembers(key))
    return snapshot
