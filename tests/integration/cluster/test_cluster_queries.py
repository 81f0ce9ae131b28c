"""The query side on a Redis Cluster: the async (HTTP server) reads, and read-your-writes
woken by sharded pub/sub (SPUBLISH/SSUBSCRIBE) from a live worker, sync and async."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from cqrs.commands.catalog import CreateProduct, RenameProduct
from cqrs.projector.registry import PROJECTIONS
from cqrs.queries.http import build_state
from cqrs.queries.service import QueryService
from cqrs.relay.outbox import Relay
from cqrs.wiring import Wiring
from tests.integration.projector_support import drain, run, worker_in_thread

# Read-your-writes must hold within the timeout it has on one node.
WAIT_SECONDS = 5.0


@pytest.fixture
def live(cluster_wiring: Wiring) -> Iterator[Wiring]:
    """Views built, then a relay pass per write and a worker running in a thread."""
    w = cluster_wiring
    run(w, CreateProduct(sku="S-0", name="First", price="1.00", stock=1))
    drain(w)
    with worker_in_thread(w):
        yield w


def _publish(w: Wiring) -> None:
    Relay(w.database_url, w.redis, w.settings).drain()


def test_read_your_writes_sync_on_the_cluster(live: Wiring) -> None:
    queries = QueryService(live.redis, live.keys, partitions=live.settings.partitions)
    for i in range(5):
        result = run(live, CreateProduct(sku=f"S-{i + 1}", name=f"P{i}", price="1.00", stock=1))
        _publish(live)
        started = time.monotonic()
        queries.wait_for(result.token, timeout=WAIT_SECONDS)
        assert time.monotonic() - started < WAIT_SECONDS
        assert queries.get_product(result.id).name == f"P{i}"


def test_http_readers_on_the_cluster(live: Wiring) -> None:
    async def scenario() -> None:
        state = build_state(live.settings)
        try:
            assert type(state.views.redis).__name__ == "RedisCluster"
            await state.views.ping()
            product = run(live, CreateProduct(sku="H-1", name="Async", price="3.00", stock=2))
            renamed = run(live, RenameProduct(product_id=product.id, name="Async 2"))
            _publish(live)
            await asyncio.wait_for(state.waiters.wait_for(renamed.token, WAIT_SECONDS), 10)
            view = await state.views.get_product(product.id)
            assert (view.name, view.version) == ("Async 2", 2)
            page = await state.views.list_products(sort="name", limit=10)
            assert [p.name for p in page.items] == sorted(p.name for p in page.items)
        finally:
            await state.aclose()

    asyncio.run(scenario())


def test_the_worker_health_probe_on_the_cluster(live: Wiring) -> None:
    import socket

    from cqrs.health import worker_healthy

    names = list(PROJECTIONS)
    deadline = time.monotonic() + 10
    while True:
        ok, detail = worker_healthy(live.redis_url, live.keys.ns, names, 30.0, socket.gethostname())
        if ok or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert ok, detail
