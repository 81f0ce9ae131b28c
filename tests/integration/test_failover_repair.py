"""The projector's failover check and repair (projector/repair.py), on one node.

A failover cannot be staged on the shared Redis, so it is staged from the other side:
PostgreSQL's record of the replication ids seen for the namespace is replaced by one that
does not name the server's real id, which is exactly what the check sees after a replica
with a new id was promoted. The views are set back as a lost write would leave them (an
update gone from one view, a whole view gone), and a later event of the set-back aggregate
fails its gate until it is dead-lettered. Then a worker starts, notices, rebuilds every
projection from the log, settles the dead letter, and `verify` is clean.

The tests of the cluster (tests/integration/cluster/test_cluster_failover.py) kill a real
master whose replica missed the last writes.
"""

from __future__ import annotations

import threading
import time
import uuid

import psycopg
import pytest

from cqrs.commands import catalog, customers, orders
from cqrs.keys import partition_of
from cqrs.projector.deadletters import list_dead_letters
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.repair import Repairs
from cqrs.projector.state import live_generation
from cqrs.projector.status import REBUILDING, projection_status
from cqrs.projector.worker import Worker
from cqrs.settings import Settings
from cqrs.urls import libpq_url
from cqrs.wiring import Wiring
from tests.helpers import wait_until
from tests.integration.projector_support import (
    deploy_projections,
    differences,
    drain,
    relay_all,
    run,
)


@pytest.fixture
def quick(settings: Settings) -> Settings:
    """Gaps dead-lettered after 2 deliveries 10 ms apart (instead of 5 x 200 ms)."""
    return settings.model_copy(
        update={"projector_max_deliveries": 2, "projector_retry_delay_ms": 10}
    )


def _recorded(wiring: Wiring) -> set[str]:
    with psycopg.connect(libpq_url(wiring.database_url)) as conn:
        rows = conn.execute(
            "SELECT replid FROM events.redis_replids WHERE namespace = %s", (wiring.keys.ns,)
        ).fetchall()
    return {r for (r,) in rows}


def _pretend_a_failover(wiring: Wiring) -> None:
    """PostgreSQL remembers only another history: the server's id is new to it."""
    with psycopg.connect(libpq_url(wiring.database_url)) as conn:
        conn.execute("DELETE FROM events.redis_replids WHERE namespace = %s", (wiring.keys.ns,))
        conn.execute(
            "INSERT INTO events.redis_replids (namespace, replid) VALUES (%s, %s)",
            (wiring.keys.ns, "f" * 40),
        )


def _worker(wiring: Wiring) -> Worker:
    return Worker(
        wiring.redis, wiring.settings, PROJECTIONS.values(), database_url=wiring.database_url
    )


def test_a_new_replication_id_rebuilds_the_views_and_settles_their_dead_letters(
    quick: Settings,
) -> None:
    wiring = Wiring(quick)
    try:
        deploy_projections(wiring)
        real = str(wiring.redis.info("replication")["master_replid"])
        # The namespace's first check recorded the id and flagged nothing.
        assert _recorded(wiring) == {real}
        assert not any(wiring.redis.exists(wiring.keys.repair(p)) for p in PROJECTIONS)

        product = run(
            wiring, catalog.CreateProduct(sku="FR-1", name="First", price="4.00", stock=9)
        ).id
        customer = run(wiring, customers.RegisterCustomer(email="fr@example.com", name="Fran")).id
        order = run(
            wiring,
            orders.PlaceOrder(customer_id=customer, items=[{"product_id": product, "qty": 2}]),
        ).id
        run(wiring, catalog.RenameProduct(product_id=product, name="Second"))
        drain(wiring)
        assert differences(wiring) == []
        before = {p: live_generation(wiring.redis, wiring.keys, p) for p in PROJECTIONS}

        # What a master that died before replicating leaves: the rename gone from the
        # product's view (its version back to the one before) and the order's view gone.
        products = wiring.keys.views("products", before["products"])
        view = products.product(product)
        version = int(wiring.redis.hget(view, "version"))
        wiring.redis.hset(view, mapping={"name": "First", "version": version - 1})
        wiring.redis.delete(wiring.keys.views("orders", before["orders"]).order(order))
        # The product's next event now fails its gate and ends as a dead letter.
        run(wiring, catalog.RenameProduct(product_id=product, name="Third"))
        drain(wiring)
        assert [
            d.fields["type"] for d in list_dead_letters(wiring.redis, wiring.keys, "products")
        ] == ["ProductRenamed"]
        assert differences(wiring)
        # And the next one failed as often as it may: pending, to be dead-lettered at its
        # next claim without another try.
        run(wiring, catalog.RenameProduct(product_id=product, name="Fourth"))
        relay_all(wiring)
        stream = wiring.keys.stream(partition_of(product, quick.partitions))
        failing = _worker(wiring)
        # Its first reads of the slots it takes are recovery scans; then the new entry.
        wait_until(lambda: failing.run_once(drain=True), timeout=10, what="the entry read")
        failing.release_all()
        [pending] = wiring.redis.xpending_range(stream, "products", "-", "+", 10)
        wiring.redis.xclaim(
            stream,
            "products",
            "x",
            0,
            [pending["message_id"]],
            retrycount=quick.projector_max_deliveries,
        )

        _pretend_a_failover(wiring)
        worker = drain(wiring)

        assert worker.repairs is not None and worker.repairs.repaired == len(PROJECTIONS)
        assert differences(wiring) == []
        assert list_dead_letters(wiring.redis, wiring.keys, "products") == []
        assert wiring.redis.xpending(stream, "products")["pending"] == 0
        for name in PROJECTIONS:
            assert live_generation(wiring.redis, wiring.keys, name) > before[name]
            assert not wiring.redis.exists(wiring.keys.repair(name))
            assert wiring.redis.hget(wiring.keys.progress(name), "repairs") == "1"
        assert real in _recorded(wiring)
        assert wiring.redis.hget(wiring.keys.meta(), "origin") == "partial"

        # Recorded now: the next worker's check finds nothing to repair.
        again = drain(wiring)
        assert again.repairs is not None and again.repairs.repaired == 0
        assert list_dead_letters(wiring.redis, wiring.keys, "products") == []
    finally:
        wiring.close()


def test_views_built_from_scratch_after_the_change_are_not_rebuilt_again(wiring: Wiring) -> None:
    """Redis lost everything (a restart without persistence: a new id, no views): the
    self-healing build from the log is the repair; the flag raised with it goes with it."""
    deploy_projections(wiring)
    run(wiring, catalog.CreateProduct(sku="FR-2", name="Once", price="1.00", stock=1))
    drain(wiring)
    for key in wiring.redis.scan_iter(match=wiring.keys.namespace_pattern(), count=1000):
        wiring.redis.unlink(key)
    _pretend_a_failover(wiring)

    worker = drain(wiring)

    assert worker.repairs is not None and worker.repairs.repaired == 0
    assert all(live_generation(wiring.redis, wiring.keys, p) == 1 for p in PROJECTIONS)
    assert not any(wiring.redis.exists(wiring.keys.repair(p)) for p in PROJECTIONS)
    assert differences(wiring) == []


def test_a_repair_that_cannot_run_now_waits_for_the_next_check(wiring: Wiring) -> None:
    """Another replay holds the projection's lock: the try fails, the flag stays, and the
    next try is due only a check interval later (no hot loop)."""
    deploy_projections(wiring)
    worker = _worker(wiring)
    repairs = worker.repairs
    assert repairs is not None
    name = "products"
    wiring.redis.set(wiring.keys.repair(name), "change-1")
    wiring.redis.set(wiring.keys.replay_lock(name), "someone-else", px=60_000)

    assert not repairs.run(
        PROJECTIONS[name], "change-1", worker.partitions, threading.Event(), worker.reapply
    )

    assert wiring.redis.get(wiring.keys.repair(name)) == "change-1"
    # `cqrs status` says why the projection does not move, not "stalled".
    status = projection_status(
        wiring.redis, wiring.keys, wiring.settings, PROJECTIONS[name], worker.partitions
    )
    assert status.state == REBUILDING, status
    assert "history changed" in status.reason and "change-1" in status.reason
    assert not repairs.due(name)
    assert repairs.due(name, now=time_after(wiring.settings.projector_failover_check_seconds))
    # A newer change is never cleared by the rebuild of an older one.
    wiring.redis.delete(wiring.keys.replay_lock(name))
    wiring.redis.set(wiring.keys.repair(name), "change-2")
    assert repairs.run(
        PROJECTIONS[name], "change-1", worker.partitions, threading.Event(), worker.reapply
    )
    assert wiring.redis.get(wiring.keys.repair(name)) == "change-2"


def test_a_check_without_postgresql_says_so_and_tries_again_later(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    unreachable = "postgresql://postgres@127.0.0.1:1/nowhere"
    wiring = Wiring(settings)
    try:
        repairs = Repairs(
            wiring.redis,
            _worker(wiring).scripts,
            settings,
            unreachable,
            PROJECTIONS.values(),
            {"consumer": f"c{uuid.uuid4().hex[:6]}"},
        )
        assert repairs.poll() is False
        assert "cannot read or record" in caplog.text
        assert repairs.poll() is False  # not due again yet: no second connection attempt
        assert caplog.text.count("cannot read or record") == 1
    finally:
        wiring.close()


def time_after(seconds: float) -> float:
    return time.monotonic() + seconds + 0.01
