"""What the relay writes, and what a failed or overlapping pass leaves behind.

The relay builds stream entries straight from log rows (field values selected as text,
XADDed by a Lua script per partition stream), without an `EventEnvelope`. These tests pin
that shortcut to the envelope's own format:

- every entry has exactly the fields of `EventEnvelope.to_stream_fields`, in its order and
  byte for byte, except `payload`, which is PostgreSQL's rendering of the same JSON;
  parsed back, the entry is the logged event, and its payload passes its contract;
- a pass whose XADDs fail rolls back: its outbox rows stay, and the next pass publishes
  them (a copy of what did land is identical);
- a pass that overlaps another waits for the rows that one holds, then claims the next
  visible rows (it does not come back empty while events are waiting).
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
import redis

from bench.workload import generate
from cqrs.commands import catalog, customers, orders
from cqrs.commands.db import make_session_factory
from cqrs.commands.handlers import execute
from cqrs.eventlog import LOG_COLUMNS, STREAM_FIELDS, envelope_from_row
from cqrs.events import EventEnvelope, parse_stream_entry
from cqrs.keys import partition_of
from cqrs.relay.outbox import Relay
from cqrs.urls import libpq_url
from cqrs.wiring import Wiring
from tests.helpers import until_events, wait_until
from tests.integration.stream_checks import (
    PassPause,
    assert_published_exactly_once,
    outbox_count,
    read_streams,
    waiting_on_lock,
)


def _logged_envelopes(database_url: str) -> dict[str, EventEnvelope]:
    """Every logged event, as the replay path reads it (plain text-mode cursor)."""
    with psycopg.connect(libpq_url(database_url)) as conn:
        rows = conn.execute(f"SELECT {LOG_COLUMNS} FROM events.event_log ORDER BY position")
        return {str(e.event_id): e for e in map(envelope_from_row, rows)}


def test_entries_are_the_envelopes_stream_fields(wiring: Wiring) -> None:
    session_factory = make_session_factory(wiring.engine)
    # Text that JSON escapes differently from PostgreSQL: non-ASCII, quotes, backslash.
    odd = execute(
        catalog.CreateProduct(sku="ODD-1", name='Café ☕ "x" \\ 1/2 😀', price="3.50", stock=9),
        session_factory,
    )
    buyer = execute(customers.RegisterCustomer(email="a@b.example", name="Zoë"), session_factory)
    execute(
        orders.PlaceOrder(customer_id=buyer.id, items=[{"product_id": odd.id, "qty": 2}]),
        session_factory,
    )
    generate(random.Random(4), session_factory, until=until_events(300, timeout=60))

    relay = Relay(wiring.database_url, wiring.redis, wiring.settings)
    assert relay.drain() > 300
    logged = _logged_envelopes(wiring.database_url)
    entries = read_streams(wiring.redis, wiring.keys, wiring.settings)
    assert len(entries) == len(logged)
    types = set()
    for entry in entries:
        event = logged[entry.fields["event_id"]]
        expected = event.to_stream_fields()
        assert list(entry.fields) == list(expected) == list(STREAM_FIELDS)
        payload = entry.fields.pop("payload")
        assert json.loads(payload) == json.loads(expected.pop("payload")) == event.payload
        assert entry.fields == expected, f"{event.event_type} {event.event_id}"
        assert entry.event == event
        assert entry.stream == wiring.keys.stream(
            partition_of(event.partition_key, wiring.settings.partitions)
        )
        header, _ = parse_stream_entry({**entry.fields, "payload": payload})
        assert header.event_id == event.event_id
        types.add(event.event_type)
    assert {"ProductCreated", "CustomerRegistered", "OrderPlaced", "StockReserved"} <= types


def test_failed_xadds_roll_the_pass_back_and_the_next_pass_publishes(wiring: Wiring) -> None:
    session_factory = make_session_factory(wiring.engine)
    created = [
        execute(
            catalog.CreateProduct(sku=f"RB-{n}", name=f"Rb {n}", price="1.00", stock=1),
            session_factory,
        )
        for n in range(40)
    ]
    relay = Relay(wiring.database_url, wiring.redis, wiring.settings)
    # One partition stream is not a stream: its XADDs fail (WRONGTYPE), the others land.
    broken = wiring.keys.stream(partition_of(created[0].events[0].partition_key, relay.partitions))
    wiring.redis.set(broken, "not a stream")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        relay.drain()
    assert outbox_count(wiring.database_url) == 40, "a failed pass must delete nothing"
    landed = sum(
        wiring.redis.xlen(wiring.keys.stream(p))
        for p in range(relay.partitions)
        if wiring.keys.stream(p) != broken
    )
    assert 0 < landed < 40

    wiring.redis.delete(broken)
    assert relay.drain() == 40
    report = assert_published_exactly_once(
        wiring.database_url, wiring.redis, wiring.keys, wiring.settings
    )
    assert report.events == 40 and report.duplicates == landed


def test_a_pass_behind_another_claims_the_next_rows(wiring: Wiring) -> None:
    """Pass A holds the 3 oldest events; pass B (same limit) waits for them, and when A
    commits, skips the rows A deleted and claims the next 3 instead of returning none."""
    session_factory = make_session_factory(wiring.engine)
    product = execute(
        catalog.CreateProduct(sku="Q-1", name="Queue", price="1.00", stock=1), session_factory
    )
    for n in range(5):
        execute(catalog.RenameProduct(product_id=product.id, name=f"Q {n}"), session_factory)
    relay_a = Relay(wiring.database_url, wiring.redis, wiring.settings)
    paused = PassPause(relay_a)
    relay_b = Relay(wiring.database_url, wiring.redis, wiring.settings)
    with (
        psycopg.connect(libpq_url(wiring.database_url), autocommit=True) as conn_a,
        psycopg.connect(libpq_url(wiring.database_url), autocommit=True) as conn_b,
        ThreadPoolExecutor(2) as pool,
    ):
        pass_a = pool.submit(relay_a.publish_batch, conn_a, 3)
        try:
            assert paused.reached.wait(10), "pass A never reached its XADDs"
            pid_b = conn_b.info.backend_pid
            pass_b = pool.submit(relay_b.publish_batch, conn_b, 3)
            wait_until(
                lambda: waiting_on_lock(wiring.database_url, pid_b),
                timeout=10,
                what="pass B to block on pass A's rows",
            )
            assert not pass_b.done()
        finally:
            paused.go.set()
        assert pass_a.result(timeout=30) == 3
        assert pass_b.result(timeout=30) == 3
    versions = [e.event.version for e in read_streams(wiring.redis, wiring.keys, wiring.settings)]
    assert versions == [1, 2, 3, 4, 5, 6]
    assert_published_exactly_once(wiring.database_url, wiring.redis, wiring.keys, wiring.settings)
