"""Shared helpers for projector tests: a workload through the real command handlers,
relaying, draining the real worker, and snapshots of the namespace's view keys."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime

from cqrs.app.drain import drain_all
from cqrs.commands.db import make_session_factory
from cqrs.commands.handlers import execute
from cqrs.commands.results import CommandResult
from cqrs.events import EventEnvelope
from cqrs.projector.projection import Projection
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.state import live_generation, read_state
from cqrs.projector.verify import verify
from cqrs.projector.worker import Worker
from cqrs.relay.outbox import Relay
from cqrs.wiring import Wiring


def run(wiring: Wiring, command: object) -> CommandResult:
    return execute(command, make_session_factory(wiring.engine))


def deploy_projections(wiring: Wiring) -> None:
    """Start the projector before any traffic: a worker first builds each projection's
    (empty) views from history, so everything after this flows through the consumer
    groups, the path redelivery concerns (not a rebuild from history)."""
    drain(wiring)
    for name in PROJECTIONS:
        state = read_state(wiring.redis, wiring.keys, name)
        assert state is not None, f"{name} was not built"


def relay_all(wiring: Wiring) -> int:
    return Relay(wiring.database_url, wiring.redis, wiring.settings).drain()


def drain(wiring: Wiring, projections: Iterable[Projection] | None = None) -> Worker:
    """Relay and project until caught up (the composition's one drain loop); the worker
    is returned for its stats."""
    worker = Worker(
        wiring.redis,
        wiring.settings,
        projections or PROJECTIONS.values(),
        database_url=wiring.database_url,
    )
    drain_all(wiring, worker=worker)
    return worker


@contextlib.contextmanager
def worker_in_thread(wiring: Wiring) -> Iterator[Worker]:
    """A worker with every projection running in a thread for the block (the live
    projector of the query-side tests), stopped gracefully at its end."""
    stop = threading.Event()
    worker = Worker(
        wiring.redis, wiring.settings, PROJECTIONS.values(), database_url=wiring.database_url
    )
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        stop.set()
        thread.join(timeout=15)


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


def product_created(product_id: uuid.UUID, name: str, version: int = 1) -> dict[str, str]:
    """Stream fields of a well-formed ProductCreated (or, past version 1, ProductRenamed)."""
    return EventEnvelope(
        event_id=uuid.uuid4(),
        event_type="ProductCreated" if version == 1 else "ProductRenamed",
        aggregate_type="product",
        aggregate_id=product_id,
        version=version,
        partition_key=product_id,
        occurred_at=datetime.now(UTC),
        payload=(
            {"sku": f"S-{product_id.hex[:8]}", "name": name, "price": "1.00", "stock": 1}
            if version == 1
            else {"name": name}
        ),
    ).to_stream_fields()


def malformed() -> dict[str, str]:
    """A ProductCreated whose payload is not JSON: fails on every delivery."""
    return {**product_created(uuid.uuid4(), "x"), "payload": "{not json"}
