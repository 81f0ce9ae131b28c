"""Reads from replicas on one primary with a replica (`CQRS_READ_FROM=replicas`): a pair of
private redis-servers of the test's own, the real projector writing to the primary.

Evidence that a replica served a read is its own `INFO commandstats` (HGETALL calls on
the replica go up, on the primary they do not); a paused replica is a `DEBUG SLEEP` on
it in a thread (a replica that neither applies the stream nor answers meanwhile)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from cqrs.commands.catalog import CreateProduct, RenameProduct
from cqrs.commands.customers import RegisterCustomer
from cqrs.commands.orders import PlaceOrder
from cqrs.queries.http import build_state
from cqrs.queries.service import QueryService
from cqrs.settings import Settings
from cqrs.wiring import Wiring
from tests.conftest import settings_env, truncate_write_side
from tests.helpers import free_port, run_cli_json, wait_until
from tests.integration.ops_support import start_redis
from tests.integration.projector_support import drain, relay_all, run, worker_in_thread
from tests.procs import Proc, fleet

# Read-your-writes must hold within the timeout it has without replicas.
WAIT_SECONDS = 5.0


@dataclass
class Pair:
    primary: str
    replica: str
    replica_proc: Proc


def calls(url: str, *commands: str) -> int:
    """How many times the server at `url` ran `commands` (INFO commandstats; default the
    reads of a check and of a view)."""
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        stats = client.info("commandstats")
        return sum(
            int(stats.get(f"cmdstat_{c}", {}).get("calls", 0))
            for c in commands or ("hget", "hgetall")
        )
    finally:
        client.close()


def replica_online(primary_url: str) -> bool:
    client = redis.Redis.from_url(primary_url, decode_responses=True)
    try:
        entry = client.info("replication").get("slave0")
        return isinstance(entry, dict) and entry.get("state") == "online"
    finally:
        client.close()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    """A primary and its replica (DEBUG allowed on it, to pause it), linked and in sync."""
    with fleet(tmp_path) as procs:
        _primary, primary = start_redis(procs, tmp_path, "--repl-diskless-sync-delay", "0")
        port = primary.rsplit(":", 1)[1].split("/")[0]
        replica_proc, replica = start_redis(
            procs,
            tmp_path,
            "--replicaof",
            "127.0.0.1",
            port,
            "--enable-debug-command",
            "local",
        )
        wait_until(lambda: replica_online(primary), timeout=20, what="the replica online")
        yield Pair(primary, replica, replica_proc)


@pytest.fixture
def replica_settings(pair: Pair, database_url: str) -> Settings:
    truncate_write_side(database_url)
    return Settings(
        database_url=database_url,
        redis_url=pair.primary,
        namespace=f"t{uuid.uuid4().hex[:12]}",
        relay_poll_seconds=0.2,
        read_from="replicas",
        replica_max_lag=1,
    )


@pytest.fixture
def live(replica_settings: Settings) -> Iterator[Wiring]:
    """Views built, then a worker running in a thread (the primary's only writer)."""
    w = Wiring(replica_settings)
    run(w, CreateProduct(sku="R-0", name="First", price="1.00", stock=1))
    drain(w)
    try:
        with worker_in_thread(w):
            yield w
    finally:
        w.close()


def test_reads_come_from_the_replica_and_read_your_writes_holds(pair: Pair, live: Wiring) -> None:
    queries = QueryService.from_settings(live.settings)
    product = run(live, CreateProduct(sku="R-1", name="Replica 0", price="2.00", stock=3))
    for i in range(1, 6):
        renamed = run(live, RenameProduct(product_id=product.id, name=f"Replica {i}"))
        relay_all(live)
        started = time.monotonic()
        reader = queries.wait_for(renamed.token, timeout=WAIT_SECONDS)
        assert time.monotonic() - started < WAIT_SECONDS
        view = reader.get_product(product.id)
        assert (view.name, view.version) == (f"Replica {i}", i + 1)

    # Right after the projector's notification the replica may not have the write yet
    # (the check then reads the primary); once it has, the check is satisfied there and
    # the reads it guards stay there: the replica runs them, the primary only the
    # worker's few status reads.
    pins = wait_until(lambda: queries.check(renamed.token)[1], what="the replica's check")
    reader = queries.pinned(pins)
    on_replica, on_primary = calls(pair.replica, "hgetall"), calls(pair.primary, "hgetall")
    for _ in range(20):
        assert reader.get_product(product.id).name == "Replica 5"
        assert queries.get_product(product.id).name == "Replica 5"  # unguarded: the replica
    assert calls(pair.replica, "hgetall") - on_replica >= 40
    assert calls(pair.primary, "hgetall") - on_primary < 20
    assert queries.replicas is not None and not queries.replicas.skipped


def test_a_list_after_a_write_on_the_replica_and_the_cli(pair: Pair, live: Wiring) -> None:
    """The guarded list reads its index on the primary (no mark names it) and the views
    its check read on the replica; `cqrs query --after` does the same end to end."""
    product = run(live, CreateProduct(sku="R-2", name="Listed", price="4.00", stock=9))
    customer = run(live, RegisterCustomer(email="r@example.com", name="Rita")).id
    items = [{"product_id": product.id, "qty": 2}]
    placed = run(live, PlaceOrder(customer_id=customer, items=items))
    relay_all(live)
    queries = QueryService.from_settings(live.settings)
    reader = queries.wait_for(placed.token, timeout=WAIT_SECONDS)
    page = reader.customer_orders(customer)
    assert [o.id for o in page.items] == [placed.id]
    assert reader.get_order(placed.id).customer_name == "Rita"

    env = settings_env(live.settings) | {"CQRS_READ_FROM": "replicas"}
    on_replica = calls(pair.replica)
    shown = run_cli_json("query", "order", str(placed.id), "--after", placed.token, env=env)
    assert shown["customer_name"] == "Rita"
    assert calls(pair.replica) > on_replica


def test_a_paused_replica_is_waited_on_or_skipped_never_stale(pair: Pair, live: Wiring) -> None:
    queries = QueryService.from_settings(live.settings)
    product = run(live, CreateProduct(sku="R-3", name="Before", price="1.00", stock=1))
    relay_all(live)
    queries.wait_for(product.token, timeout=WAIT_SECONDS)
    assert queries.replicas is not None

    def pause(seconds: int) -> threading.Thread:
        def sleep() -> None:
            client = redis.Redis.from_url(pair.replica, socket_timeout=seconds + 10)
            try:
                client.execute_command("DEBUG", "SLEEP", seconds)
            finally:
                client.close()

        thread = threading.Thread(target=sleep, daemon=True)
        thread.start()
        return thread

    # Paused for less than the token's timeout: the write lands on the primary while the
    # replica sleeps; the wait answers in time and the read shows the write.
    sleeper = pause(1)
    renamed = run(live, RenameProduct(product_id=product.id, name="After"))
    relay_all(live)
    started = time.monotonic()
    reader = queries.wait_for(renamed.token, timeout=WAIT_SECONDS)
    assert time.monotonic() - started < WAIT_SECONDS
    assert reader.get_product(product.id).name == "After"
    sleeper.join(timeout=10)

    # Paused for longer than CQRS_REPLICA_MAX_LAG (1 s): once its primary reports the
    # silence and the service has read that report (its topology is read again every
    # second; a read sent in between waits for the replica: docs/scaling.md), reads skip
    # it (they would otherwise wait out the 4 s sleep).
    sleeper = pause(4)
    replicas = queries.replicas

    def skipped() -> bool:
        replicas.refresh()
        return any("last heard from it" in why for why in replicas.skipped.values())

    wait_until(skipped, timeout=10, what="the service to skip the silent replica")
    again = run(live, RenameProduct(product_id=product.id, name="Again"))
    relay_all(live)
    started = time.monotonic()
    reader = queries.wait_for(again.token, timeout=WAIT_SECONDS)
    assert reader.get_product(product.id).name == "Again"
    assert queries.get_product(product.id).name == "Again"  # unguarded: the primary too
    assert time.monotonic() - started < 1.5, "a read waited for the sleeping replica"
    sleeper.join(timeout=10)


def test_a_stopped_replica_costs_nothing_but_its_reads(pair: Pair, live: Wiring) -> None:
    queries = QueryService.from_settings(live.settings)
    product = run(live, CreateProduct(sku="R-4", name="Kept", price="1.00", stock=1))
    relay_all(live)
    reader = queries.wait_for(product.token, timeout=WAIT_SECONDS)
    assert reader.get_product(product.id).name == "Kept"
    pair.replica_proc.kill()
    pair.replica_proc.wait(timeout=10)
    # The reader pinned to the dead replica and a fresh read both answer from the primary.
    assert reader.get_product(product.id).name == "Kept"
    assert queries.get_product(product.id).name == "Kept"
    renamed = run(live, RenameProduct(product_id=product.id, name="Still"))
    relay_all(live)
    assert queries.wait_for(renamed.token, timeout=WAIT_SECONDS).get_product(product.id).name == (
        "Still"
    )


def test_a_replica_behind_is_never_read_after_the_check(pair: Pair, live: Wiring) -> None:
    """A replica cut off from its primary keeps serving what it had while the topology,
    read up to a second ago, still lists it (here: frozen). A plain read may be that old;
    a read after `wait_for` never is: the replica's check says "not yet", the primary's
    says done, and the read goes to the primary."""
    queries = QueryService.from_settings(live.settings)
    product = run(live, CreateProduct(sku="R-5", name="Before", price="1.00", stock=1))
    relay_all(live)
    assert queries.wait_for(product.token, timeout=WAIT_SECONDS).get_product(product.id)
    nodes = queries.replicas
    assert nodes is not None and nodes.shards["primary"].replicas
    nodes.refreshed_at = float("inf")  # the listing of a moment ago, kept
    # The replica holds "Before" (the primary's writes so far acknowledged by it) before
    # it is cut off.
    primary = redis.Redis.from_url(pair.primary)
    try:
        assert primary.execute_command("WAIT", 1, 10_000) == 1
    finally:
        primary.close()
    replica = redis.Redis.from_url(pair.replica)
    try:
        replica.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
    finally:
        replica.close()

    renamed = run(live, RenameProduct(product_id=product.id, name="Fresh"))
    relay_all(live)
    checked_on_replica = calls(pair.replica)
    reader = queries.wait_for(renamed.token, timeout=WAIT_SECONDS)
    assert calls(pair.replica) > checked_on_replica, "the check skipped the replica"
    assert reader.get_product(product.id).name == "Fresh"
    assert queries.get_product(product.id).name == "Before"  # unguarded: the old replica


def test_the_http_readers_wait_and_read_on_the_replica(pair: Pair, live: Wiring) -> None:
    """`cqrs serve`'s readers (`?after=` is `AppliedWaiters.wait_for`, then the reader it
    returns): the replica gets a waiting pool of its own, named like the primary's."""
    product = run(live, CreateProduct(sku="R-6", name="Async 0", price="1.00", stock=1))
    relay_all(live)

    async def scenario() -> None:
        state = build_state(live.settings)
        try:
            for i in range(1, 4):
                renamed = run(live, RenameProduct(product_id=product.id, name=f"Async {i}"))
                relay_all(live)
                started = time.monotonic()
                reader = await state.waiters.wait_for(renamed.token, WAIT_SECONDS)
                assert time.monotonic() - started < WAIT_SECONDS
                assert (await reader.get_product(product.id)).name == f"Async {i}"
            on_replica = calls(pair.replica)
            for _ in range(5):
                reader = await state.waiters.wait_for(renamed.token, WAIT_SECONDS)
                assert (await reader.get_product(product.id)).name == "Async 3"
            assert calls(pair.replica) - on_replica >= 5, "the replica served no reads"
            replica = redis.Redis.from_url(pair.replica, decode_responses=True)
            try:
                names = {c.get("name") for c in replica.client_list()}
            finally:
                replica.close()
            assert f"cqrs-serve.{live.settings.namespace}" in names
        finally:
            await state.aclose()

    asyncio.run(scenario())
