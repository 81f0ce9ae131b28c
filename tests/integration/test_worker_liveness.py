"""Liveness of the worker's redelivery paths: a failing entry never re-claimed forever.

The bug these pin down (issue 12): a malformed entry pending at a slot takeover was
claimed by every read of the new owner (XAUTOCLAIM from 0-0, no delivery limit), so it
was never dead-lettered and the slot never read new entries again. Every path that
redelivers (recovery, retries, group re-creation) now counts deliveries, waits the retry
delay, follows its cursor to the end, and leaves room for new entries.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cqrs.commands.catalog import CreateProduct
from cqrs.projector.deadletters import list_dead_letters
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.worker import Worker
from cqrs.settings import Settings
from cqrs.wiring import Wiring
from tests.conftest import settings_env
from tests.helpers import run_cli, wait_applied, wait_until
from tests.integration.projector_support import (
    drain,
    malformed,
    product_created,
    relay_all,
    run,
)
from tests.procs import fleet

PRODUCTS = PROJECTIONS["products"]


def deliveries(wiring: Wiring, stream: str, entry_id: str, group: str = "products") -> int:
    rows = wiring.redis.xpending_range(stream, group, entry_id, entry_id, 1)
    return int(rows[0]["times_delivered"]) if rows else 0


@pytest.fixture
def live(settings: Settings) -> Iterator[Wiring]:
    """Short leases and retry delay, few deliveries; views built (live projection)."""
    wiring = Wiring(
        settings.model_copy(
            update={
                "projector_lease_ms": 1000,
                "projector_max_deliveries": 3,
                "projector_retry_delay_ms": 50,
            }
        )
    )
    drain(wiring)
    yield wiring
    wiring.close()


def test_malformed_entry_pending_at_takeover_is_dead_lettered_and_the_slot_moves_on(
    live: Wiring, tmp_path: Path
) -> None:
    """The issue's reproduction, with real `cqrs project` processes."""
    wiring = live
    env = settings_env(wiring.settings) | {
        "CQRS_PROJECTOR_LEASE_MS": "1000",
        "CQRS_PROJECTOR_MAX_DELIVERIES": "3",
        "CQRS_PROJECTOR_RETRY_DELAY_MS": "200",
    }
    stream = wiring.keys.stream(0)
    bad = wiring.redis.xadd(stream, malformed())
    with fleet(tmp_path, env) as workers:
        a = workers.worker("a")
        wait_until(
            lambda: deliveries(wiring, stream, bad) >= 1,
            timeout=30,
            what="worker a to read the malformed entry",
        )
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        b = workers.worker("b")
        created = run(wiring, CreateProduct(sku="AFTER", name="After", price="2.00", stock=1))
        relay_all(wiring)
        view = wiring.keys.views("products", 1).product(created.id)
        wait_applied(
            wiring,
            lambda: wiring.redis.hget(view, "name") == "After",
            timeout=30,
            what="a product created after the takeover to be projected",
        )
        letters = wait_until(
            lambda: [
                d
                for d in list_dead_letters(wiring.redis, wiring.keys, "products")
                if d.entry_id == bad
            ],
            timeout=30,
            what="the malformed entry to be dead-lettered",
        )
        assert len(letters) == 1
        assert letters[0].deliveries <= 3
        assert "malformed" in letters[0].error
        assert wiring.redis.xpending(stream, "products")["pending"] == 0
        assert workers.stop(b, timeout=20) == 0, b.tail()
    drained = run_cli("run", "--drain", env=env, timeout=60)
    assert drained.returncode == 0, drained.stderr


def _worker(wiring: Wiring, consumer: str, **update: object) -> Worker:
    settings = wiring.settings.model_copy(update=update) if update else wiring.settings
    return Worker(wiring.redis, settings, [PRODUCTS], consumer=consumer)


def _drain_in_thread(worker: Worker, timeout: float = 90) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), kwargs={"drain": True})
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        stop.set()
        thread.join(10)
        raise AssertionError(f"drain did not finish within {timeout}s")


def test_600_failing_of_1000_pending_are_dead_lettered_and_the_400_applied_in_order(
    live: Wiring,
) -> None:
    wiring = live
    stream = wiring.keys.stream(0)
    bad_ids = [wiring.redis.xadd(stream, malformed()) for _ in range(600)]
    products = [uuid.uuid4() for _ in range(200)]
    good_ids = [wiring.redis.xadd(stream, product_created(p, "first")) for p in products]
    good_ids += [wiring.redis.xadd(stream, product_created(p, "second", 2)) for p in products]
    # Worker a reads all 1,000 and dies before applying any: all pending in its name.
    a = _worker(wiring, "a", projector_batch_size=1000, projector_batch_max=8000)
    a.maintain(drain=True, force=True)
    assert a._read() == []  # a slot taken over scans its (empty) pending list first
    assert len(a._read()) == 1000
    assert wiring.redis.xpending(stream, "products")["pending"] == 1000
    wiring.redis.delete(*[slot.lease for slot in a.owned.values()])  # its leases lapse

    b = _worker(wiring, "b", projector_batch_size=100)
    _drain_in_thread(b)

    letters = list_dead_letters(wiring.redis, wiring.keys, "products")
    assert sorted(d.entry_id for d in letters) == sorted(bad_ids)
    assert max(d.deliveries for d in letters) <= 3
    view = wiring.keys.views("products", 1)
    for p in products:
        assert wiring.redis.hmget(view.product(p), "name", "version") == ["second", "2"]
    assert b.stats.dead_lettered == 600
    assert wiring.redis.xpending(stream, "products")["pending"] == 0


def test_a_batch_over_many_slots_reads_at_most_batch_max_entries_and_drains_them_all(
    live: Wiring,
) -> None:
    """Leases are renewed between batches: a worker holding many slots reads an equal
    share of `projector_batch_max` from each, not a full page from every one, so a batch
    stays short; the batches still drain every stream."""
    wiring = live
    partitions = wiring.settings.partitions
    products = [uuid.uuid4() for _ in range(25 * partitions)]
    for i, p in enumerate(products):
        wiring.redis.xadd(wiring.keys.stream(i % partitions), product_created(p, "first"))
    worker = _worker(wiring, "many", projector_batch_size=500, projector_batch_max=16)
    worker.maintain(drain=True, force=True)
    assert len(worker.owned) == partitions
    assert worker._read() == []  # slots taken over scan their (empty) pending lists first
    per_slot = max(1, 16 // partitions)
    first = worker._read()
    assert len(first) == per_slot * partitions <= max(16, partitions)
    worker.process(first)
    _drain_in_thread(worker)
    view = wiring.keys.views("products", 1)
    assert all(wiring.redis.hget(view.product(p), "name") == "first" for p in products)


class GroupDestroyingWorker(Worker):
    """Destroys the slot's consumer group right before the follow-up call of a read (the
    XCLAIM of a redelivery), as a Redis flush or restart between the two would."""

    destroy_before_claim = False

    def _claim_pending(self, slot, rows):  # type: ignore[no-untyped-def]
        if self.destroy_before_claim:
            self.destroy_before_claim = False
            self.redis.xgroup_destroy(slot.stream, slot.projection.name)
        return super()._claim_pending(slot, rows)


@pytest.mark.parametrize("site", ["xreadgroup", "xpending", "xclaim"])
def test_nogroup_at_every_call_site_recreates_the_group_and_projection_goes_on(
    live: Wiring, site: str, caplog: pytest.LogCaptureFixture
) -> None:
    wiring = live
    stream = wiring.keys.stream(0)
    worker = GroupDestroyingWorker(wiring.redis, wiring.settings, [PRODUCTS], consumer="w")
    worker.maintain(drain=True, force=True)
    slot = worker.owned[("products", 0)]
    worker.run_once(drain=True)  # recovery scan done: steady state
    assert not slot.recovering
    bad = wiring.redis.xadd(stream, malformed())
    if site == "xreadgroup":
        wiring.redis.xgroup_destroy(stream, "products")
    else:
        worker.run_once(drain=True)  # reads the entry, fails it: pending, retry due
        assert deliveries(wiring, stream, bad) == 1
        if site == "xpending":
            wiring.redis.xgroup_destroy(stream, "products")
        else:
            worker.destroy_before_claim = True
        wait_until(
            lambda: slot.retry_at is not None and slot.retry_at <= __import__("time").monotonic(),
            timeout=5,
            what="the retry delay to pass",
        )
    with caplog.at_level(logging.ERROR, logger="cqrs.projector.worker"):
        worker.run_once(drain=True)  # must not raise
    assert "is gone" in caplog.text
    assert any(g["name"] == "products" for g in wiring.redis.xinfo_groups(stream))
    # The projection goes on: a product created now is projected by the same worker.
    product = uuid.uuid4()
    wiring.redis.xadd(stream, product_created(product, "fine"))
    _drain_in_thread(worker)
    assert wiring.redis.hget(wiring.keys.views("products", 1).product(product), "name") == "fine"
    assert bad in {d.entry_id for d in list_dead_letters(wiring.redis, wiring.keys, "products")}


def test_a_worker_making_no_progress_backs_off_and_says_why(
    live: Wiring, caplog: pytest.LogCaptureFixture
) -> None:
    """The busy-loop guard, with every other bound taken away (no retry delay, a delivery
    limit never reached): the worker backs off instead of spinning."""
    wiring = live
    stream = wiring.keys.stream(0)
    bad = wiring.redis.xadd(stream, malformed())
    worker = _worker(
        wiring,
        "spinner",
        projector_max_deliveries=1_000_000,
        projector_retry_delay_ms=0,
        projector_stuck_reads=5,
    )
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    progress = wiring.keys.progress("products")
    with caplog.at_level(logging.ERROR, logger="cqrs.projector.worker"):
        thread.start()
        try:
            wait_until(
                lambda: wiring.redis.hget(progress, "stuck"),
                timeout=20,
                what="the worker to report itself stuck",
            )
            reason = wiring.redis.hget(progress, "stuck")
            assert "no progress in 5 reads" in reason and "backing off" in reason
            assert wiring.redis.hget(progress, "stuck_consumer") == "spinner"
            shown = run_cli("status", "--json", "-p", "products", env=settings_env(wiring.settings))
            products = json.loads(shown.stdout)["projections"]["products"]
            assert products["state"] == "stalled", products
            assert "spinner is backing off" in products["reason"]
            # Backing off: over the next 2 s the entry is delivered a handful of times,
            # where a spinning loop delivers it thousands of times.
            before = deliveries(wiring, stream, bad)
            stop.wait(2.0)
            assert deliveries(wiring, stream, bad) - before <= 10
            # New entries still flow while it backs off.
            product = uuid.uuid4()
            wiring.redis.xadd(stream, product_created(product, "flows"))
            view = wiring.keys.views("products", 1).product(product)
            wait_applied(
                wiring,
                lambda: wiring.redis.hget(view, "name") == "flows",
                timeout=20,
                what="a new entry to be applied while the worker backs off",
            )
        finally:
            stop.set()
            thread.join(20)
    assert not thread.is_alive()
    assert caplog.text.count("no progress in 5 reads") >= 1


def test_dlq_retry_counts_the_delivery_and_keeps_the_letter(live: Wiring) -> None:
    """A retry from the dead letters that fails again stays a dead letter, its delivery
    count and error brought up to date: that path redelivers too."""
    wiring = live
    env = settings_env(wiring.settings) | {"CQRS_PROJECTOR_MAX_DELIVERIES": "3"}
    bad = wiring.redis.xadd(wiring.keys.stream(0), malformed())
    drain(wiring, [PRODUCTS])
    [letter] = list_dead_letters(wiring.redis, wiring.keys, "products")
    assert letter.entry_id == bad
    result = run_cli("dlq", "retry", "--all", "-p", "products", "--json", env=env)
    assert result.returncode == 1
    assert json.loads(result.stdout)["failed"]
    [again] = list_dead_letters(wiring.redis, wiring.keys, "products")
    assert again.entry_id == bad
    assert again.deliveries == letter.deliveries + 1
    assert again.error
