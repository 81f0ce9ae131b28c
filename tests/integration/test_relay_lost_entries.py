"""Stream entries Redis lost after the relay deleted their outbox rows (what a failover to
a replica that had not received the last writes leaves), on one node: the loss is made by
hand, as the promoted replica would show it (the stream's last entries gone, its relay mark
back at the last entry that is left), and the relay re-publishes from the log:

- the next pass that touches the partition finds the stream behind, rolls back, and
  re-publishes the lost events before the new ones (per-aggregate order holds);
- the audit does the same for a stream no new event touches;
- a stream with no mark at all (its master lost everything) gets PostgreSQL's mark and
  no re-publication (the projector rebuilds the views from the log);
- a command's publish-after-commit leaves a stream behind to the relay (rows stay);
- a stream that keeps falling behind makes a pass give up after a bounded number of
  tries, its rows kept.

After each, the views built from the streams match PostgreSQL (`verify`).
"""

from __future__ import annotations

import logging
from collections import Counter

import psycopg
import pytest

from cqrs.commands import catalog, customers
from cqrs.commands.db import make_session_factory
from cqrs.commands.handlers import execute
from cqrs.relay.outbox import Relay, publish_pending
from cqrs.urls import libpq_url
from cqrs.wiring import Wiring
from tests.integration.projector_support import deploy_projections, differences, drain
from tests.integration.stream_checks import assert_published_exactly_once, outbox_count

LOST = 3


def _seed(wiring: Wiring, n: int = 30) -> None:
    """Products and customers spread over the partitions (2n events: the busiest of at
    most 8 partitions gets n // 4 or more)."""
    session_factory = make_session_factory(wiring.engine)
    for i in range(n):
        execute(
            catalog.CreateProduct(sku=f"LE-{i}", name=f"Lost {i}", price="2.00", stock=5),
            session_factory,
        )
        execute(
            customers.RegisterCustomer(email=f"lost{i}@example.com", name=f"Lost {i}"),
            session_factory,
        )


def _busiest(wiring: Wiring, relay: Relay) -> int:
    lengths = Counter(
        {p: wiring.redis.xlen(wiring.keys.stream(p)) for p in range(relay.partitions)}
    )
    partition, length = lengths.most_common(1)[0]
    assert length > LOST + 1
    return partition


def _lose_tail(
    wiring: Wiring, relay: Relay, partition: int, n: int = LOST
) -> list[tuple[str, str]]:
    """What a promoted replica that missed the last `n` appends shows: the entries gone,
    the mark at the position of the last entry left. Returns the lost events'
    (aggregate type, aggregate id)."""
    stream = wiring.keys.stream(partition)
    tail = wiring.redis.xrevrange(stream, count=n + 1)
    lost, kept = tail[:n], tail[n]
    wiring.redis.xdel(stream, *[entry_id for entry_id, _ in lost])
    wiring.redis.hset(wiring.keys.relay_mark(partition), relay.partitions, kept[1]["position"])
    return [(fields["aggregate_type"], fields["aggregate_id"]) for _id, fields in lost]


def _marks(wiring: Wiring, relay: Relay) -> tuple[dict[int, int], dict[int, int]]:
    """(PostgreSQL's marks, Redis's marks) of the namespace under its partition count."""
    with psycopg.connect(libpq_url(wiring.database_url)) as conn:
        held = dict(
            conn.execute(
                "SELECT partition, position FROM events.relay_marks"
                " WHERE namespace = %s AND partitions = %s",
                (wiring.keys.ns, relay.partitions),
            ).fetchall()
        )
    in_redis = {}
    for p in held:
        value = wiring.redis.hget(wiring.keys.relay_mark(p), relay.partitions)
        if value is not None:
            in_redis[p] = int(value)
    return held, in_redis


def _touch(wiring: Wiring, aggregates: list[tuple[str, str]]) -> None:
    """A new event for each of these aggregates (a reprice, a rename)."""
    session_factory = make_session_factory(wiring.engine)
    for kind, aggregate_id in aggregates:
        command: object = (
            catalog.RepriceProduct(product_id=aggregate_id, price="3.00")
            if kind == "product"
            else customers.RenameCustomer(customer_id=aggregate_id, name="Renamed")
        )
        execute(command, session_factory)


def test_a_pass_repairs_a_stream_behind_before_publishing_newer_events(wiring: Wiring) -> None:
    deploy_projections(wiring)
    _seed(wiring)
    relay = Relay(wiring.database_url, wiring.redis, wiring.settings)
    relay.drain()
    held, in_redis = _marks(wiring, relay)
    assert held and held == in_redis
    partition = _busiest(wiring, relay)
    lost = _lose_tail(wiring, relay, partition)
    # Newer versions of exactly the aggregates whose entries were lost: published before
    # the lost ones, they would reach the projections out of order.
    _touch(wiring, lost)

    with relay._connect() as conn:  # one pass, no audit first
        published = relay.publish_batch(conn)
    assert published == len(lost)
    assert relay.republished == LOST
    assert wiring.redis.hget(wiring.keys.meta(), "republished") == str(LOST)
    assert wiring.redis.hget(wiring.keys.meta(), "origin") == "partial"
    held, in_redis = _marks(wiring, relay)
    assert held == in_redis
    assert_published_exactly_once(wiring.database_url, wiring.redis, wiring.keys, wiring.settings)
    drain(wiring)
    assert differences(wiring) == []


def test_the_audit_repairs_a_stream_no_new_event_touches(wiring: Wiring) -> None:
    deploy_projections(wiring)
    _seed(wiring)
    relay = Relay(wiring.database_url, wiring.redis, wiring.settings)
    relay.drain()
    partition = _busiest(wiring, relay)
    _lose_tail(wiring, relay, partition)
    with relay._connect() as conn:
        assert relay.publish_batch(conn) == 0  # nothing new: the pass cannot see it
        assert relay.audit(conn) == LOST
        assert relay.audit(conn) == 0
    assert_published_exactly_once(wiring.database_url, wiring.redis, wiring.keys, wiring.settings)
    drain(wiring)
    assert differences(wiring) == []


def test_a_stream_that_lost_everything_gets_the_mark_and_no_republication(
    wiring: Wiring, caplog: pytest.LogCaptureFixture
) -> None:
    _seed(wiring)
    relay = Relay(wiring.database_url, wiring.redis, wiring.settings)
    relay.drain()
    partition = _busiest(wiring, relay)
    wiring.redis.delete(wiring.keys.stream(partition), wiring.keys.relay_mark(partition))
    with caplog.at_level(logging.WARNING, logger="cqrs.relay.outbox"), relay._connect() as conn:
        assert relay.audit(conn) == 0
    assert "hold no relay mark" in caplog.text
    held, in_redis = _marks(wiring, relay)
    assert held == in_redis
    assert wiring.redis.hget(wiring.keys.meta(), "origin") == "partial"
    assert not wiring.redis.exists(wiring.keys.stream(partition))


def test_publish_after_commit_leaves_a_stream_behind_to_the_relay(wiring: Wiring) -> None:
    _seed(wiring)
    relay = Relay(wiring.database_url, wiring.redis, wiring.settings)
    relay.drain()
    partition = _busiest(wiring, relay)
    lost = _lose_tail(wiring, relay, partition)
    _touch(wiring, lost)
    pending = outbox_count(wiring.database_url)
    assert publish_pending(wiring.database_url, wiring.redis, wiring.settings) == 0
    assert outbox_count(wiring.database_url) == pending
    assert relay.drain() == pending  # the relay's drain audits first, then publishes
    assert relay.republished == LOST
    assert_published_exactly_once(wiring.database_url, wiring.redis, wiring.keys, wiring.settings)


def test_a_stream_that_keeps_falling_behind_makes_the_pass_give_up(
    wiring: Wiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed(wiring)
    relay = Relay(wiring.database_url, wiring.redis, wiring.settings)
    relay.drain()
    partition = _busiest(wiring, relay)
    lost = _lose_tail(wiring, relay, partition)
    _touch(wiring, lost)
    pending = outbox_count(wiring.database_url)
    repairs: list[dict[int, int]] = []
    monkeypatch.setattr(relay, "_republish", lambda _conn, behind: repairs.append(behind) or 0)
    with relay._connect() as conn:
        assert relay.publish_batch(conn) == 0
    assert len(repairs) == 3 and all(partition in r for r in repairs)
    assert outbox_count(wiring.database_url) == pending
